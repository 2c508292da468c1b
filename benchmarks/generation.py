"""Sampling throughput of the jit KV-cache sampler: generated tokens/s by batch size.

  python benchmarks/generation.py --config=configs/pretrain.py:tiny
  python benchmarks/generation.py --config=configs/pretrain.py:gpt2_small --batch_sizes=1,8 --new_tokens=32

Random-init params of the config's model (speed does not depend on the values), prompts of
`--prompt_len` tokens, exactly `--new_tokens` tokens per row (no <eos> can end a row early: the
eos id is set outside the vocabulary). Reports the median over repeats after a compile run, and
the per-token decode latency. Prints a table and writes JSON.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py:tiny", "Config[:preset].")
_BATCHES = flags.DEFINE_string("batch_sizes", "1,2,4,8,16,32,64", "Comma-separated batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per batch size.")
_OUT = flags.DEFINE_string("out", "", "JSON path (default benchmarks/results/generation_<preset>.json).")


class _NoEos:
  """A tokenizer stand-in whose <eos> never occurs, so every row runs to the length limit."""

  def __init__(self, vocab_size):
    self.eos_id, self.pad_id, self.vocab_size = vocab_size + 1, 0, vocab_size


def benchmark(cfg, batch_sizes, prompt_len, new_tokens, repeats):
  import jax
  import numpy as np

  from alignax import flops
  from alignax.config import resolve
  from alignax.generation import Sampler, SamplingConfig
  from alignax.models import build_lm

  model_cfg = resolve(cfg).model
  lm, params = build_lm(model_cfg, 0)
  sampler = Sampler(lm, _NoEos(model_cfg.vocab_size), SamplingConfig(temperature=1.0, max_new_tokens=new_tokens),
                    min_bucket=prompt_len)
  rng = np.random.default_rng(0)
  rows = []
  for b in batch_sizes:
    tokens = rng.integers(0, model_cfg.vocab_size, (b, prompt_len)).astype(np.int32)
    mask = np.ones((b, prompt_len), bool)

    def run():
      out = sampler.generate_padded(params, tokens, mask, jax.random.key(1))
      jax.block_until_ready(out["tokens"])
      return out

    out = run()  # compile
    assert int(np.asarray(out["lengths"]).min()) == new_tokens
    median, times = flops.median_seconds(run, warmup=0, repeats=repeats)
    rows.append({"batch": b, "seconds": median, "tokens_per_second": b * new_tokens / median,
                 "ms_per_decode_step": 1e3 * median / new_tokens, "runs": times})
  return {"preset": cfg.preset, "platform": jax.devices()[0].platform,
          "device_kind": jax.devices()[0].device_kind, "params": model_cfg.num_params(),
          "dtype": model_cfg.dtype, "prompt_len": prompt_len, "new_tokens": new_tokens, "rows": rows}


def main(_):
  cfg = _CONFIG.value
  batches = [int(b) for b in _BATCHES.value.split(",")]
  result = benchmark(cfg, batches, _PROMPT.value, _NEW.value, _REPEATS.value)
  print(f"{result['preset']}: {result['params'] / 1e6:.2f}M params, {result['dtype']}, "
        f"{result['device_kind']}, prompt {result['prompt_len']} + {result['new_tokens']} new tokens")
  print(f"{'batch':>6} {'seconds':>9} {'tokens/s':>10} {'ms/step':>8}")
  for r in result["rows"]:
    print(f"{r['batch']:>6} {r['seconds']:>9.3f} {r['tokens_per_second']:>10.0f} {r['ms_per_decode_step']:>8.2f}")
  out = _OUT.value or os.path.join(os.path.dirname(__file__), "results",
                                   f"generation_{cfg.preset}_{result['platform']}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
