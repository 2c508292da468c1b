"""RLOO (REINFORCE leave-one-out): policy and reference from SFT, rewards from the reward-model
export and/or Python functions, a sequence-level KL penalty in the reward; no value model.

  alignax train --config=configs/rloo.py:tiny --config.workdir=runs/rloo
  alignax train --config=configs/rloo.py:tiny --config.rloo.kl_coef=0.1

`init.workdir` names the SFT run, `reward_model.workdir` the reward-model run (each run first
from its `config` when it has no export). One train step is one iteration over
`train.batch_size` prompts x `rloo.group_size` samples. The keys RLOO shares with GRPO and the
presets are `alignax.algorithms.critic_free.group_config`'s.
"""

from alignax.algorithms.critic_free import group_config


def get_config(preset: str | None = None):
  return group_config(
      "rloo", preset or "tiny",
      kl_in="reward", kl_estimator="k1", kl_coef=0.05,
      loss_agg="seq_mean_token_sum_norm",  # REINFORCE on the whole response (a fixed-length sum)
      clip=0.2,  # ratio clip when a rollout serves more than one update
  )
