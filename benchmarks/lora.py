"""What LoRA saves in a DPO run: the train state's bytes, the compiled step's memory and its time.

  python benchmarks/lora.py [--rank=16] [--targets=all-linear] [--steps=10]

Two parts, each with and without LoRA:
- "state": the bytes of a DPO TrainState (policy + frozen reference + AdamW moments, or the frozen
  base + adapters + AdamW moments over the adapters) for real model shapes (Llama-3.2-1B,
  Qwen3-0.6B in bfloat16), computed from the shapes `jax.eval_shape` gives: nothing is allocated.
- "step": a DPO step (reference forward every step) of the standard CPU workload model (4.46M
  params, float32, 8 pairs of 64 + 64 tokens) run here: the compiled step's memory as XLA
  reports it (arguments, outputs, temporaries) and the median step time after warm-up.
Prints a table and writes JSON (benchmarks/results/lora_<platform>.json).
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank.")
_TARGETS = flags.DEFINE_string("targets", "all-linear", "model.lora.targets.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps of the measured DPO step.")
_OUT = flags.DEFINE_string("out", "", "JSON path (default benchmarks/results/lora_<platform>.json).")

GIB = 1024 ** 3
# Real configs' shapes (their config.json values; tests/data/hf_configs has the same two files).
SHAPES = {
    "llama-3.2-1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                         head_dim=64, d_ff=8192, max_seq_len=2048, tie_embeddings=True),
    "qwen3-0.6b": dict(vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, d_ff=3072, max_seq_len=2048, tie_embeddings=True, qk_norm=True),
}


def _dpo_state(model, lora_cfg, optimizer, params):
  """A DPO run's TrainState as `alignax.algorithms.dpo` builds it."""
  import jax
  import jax.numpy as jnp

  from alignax.models import lora
  from alignax.train.state import TrainState
  if lora_cfg.enabled:
    return TrainState.create(lora.attach(params, lora_cfg, jax.random.key(1)), optimizer, jax.random.key(0),
                             extra={"ref": None})
  return TrainState.create(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(0),
                           extra={"ref": params})


def tree_bytes(tree) -> int:
  """Bytes of a tree of arrays or ShapeDtypeStructs (PRNG keys, a few bytes, are left out)."""
  import jax
  import numpy as np
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def state_bytes(name, lora_cfg, optimizer) -> dict:
  import jax

  from alignax.models import build_lm, llama_style
  from alignax.models.lora import count
  model = llama_style(**SHAPES[name], param_dtype="bfloat16", dtype="bfloat16")

  def build():
    _, params = build_lm(model, 0)
    return _dpo_state(model, lora_cfg, optimizer, params)
  state = jax.eval_shape(build)
  trainable, total = count(state.params)
  return dict(model=name, lora=lora_cfg.enabled, state_gib=tree_bytes(state) / GIB,
              params_gib=tree_bytes(state.params) / GIB, opt_gib=tree_bytes(state.opt_state) / GIB,
              ref_gib=tree_bytes(state.extra) / GIB, trainable=trainable, total=total)


def dpo_step(lora_cfg, optimizer, steps: int) -> dict:
  import jax
  import numpy as np

  from alignax.algorithms.dpo import make_dpo_loss
  from alignax.models import build_lm, llama_style
  from alignax.train.step import make_train_step
  model = llama_style()
  lm, params = build_lm(model, 0)
  state = _dpo_state(model, lora_cfg, optimizer, params)
  rng = np.random.default_rng(0)
  b, t = 8, 128

  def side():
    mask = np.zeros((b, t), np.float32)
    mask[:, 64:] = 1.0
    return dict(tokens=rng.integers(0, model.vocab_size, (b, t)).astype(np.int32),
                positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                segment_ids=np.ones((b, t), np.int32), loss_mask=mask,
                response_len=np.full(b, 64, np.int32))
  batch = dict(chosen=side(), rejected=side(), valid=np.ones(b, np.float32))
  hp = dict(beta=0.1, label_smoothing=0.0, gamma=0.0)
  from alignax.train.state import as_hparams
  state = state.replace(hparams=as_hparams(hp))
  step = jax.jit(make_train_step(make_dpo_loss(lm, "sigmoid"), optimizer), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  mem = compiled.memory_analysis()
  for _ in range(3):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  sec = float(np.median(times))
  out = dict(lora=lora_cfg.enabled, step_s=sec, tokens_per_s=2 * b * t / sec)
  if mem is not None:
    out.update(argument_mib=mem.argument_size_in_bytes / 2 ** 20, output_mib=mem.output_size_in_bytes / 2 ** 20,
               temp_mib=mem.temp_size_in_bytes / 2 ** 20)
  return out


def main(_):
  import jax

  from alignax.models.lora import LoraConfig
  from alignax.train.config import OptimizerConfig
  from alignax.train.optimizer import make_optimizer
  optimizer = make_optimizer(OptimizerConfig(weight_decay=0.0, clip_norm=1.0, schedule="constant",
                                             warmup_steps=0, lr=1e-5), 1000)
  on = LoraConfig(rank=_RANK.value, targets=_TARGETS.value)
  off = LoraConfig()
  states = [state_bytes(name, cfg, optimizer) for name in SHAPES for cfg in (off, on)]
  steps = [dpo_step(cfg, optimizer, _STEPS.value) for cfg in (off, on)]
  print(f"DPO train state (bfloat16), LoRA rank {on.rank} on {on.targets}:")
  print(f"{'model':14} {'lora':5} {'state GiB':>10} {'params':>8} {'ref':>6} {'adam':>6} {'trainable':>12}")
  for r in states:
    print(f"{r['model']:14} {str(r['lora']):5} {r['state_gib']:10.2f} {r['params_gib']:8.2f} "
          f"{r['ref_gib']:6.2f} {r['opt_gib']:6.2f} {r['trainable']:12,d}")
  print(f"\nDPO step, standard CPU workload model ({jax.default_backend()}):")
  print(f"{'lora':5} {'s/step':>8} {'tokens/s':>9} {'args MiB':>9} {'temp MiB':>9}")
  for r in steps:
    print(f"{str(r['lora']):5} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {r.get('argument_mib', 0):9.1f} "
          f"{r.get('temp_mib', 0):9.1f}")
  result = dict(rank=on.rank, targets=on.targets, platform=jax.default_backend(), states=states, steps=steps)
  out = _OUT.value or os.path.join(os.path.dirname(__file__), "results", f"lora_{result['platform']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  app.run(main)
