"""FLOP counts and a measured matmul peak, for tokens/s -> MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from alignax.models.config import ModelConfig


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6N (forward + backward over non-embedding-lookup params) plus
  attention scores and values, 12 * n_layers * n_heads * head_dim * seq_len (PaLM, appendix B).

  N counts every matmul weight, the output projection included; the embedding lookup does no
  multiply, so the input table is left out unless it is tied to the output projection.
  """
  n = cfg.num_params(include_embeddings=False) + cfg.d_model * cfg.vocab_size
  attn = 12 * cfg.n_layers * cfg.n_heads * cfg.dim_per_head * seq_len
  return 6.0 * n + attn


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 10,
                        device: jax.Device | None = None) -> float:
  """Best FLOP/s of an n x n x n matmul chain on one device: the denominator of MFU here."""
  device = device or jax.devices()[0]
  key = jax.random.key(0)
  a = jax.device_put(jax.random.normal(key, (n, n), dtype), device)
  b = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype), device)

  @jax.jit
  def chain(a, b):
    for _ in range(4):
      a = (a @ b) * (1.0 / n)
    return a

  chain(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    chain(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 4 * 2.0 * n ** 3 / best


def median_seconds(fn, warmup: int = 2, repeats: int = 10) -> tuple[float, list[float]]:
  """Median wall seconds of `fn()` (which must block until done) after `warmup` calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), times
