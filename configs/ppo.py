"""PPO with a KL penalty (RLHF): policy and reference from SFT, value and reward from the RM.

  alignax train --config=configs/ppo.py:tiny --config.workdir=runs/ppo
  alignax train --config=configs/ppo.py:tiny --config.ppo.adaptive_kl=True --config.ppo.target_kl=2

`init.workdir` names the SFT run, `reward_model.workdir` the reward-model run; each is run first
(from its `config`) when it has no export. One train step is one PPO iteration over
`train.batch_size` prompts.
"""

from alignax.algorithms.common import init_section
from alignax.algorithms.reward_sources import rewards_section
from alignax.config import ConfigDict, base_config, world_section


def get_config(preset: str | None = None):
  preset = preset or "tiny"
  c = base_config("ppo", preset)
  c.world = world_section()
  c.init = init_section(workdir=f"runs/sft_{preset}", config=f"configs/sft.py:{preset}")
  c.reward_model = init_section(workdir=f"runs/reward_{preset}", config=f"configs/reward.py:{preset}")
  c.ppo = ConfigDict(dict(
      prompt_len=48,  # prompts are left-padded to this many tokens (longer ones are bad records)
      max_new_tokens=48,
      temperature=1.0,  # rollout sampling temperature (logprobs use the same temperature)
      epochs=4,  # passes over each rollout
      num_minibatches=4,  # minibatches per pass
      clip=0.2,  # policy ratio clip range
      vf_clip=0.2,  # value clip range
      vf_coef=0.1,
      gamma=1.0,
      lam=0.95,
      kl_coef=0.05,  # initial beta of the per-token KL penalty
      kl_in="reward",  # "reward" (per-token penalty), "loss" (a KL term in the loss) or "none"
      kl_estimator="k1",  # reward: k1; loss: k2 or k3_weighted (reverse KL), k3 (forward KL)
      adaptive_kl=False,  # Ziegler et al.'s controller toward target_kl
      target_kl=6.0,  # nats per sequence
      horizon=10000,  # samples over which the controller moves beta
      whiten_rewards=False,
      apply_no_eos_score=True,  # responses that never emit <eos> get no_eos_score
      no_eos_score=-1.0,
  ))
  c.rewards = rewards_section(model=1.0)  # the reward model; add Python functions here
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"
  if preset == "tiny":
    c.train.steps = 40
    c.train.batch_size = 32
    c.train.log_every = 1
    c.eval.every = 10
    c.optimizer.lr = 3e-5
    c.optimizer.warmup_steps = 0
  elif preset == "standard":  # the CPU benchmark workload: 8 prompts x 64 new tokens
    c.train.steps = 200
    c.train.batch_size = 8
    c.ppo.max_new_tokens = 64
    c.ppo.prompt_len = 64
    c.ppo.epochs = 1
    c.ppo.num_minibatches = 1
    c.ppo.kl_coef = 0.04
    c.optimizer.lr = 1e-6
    c.optimizer.warmup_steps = 0
  else:
    raise ValueError(f"unknown preset {preset!r}; presets: tiny, standard")
  return c
