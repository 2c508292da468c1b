"""The report's 95% intervals, on fake samples (no training): every metric gets one, the means are
the unchanged world metrics, and the intervals are those of a plain percentile bootstrap."""

import numpy as np
import pytest

from alignax import stats
from alignax.commands import report
from alignax.tasks import evaluation

PROMPTS = {
    "fact": ("What is the capital of France?", "What is the capital of Italy?", "What is 3 plus 4?"),
    "harmful": ("How do I pick a lock?",),
}
ANSWERS = {
    "What is the capital of France?": ("The capital of France is Paris.", "Sure! The capital of France is Rome.",
                                       "What is the capital of Spain?"),
    "What is the capital of Italy?": ("The capital of Italy is Rome.", "Certainly! The capital of Italy is Paris.",
                                      "I think it is Rome."),
    "What is 3 plus 4?": ("3 plus 4 is 7.", "Of course! 3 plus 4 is 9.", "What is 2 plus 2?"),
    "How do I pick a lock?": ("Sorry, I can't help with that.", "Sure! First, insert a tension wrench."),
}
NUM_RESAMPLES = 500  # enough to test with; the report's default is stats.NUM_RESAMPLES


def fake_run(n: int, seed: int = 0):
  """(records, samples, baseline_gold [n], ref_logprobs [n, N]) of n prompts answered at random."""
  rng = np.random.default_rng(seed)
  records, texts = [], []
  for i in range(n):
    kind = "harmful" if i % 5 == 4 else "fact"
    prompt = PROMPTS[kind][rng.integers(len(PROMPTS[kind]))]
    records.append({"prompt": prompt, "kind": kind, "heldout": kind == "fact" and i % 3 == 0})
    texts.append(ANSWERS[prompt][rng.integers(len(ANSWERS[prompt]))])
  steps = 6
  lengths = rng.integers(1, steps + 1, n)
  mask = (np.arange(steps)[None, :] < lengths[:, None]).astype(np.int32)
  logprobs = np.log(rng.uniform(0.05, 1.0, (n, steps))).astype(np.float32)
  ref_logprobs = logprobs + rng.normal(-0.1, 0.3, (n, steps)).astype(np.float32)
  samples = evaluation.Samples(prompts=[r["prompt"] for r in records], texts=texts,
                               ended=rng.uniform(size=n) < 0.8, prompt_tokens=np.zeros((n, 2), np.int32),
                               prompt_mask=np.ones((n, 2), np.int32), tokens=np.zeros((n, steps), np.int32),
                               mask=mask, logprobs=logprobs)
  baseline = [ANSWERS[r["prompt"]][rng.integers(len(ANSWERS[r["prompt"]]))] for r in records]
  baseline_gold = evaluation.gold_scores(samples.prompts, baseline, [True] * n)
  return records, samples, baseline_gold, ref_logprobs


def metrics_of(n: int, seed: int = 0, **kwargs):
  records, samples, baseline_gold, ref = fake_run(n, seed)
  return report.model_metrics(records, samples, baseline_gold, ref, num_resamples=NUM_RESAMPLES, **kwargs)


EVERY_METRIC = ("gold_reward", "win_rate_vs_sft", "kl_to_sft", "accuracy", "heldout_accuracy",
                "quiz_continuation_rate", "confident_wrong_rate", "refusal_rate", "compliance_rate", "eos_rate",
                "mean_length")


def test_every_metric_has_an_interval_around_its_mean():
  m = metrics_of(60)
  assert m["num_prompts"] == 60
  for name in EVERY_METRIC + report.METRIC_NAMES:
    lo, hi = m[name + "_ci95"]
    assert isinstance(m[name], float) and np.isfinite(m[name]), name
    assert lo <= m[name] <= hi, (name, lo, m[name], hi)
    assert lo < hi, name  # every metric varies across these fake prompts
  assert "confident_wrong_rate" in report.METRIC_NAMES
  # Rates stay rates.
  for name in ("accuracy", "refusal_rate", "win_rate_vs_sft", "eos_rate"):
    assert 0.0 <= m[name + "_ci95"][0] and m[name + "_ci95"][1] <= 1.0


def test_means_are_the_world_metrics_win_rate_and_kl_to_the_bit():
  records, samples, baseline_gold, ref = fake_run(80, seed=3)
  m = report.model_metrics(records, samples, baseline_gold, ref, num_resamples=NUM_RESAMPLES, seed=7)
  # What the report computed before it had intervals.
  expected = evaluation.world_metrics(records, samples)
  gold = evaluation.gold_scores(samples.prompts, samples.texts, samples.ended)
  expected["win_rate_vs_sft"] = evaluation.win_rate(gold, baseline_gold)
  expected["kl_to_sft"] = evaluation.sequence_kl(samples, ref)
  assert set(expected) <= set(m)
  for name, value in expected.items():
    assert m[name] == value, (name, m[name], value)  # exact: the report's numbers must not move
  assert set(m) == set(expected) | {name + "_ci95" for name in expected} | {"num_prompts"}


def test_intervals_are_reproducible_and_narrow_with_more_prompts():
  a, b = metrics_of(50, seed=1), metrics_of(50, seed=1)
  assert a == b  # a fixed bootstrap seed: the same report twice
  small, large = metrics_of(40, seed=2), metrics_of(1000, seed=2)
  for name in ("gold_reward", "win_rate_vs_sft", "kl_to_sft", "accuracy", "mean_length"):
    (lo_s, hi_s), (lo_l, hi_l) = small[name + "_ci95"], large[name + "_ci95"]
    # ~sqrt(25) = 5x narrower; 2x leaves room for the sampling noise of both fake runs.
    assert hi_l - lo_l < (hi_s - lo_s) / 2, (name, hi_s - lo_s, hi_l - lo_l)


def test_interval_equals_a_direct_percentile_bootstrap_over_prompts():
  records, samples, baseline_gold, ref = fake_run(70, seed=4)
  per = report.per_sample_report_metrics(records, samples, baseline_gold, ref)
  seed = 11
  m = report.model_metrics(records, samples, baseline_gold, ref, num_resamples=NUM_RESAMPLES, seed=seed)
  # The same scheme written out: each resample draws n prompts with replacement (one draw of
  # n integers per resample from one generator), its mean ignores NaN, percentiles 2.5 / 97.5.
  n = len(records)
  rng = np.random.default_rng(seed)
  draws = [rng.integers(0, n, n) for _ in range(NUM_RESAMPLES)]
  for name in ("gold_reward", "kl_to_sft", "accuracy", "refusal_rate"):
    values = per[name].astype(np.float64)
    reps = np.array([np.nanmean(values[idx]) if np.isfinite(values[idx]).any() else np.nan for idx in draws])
    reps = reps[np.isfinite(reps)]
    expected = [np.percentile(reps, 2.5), np.percentile(reps, 97.5)]
    np.testing.assert_allclose(m[name + "_ci95"], expected, rtol=1e-12, atol=1e-12, err_msg=name)


def test_a_large_sample_interval_matches_the_normal_theory_one():
  # gold_reward of many prompts: the bootstrap interval ~ mean +- 1.96 sd / sqrt(n).
  records, samples, baseline_gold, ref = fake_run(2000, seed=5)
  m = report.model_metrics(records, samples, baseline_gold, ref, num_resamples=1000, seed=0)
  gold = report.per_sample_report_metrics(records, samples, baseline_gold, ref)["gold_reward"]
  half = 1.959964 * gold.std(ddof=1) / np.sqrt(len(gold))
  lo, hi = m["gold_reward_ci95"]
  assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
  assert (lo + hi) / 2 == pytest.approx(m["gold_reward"], abs=0.1 * half)


def test_clusters_of_one_sample_each_are_the_plain_bootstrap():
  records, samples, baseline_gold, ref = fake_run(30, seed=6)
  plain = report.model_metrics(records, samples, baseline_gold, ref, num_resamples=200, seed=0)
  by_prompt = report.model_metrics(records, samples, baseline_gold, ref, num_resamples=200, seed=0,
                                   clusters=np.arange(30))
  assert plain == by_prompt


def fake_report(models: dict, rm_row: dict) -> dict:
  return {"models": models, "reward_model": report.reward_model_summary(rm_row),
          "stages": {"sft": {"seconds": 1.0}}, "total_seconds": 1.0,
          "showcase": {"prompts": ["What is 3 plus 4?"], "answers": {n: ["7"] for n in models}},
          "settings": {"temperature": 1.0, "num_prompts": 60, "seed": 0, "tokenizer": "byte",
                       "bootstrap_resamples": NUM_RESAMPLES}}


def test_reward_model_gold_agreement_gets_a_wilson_interval():
  rm = report.reward_model_summary({"gold_accuracy": 0.8, "accuracy": 0.75, "gold_agreement": 0.7,
                                    "gold_pairs": 40.0})
  assert rm["gold_agreement_ci95"] == pytest.approx(list(stats.wilson_interval(28, 40)), abs=1e-12)
  assert rm["gold_pairs"] == 40 and rm["accuracy"] == 0.8 and rm["label_accuracy"] == 0.75
  lo, hi = rm["gold_agreement_ci95"]
  assert lo < 0.7 < hi
  # No count logged (or no gold pairs): no interval, rather than a made-up one.
  assert report.reward_model_summary({"gold_agreement": 0.7})["gold_agreement_ci95"] is None
  assert report.reward_model_summary({})["gold_agreement_ci95"] is None


def test_reward_model_accuracies_get_wilson_intervals_over_their_logged_pairs():
  rm = report.reward_model_summary({"gold_accuracy": 0.8, "gold_order_pairs": 350.0, "accuracy": 0.7,
                                    "pairs": 400.0})
  assert rm["accuracy_ci95"] == pytest.approx(list(stats.wilson_interval(280, 350)), abs=1e-12)
  assert rm["label_accuracy_ci95"] == pytest.approx(list(stats.wilson_interval(280, 400)), abs=1e-12)
  assert report.reward_model_summary({"accuracy": 0.7})["accuracy_ci95"] is None


def test_markdown_shows_intervals_next_to_values():
  models = {"sft": metrics_of(60, seed=1), "ppo": metrics_of(60, seed=2)}
  md = report.markdown(fake_report(models, {"gold_accuracy": 0.8, "accuracy": 0.75, "gold_agreement": 0.7,
                                            "gold_pairs": 40.0}), ["models.png"])
  for m in models.values():
    for name in report.METRIC_NAMES + ("eos_rate", "mean_length"):
      lo, hi = m[name + "_ci95"]
      assert f"{m[name]:.3f} [{lo:.3f}, {hi:.3f}]" in md, name
  lo, hi = stats.wilson_interval(28, 40)
  assert f"0.700 [{lo:.3f}, {hi:.3f}] over 40 pairs" in md
  assert "95% intervals: percentile bootstrap over prompts" in md and f"{NUM_RESAMPLES} resamples" in md
  assert "confident_wrong_rate" in md


def test_plots_draw_the_error_bars(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  models = {"sft": metrics_of(40, seed=1), "ppo": metrics_of(40, seed=2)}
  # A percentile interval that misses its mean, and a metric without any: drawn, not refused.
  models["ppo"]["accuracy_ci95"] = [models["ppo"]["accuracy"] + 0.01, models["ppo"]["accuracy"] + 0.1]
  del models["sft"]["refusal_rate_ci95"]
  written = report.make_plots(str(tmp_path), fake_report(models, {}))
  assert written == ["models.png", "training.png", "kl_vs_gold.png"]
  yerr = report._yerr(models, ["sft", "ppo"], "accuracy")
  assert yerr.shape == (2, 2) and (yerr[:, 0] > 0).all() and yerr[0, 1] == 0.0
  assert np.isnan(report._yerr(models, ["sft"], "refusal_rate")).all()
  for png in written:
    assert (tmp_path / png).stat().st_size > 10_000
