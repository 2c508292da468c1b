"""Train-step throughput and MFU for a config's model, batch and mesh.

  python benchmarks/throughput.py --config=configs/pretrain.py:standard
  python benchmarks/throughput.py --config=configs/pretrain.py:gpt2_small --config.model.dtype=bfloat16
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/throughput.py \
      --config=configs/pretrain.py:standard --config.parallel.mesh.fsdp=8 --config.parallel.mesh.data=1
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/throughput.py \
      --config=configs/pretrain.py:standard --config.parallel.mode=pmap

Times the jitted, donated train step on synthetic tokens (compilation excluded; median of
repeated steps), counts FLOPs as 6N per token plus attention, and divides by a matmul peak
measured on the same device. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py:standard", "Config[:preset].")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
_OUT = flags.DEFINE_string("out", "", "JSON output path (default: benchmarks/results/throughput_<preset>.json).")


def benchmark(cfg, steps: int = 10) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from alignax import flops, parallel
  from alignax.config import resolve
  from alignax.losses.lm import masked_cross_entropy
  from alignax.models import build_lm
  from alignax.train.optimizer import make_optimizer
  from alignax.train.state import TrainState
  from alignax.train.step import make_train_step

  config = resolve(cfg)
  model_cfg = config.model
  b, t = config.train.batch_size, config.data.seq_len
  placement = parallel.make_placement(config.parallel, model_cfg, b)
  lm, params = build_lm(model_cfg, config.seed)
  optimizer = make_optimizer(config.optimizer, config.train.steps)

  def loss_fn(p, batch, rng, extra, hparams):
    logits, _ = lm.apply(p, batch["tokens"], batch["positions"], batch["segment_ids"])
    return masked_cross_entropy(logits, batch["tokens"], batch["loss_mask"])

  state = placement.put_state(TrainState.create(params, optimizer, jax.random.key(0)))
  step = placement.jit_step(make_train_step(loss_fn, optimizer, accum_steps=config.train.accum_steps,
                                            nonfinite_policy=config.train.nonfinite), state)
  rng = np.random.default_rng(0)
  batch = placement.put_batch(dict(
      tokens=rng.integers(0, model_cfg.vocab_size, (b, t)).astype(np.int32),
      positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
      segment_ids=np.ones((b, t), np.int32),
      loss_mask=np.ones((b, t), np.float32)))

  holder = {"state": state}

  def one_step():
    holder["state"], m = step(holder["state"], batch)
    jax.block_until_ready(m["loss"])

  import time
  t0 = time.perf_counter()
  one_step()
  compile_s = time.perf_counter() - t0
  median, times = flops.median_seconds(one_step, warmup=1, repeats=steps)
  devices = placement.mesh.devices.size
  platform = jax.devices()[0].platform
  compute_dtype = jnp.dtype(model_cfg.dtype)
  peak_device = flops.measure_matmul_peak(jnp.bfloat16 if compute_dtype == jnp.bfloat16 else jnp.float32,
                                          n=4096 if platform != "cpu" else 2048)
  # Simulated CPU devices share the same cores: the machine's peak is one device's peak.
  peak = peak_device * (devices if platform != "cpu" else 1)
  tokens = b * t
  flop_per_step = flops.train_flops_per_token(model_cfg, t) * tokens
  mem = {}
  try:
    stats = jax.devices()[0].memory_stats() or {}
    mem = {"peak_bytes_in_use": stats.get("peak_bytes_in_use")}
  except Exception:  # CPU backends may not report memory
    pass
  return {
      "preset": cfg.preset, "platform": platform, "device_kind": jax.devices()[0].device_kind,
      "devices": devices, "mesh": parallel.describe(placement), "mode": cfg.parallel.mode,
      "params": int(model_cfg.num_params()), "dtype": model_cfg.dtype, "remat": model_cfg.remat,
      "batch": b, "seq_len": t, "accum_steps": int(cfg.train.accum_steps),
      "compile_seconds": compile_s, "step_seconds_median": median, "step_seconds": times,
      "tokens_per_second": tokens / median, "flops_per_step": flop_per_step,
      "achieved_flops_per_second": flop_per_step / median, "peak_flops_per_second": peak,
      "mfu": flop_per_step / median / peak, **mem,
  }


def print_table(r: dict) -> None:
  rows = [("preset", r["preset"]), ("device", f"{r['device_kind']} x{r['devices']} ({r['mesh']})"),
          ("params", f"{r['params'] / 1e6:.2f}M"), ("dtype / remat", f"{r['dtype']} / {r['remat']}"),
          ("batch x seq", f"{r['batch']} x {r['seq_len']}"),
          ("compile", f"{r['compile_seconds']:.1f} s"),
          ("step (median)", f"{r['step_seconds_median'] * 1e3:.1f} ms"),
          ("tokens/s", f"{r['tokens_per_second']:,.0f}"),
          ("achieved", f"{r['achieved_flops_per_second'] / 1e9:,.1f} GFLOP/s"),
          ("peak (matmul)", f"{r['peak_flops_per_second'] / 1e9:,.1f} GFLOP/s"),
          ("MFU", f"{100 * r['mfu']:.1f}%")]
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")


def main(_):
  cfg = _CONFIG.value
  result = benchmark(cfg, _STEPS.value)
  print_table(result)
  out = _OUT.value or os.path.join(os.path.dirname(__file__), "results",
                                   f"throughput_{cfg.preset}_{result['platform']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
