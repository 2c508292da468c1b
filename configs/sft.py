"""Supervised fine-tuning on (prompt, response) demonstrations, from a pretraining export.

  alignax train --config=configs/sft.py:tiny --config.workdir=runs/sft
  alignax train --config=configs/sft.py:tiny --config.data.source=files \
      --config.data.train_files=demos.jsonl --config.init.workdir=runs/my_base

`init.workdir` names the pretraining run to start from; when it has no export, `init.config`
is run into it first. Model shapes come from that export.
"""

from alignax.algorithms.common import init_section
from alignax.config import base_config, world_section


def get_config(preset: str | None = None):
  preset = preset or "tiny"
  c = base_config("sft", preset)
  c.world = world_section()
  c.init = init_section(workdir=f"runs/pretrain_{preset}", config=f"configs/pretrain.py:{preset}")
  c.data.packing = False  # one conversation per row (padded); True packs several per row
  c.data.too_long = "truncate"  # conversations longer than seq_len: "truncate" or "skip" (counted)
  c.optimizer.weight_decay = 0.0
  if preset == "tiny":
    # ~1 min on 2 CPU cores from the pretrain tiny export. Packed rows (~2.7 conversations per
    # 96-token row) give many demonstrations per step in few steps: Adam moves the output rows
    # of tokens that are never SFT targets (held-out facts' names) by ~lr every step, so fewer,
    # bigger steps keep held-out facts answerable.
    c.tokenizer = "world_bpe:512"  # must be the pretraining run's (the export's wins anyway)
    c.data.packing = True
    c.data.seq_len = 96
    c.train.steps = 250
    c.train.batch_size = 32
    c.eval.every = 125
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
  elif preset == "standard":
    c.data.seq_len = 128
    c.train.batch_size = 8
    c.train.steps = 500
    c.optimizer.lr = 1e-4
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
  else:
    raise ValueError(f"unknown preset {preset!r}; presets: tiny, standard")
  return c
