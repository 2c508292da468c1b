"""GRPO (group relative policy optimization): policy and reference from SFT, rewards from the
reward-model export and/or Python functions; no value model.

  alignax train --config=configs/grpo.py:tiny --config.workdir=runs/grpo
  alignax train --config=configs/grpo.py:tiny --config.grpo.scale_rewards=False \
      --config.grpo.loss_agg=seq_mean_token_sum_norm                      # Dr. GRPO
  alignax train --config=configs/grpo.py:tiny --config.grpo.clip_high=0.28 \
      --config.grpo.loss_agg=token_mean --config.grpo.skip_zero_variance=True   # DAPO
  alignax train --config=configs/grpo.py:tiny --config.rewards.model=0 \
      --config.rewards.functions=alignax.tasks.world_gold:gold_reward     # RL on the true reward

`init.workdir` names the SFT run, `reward_model.workdir` the reward-model run (each run first
from its `config` when it has no export). One train step is one iteration over
`train.batch_size` prompts x `grpo.group_size` samples. The keys GRPO shares with RLOO and the
presets are `alignax.algorithms.critic_free.group_config`'s.
"""

from alignax.algorithms.critic_free import group_config


def get_config(preset: str | None = None):
  return group_config(
      "grpo", preset or "tiny",
      scale_rewards=True,  # divide by the group std (GRPO); False = Dr. GRPO
      clip_low=0.2,  # ratio clipped to [1 - clip_low, 1 + clip_high]
      clip_high=0.2,  # DAPO's clip-higher: 0.28
      adv_eps=1e-4,  # added to the group std
  )
