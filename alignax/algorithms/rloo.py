"""RLOO, REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics").

Each iteration samples `rloo.group_size` (k) responses per prompt; the whole response is one
action whose reward is its score minus the sequence KL to the reference (k1 summed over tokens,
`kl_in="reward"`), and its baseline is the mean reward of the other k - 1 samples of its prompt:

  A_i = R_i - 1/(k-1) sum_{j != i} R_j,   R_i = score_i - beta * sum_t (log pi - log pi_ref)

The baseline excludes the sample, so the estimate of grad E[R] is unbiased and the fixed point of
the penalized objective is pi_ref exp(r / beta) / Z (verified in `tests/test_bandit.py`). The loss
is REINFORCE, -A_i log pi(y_i), with the token sum over a fixed length (`loss_agg`
seq_mean_token_sum_norm, a constant factor of the sequence loss); with more than one update per
rollout (`num_iterations`, `num_minibatches`) the ratio to the sampling policy is clipped as in
PPO (`rloo.clip`).
"""

from __future__ import annotations

from alignax.algorithms import critic_free, online, reward_sources
from alignax.algorithms.base import Algorithm
from alignax.config import ConfigDict, ConfigError
from alignax.losses import rl
from alignax.train.runner import StageContext

HPARAMS = ("clip",)


def validate(cfg: ConfigDict) -> None:
  """`rloo.*` and the shared group keys (group size, minibatches, KL placement)."""
  critic_free.validate_group(cfg, "rloo")
  if not 0 < cfg.rloo.clip < 1:
    raise ConfigError(f"config.rloo.clip: must be in (0, 1), got {cfg.rloo.clip}")


def build_run(ctx: StageContext):
  """The RLOO Run (`critic_free.build_group_run`): leave-one-out advantages (each sample's
  reward minus the mean of the other samples of its prompt) and a symmetric clip."""
  def advantages(rewards, group_size, hp):
    return rl.rloo_advantages(rewards, group_size)

  return critic_free.build_group_run(ctx, ALGORITHM, advantages, lambda hp: (hp["clip"], hp["clip"]))


def export(ctx: StageContext, state) -> None:
  """Writes WORKDIR/export: the policy params, as an LM export."""
  online.export_policy(ctx, state, "rloo")


ALGORITHM = Algorithm(name="rloo", records="prompts", section="rloo", hparams=HPARAMS,
                      upstream={"init": "sft", "reward_model": "reward"},
                      build=build_run, export=export, validate=validate, needs=reward_sources.needed_upstream,
                      state_keys=("kl_coef",))
