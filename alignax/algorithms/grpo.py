"""GRPO, group relative policy optimization (Shao et al. 2024, DeepSeekMath), with the options the
literature argues about.

Each iteration samples `grpo.group_size` (G) responses per prompt and scores them; a response's
advantage is its score relative to its group, the same for all of its tokens:

  A_i = (r_i - mean_j r_j) / (std_j r_j + eps)   (`grpo.scale_rewards=True`, GRPO)
  A_i = r_i - mean_j r_j                         (`scale_rewards=False`, Dr. GRPO, Liu et al. 2025:
                                                  the std scaling weights prompts by difficulty)

The policy loss is the clipped surrogate with asymmetric clipping, ratio clipped to
[1 - clip_low, 1 + clip_high] (clip_high > clip_low is DAPO's clip-higher, Yu et al. 2025), over
`num_iterations` (mu) updates per rollout with old-policy logprobs, aggregated by `loss_agg`:
seq_mean_token_mean (GRPO), token_mean (DAPO: long responses are not down-weighted) or
seq_mean_token_sum_norm (Dr. GRPO: token sums over a fixed length, no length bias).

KL to the reference: `kl_in="loss"` with `kl_estimator="k3"` is GRPO's published form, which
optimizes E[r] - beta KL(ref || pi) (the forward KL); "k3_weighted" (k3 times the importance ratio,
the default) and "k2" optimize E[r] - beta KL(pi || ref) as PPO and DPO do; `kl_in="reward"` with
"k1" puts the sequence KL into the score before the group baseline; "none" drops it. The group
mean includes the sample itself, which scales the expected score gradient by (G - 1) / G: with
the KL in the loss the fixed point is pi_ref exp(c r / beta) / Z with c = (G-1)/G
(`tests/test_bandit.py` verifies each option). `skip_zero_variance` drops groups whose scores are
all equal (DAPO's dynamic sampling, without resampling), counted in `train/zero_variance_groups`.
"""

from __future__ import annotations

from alignax.algorithms import critic_free, online, reward_sources
from alignax.algorithms.base import Algorithm
from alignax.config import ConfigDict, ConfigError
from alignax.losses import rl
from alignax.train.runner import StageContext

HPARAMS = ("clip_low", "clip_high", "adv_eps")


def validate(cfg: ConfigDict) -> None:
  """`grpo.*` and the shared group keys (group size, minibatches, KL placement)."""
  critic_free.validate_group(cfg, "grpo")
  g = cfg.grpo
  if not (0 < g.clip_low < 1 and g.clip_high > 0):
    raise ConfigError(f"config.grpo.clip_low: need 0 < clip_low < 1 and clip_high > 0, got "
                      f"{g.clip_low}, {g.clip_high}")


def build_run(ctx: StageContext):
  """The GRPO Run (`critic_free.build_group_run`): group-normalized advantages (divided by the
  group's std unless `grpo.scale_rewards` is False) and the asymmetric clip (clip_low, clip_high)."""
  scale = bool(ctx.cfg.grpo.scale_rewards)

  def advantages(rewards, group_size, hp):
    return rl.group_advantages(rewards, group_size, scale_by_std=scale, eps=hp["adv_eps"])

  return critic_free.build_group_run(ctx, ALGORITHM, advantages, lambda hp: (hp["clip_low"], hp["clip_high"]))


def export(ctx: StageContext, state) -> None:
  """Writes WORKDIR/export: the policy params, as an LM export."""
  online.export_policy(ctx, state, "grpo")


ALGORITHM = Algorithm(name="grpo", records="prompts", section="grpo", hparams=HPARAMS,
                      upstream={"init": "sft", "reward_model": "reward"},
                      build=build_run, export=export, validate=validate, needs=reward_sources.needed_upstream,
                      state_keys=("kl_coef",))
