"""DPO and its family of preference losses, from an SFT export.

  alignax train --config=configs/dpo.py:tiny --config.workdir=runs/dpo --config.dpo.beta=0.05
  alignax train --config=configs/dpo.py:tiny --config.dpo.loss_type=ipo
  alignax train --config=configs/dpo.py:tiny --config.dpo.loss_type=kto   # unpaired

`dpo.loss_type`: sigmoid (DPO; with label_smoothing = conservative DPO), robust, ipo, hinge
(SLiC), simpo, orpo, kto. `init.workdir` names the SFT run (run first when missing).
"""

from alignax.algorithms.common import init_section
from alignax.config import ConfigDict, base_config, world_section


def get_config(preset: str | None = None):
  preset = preset or "tiny"
  c = base_config("dpo", preset)
  c.world = world_section()
  c.init = init_section(workdir=f"runs/sft_{preset}", config=f"configs/sft.py:{preset}")
  c.dpo = ConfigDict(dict(
      loss_type="sigmoid",
      beta=0.1,  # inverse temperature (ORPO: weight of the odds-ratio term)
      label_smoothing=0.0,  # eps of conservative / robust DPO
      # sigmoid: fit each record's "chosen_prob" (P(chosen better), default 1) as a soft label;
      # with label_smoothing eps the per-pair eps is eps + (1 - 2 eps)(1 - chosen_prob)
      soft_labels=False,
      gamma=0.5,  # SimPO target margin
      precompute_ref=False,  # reference logprobs once over the dataset instead of every step
      kto_desirable_weight=1.0,
      kto_undesirable_weight=1.0,
  ))
  c.optimizer.weight_decay = 0.0
  if preset == "tiny":
    c.data.seq_len = 96  # world pairs are <= 80 tokens in the world BPE
    c.train.steps = 150
    c.train.batch_size = 16
    c.eval.every = 50
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 10
  elif preset == "standard":  # the CPU benchmark workload: 8 pairs, reference every step
    c.data.seq_len = 128
    c.train.batch_size = 8
    c.train.steps = 500
    c.optimizer.lr = 1e-6
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.dpo.beta = 0.1
  else:
    raise ValueError(f"unknown preset {preset!r}; presets: tiny, standard")
  return c
