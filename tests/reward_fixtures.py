"""Python reward functions the tests name in `rewards.functions` (importable as
`reward_fixtures:NAME` from the tests directory, or `tests.reward_fixtures:NAME` from the repo)."""

import os


def response_length(prompts, responses):
  """A well-behaved reward: the response length in characters, scaled."""
  return [len(r) / 100.0 for r in responses]


def fails_on_second_batch(prompts, responses):
  """Raises from the second call on (the first iteration succeeds); counts calls in a file named
  by $ALIGNAX_TEST_COUNTER so a subprocess run can be checked."""
  path = os.environ["ALIGNAX_TEST_COUNTER"]
  calls = int(open(path).read()) if os.path.exists(path) else 0
  with open(path, "w") as f:
    f.write(str(calls + 1))
  if calls >= 1:
    raise RuntimeError("the scoring service is down")
  return [0.0] * len(prompts)
