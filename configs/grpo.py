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
`train.batch_size` prompts x `grpo.group_size` samples.
"""

from alignax.algorithms.common import eval_section, init_section
from alignax.algorithms.online import group_section, rewards_section
from alignax.config import base_config, world_section


def get_config(preset: str | None = None):
  preset = preset or "tiny"
  c = base_config("grpo", preset)
  c.world = world_section()
  c.init = init_section(workdir=f"runs/sft_{preset}", config=f"configs/sft.py:{preset}")
  c.reward_model = init_section(workdir=f"runs/reward_{preset}", config=f"configs/reward.py:{preset}")
  c.grpo = group_section(
      scale_rewards=True,  # divide by the group std (GRPO); False = Dr. GRPO
      clip_low=0.2,  # ratio clipped to [1 - clip_low, 1 + clip_high]
      clip_high=0.2,  # DAPO's clip-higher: 0.28
      adv_eps=1e-4,  # added to the group std
  )
  c.rewards = rewards_section(model=1.0)
  c.eval = eval_section()
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  if preset == "tiny":
    c.train.steps = 60
    c.train.batch_size = 16  # prompts; x group_size = 64 rollout rows
    c.train.log_every = 1
    c.train.eval_every = 20
    c.grpo.num_minibatches = 2
    c.grpo.num_iterations = 2
    c.optimizer.lr = 5e-5
  elif preset == "standard":  # the CPU benchmark workload: 8 prompts x 4 samples x 64 new tokens
    c.train.steps = 200
    c.train.batch_size = 8
    c.grpo.prompt_len = 64
    c.grpo.max_new_tokens = 64
    c.grpo.kl_coef = 0.04
    c.optimizer.lr = 1e-6
  else:
    raise ValueError(f"unknown preset {preset!r}; presets: tiny, standard")
  return c
