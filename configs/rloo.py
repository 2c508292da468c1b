"""RLOO (REINFORCE leave-one-out): policy and reference from SFT, rewards from the reward-model
export and/or Python functions, a sequence-level KL penalty in the reward; no value model.

  alignax train --config=configs/rloo.py:tiny --config.workdir=runs/rloo
  alignax train --config=configs/rloo.py:tiny --config.rloo.kl_coef=0.1

`init.workdir` names the SFT run, `reward_model.workdir` the reward-model run (each run first
from its `config` when it has no export). One train step is one iteration over
`train.batch_size` prompts x `rloo.group_size` samples.
"""

from alignax.algorithms.common import eval_section, init_section
from alignax.algorithms.online import group_section, rewards_section
from alignax.config import base_config, world_section


def get_config(preset: str | None = None):
  preset = preset or "tiny"
  c = base_config("rloo", preset)
  c.world = world_section()
  c.init = init_section(workdir=f"runs/sft_{preset}", config=f"configs/sft.py:{preset}")
  c.reward_model = init_section(workdir=f"runs/reward_{preset}", config=f"configs/reward.py:{preset}")
  c.rloo = group_section(
      kl_in="reward", kl_estimator="k1", kl_coef=0.05,
      loss_agg="seq_mean_token_sum_norm",  # REINFORCE on the whole response (a fixed-length sum)
      clip=0.2,  # ratio clip when a rollout serves more than one update
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
    c.rloo.num_minibatches = 2
    c.rloo.num_iterations = 2
    c.optimizer.lr = 5e-5
  elif preset == "standard":  # the CPU benchmark workload: 8 prompts x 4 samples x 64 new tokens
    c.train.steps = 200
    c.train.batch_size = 8
    c.rloo.prompt_len = 64
    c.rloo.max_new_tokens = 64
    c.rloo.kl_coef = 0.04
    c.optimizer.lr = 1e-6
  else:
    raise ValueError(f"unknown preset {preset!r}; presets: tiny, standard")
  return c
