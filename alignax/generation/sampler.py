"""A jit-compiled sampler: prefill the prompt into a KV cache, then decode in a `lax.while_loop`.

Prompts are left-padded to a bucketed length (so a run compiles a bounded number of times);
padding has segment id 0 and is never attended to. Each row stops at its first `<eos>`; finished
rows are masked, and the loop ends when every row is done or `max_new_tokens` is reached.

Returned logprobs are those of the distribution each token was drawn from: the model's logits
divided by the temperature, restricted by top-k / top-p and renormalized. With temperature 1 and
no top-k/top-p they equal the training forward's logprobs of the same tokens. Greedy decoding
(temperature 0) returns the model's own (temperature 1) logprobs of the chosen tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import struct

from alignax.models.lm import LanguageModel

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to pick each token.

  temperature: 0 = greedy; otherwise logits are divided by it.
  top_k: keep the k most likely tokens (0 = off).
  top_p: keep the smallest set of tokens whose probability reaches p (1 = off).
  max_new_tokens: longest completion.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 64

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def filter_logits(logits: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """Logits of the sampling distribution: tempered, then top-k / top-p masked with -inf.

  Args:
    logits: [B, V] float32.

  Returns:
    [B, V] float32; `log_softmax` of it gives the sampling logprobs.
  """
  logits = logits.astype(jnp.float32)
  if cfg.temperature > 0:
    logits = logits / cfg.temperature
  if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if cfg.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass strictly before it is < p (the most likely token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < cfg.top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, NEG_INF, logits)
  return logits


def choose_tokens(logits: jax.Array, key: jax.Array, cfg: SamplingConfig):
  """(token [B] int32, its logprob [B]) under the sampling distribution (see module doc).

  `key` is one key for the batch, or [B] keys, one per row (draws then do not depend on which
  other rows share the batch)."""
  if cfg.temperature == 0:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  else:
    filtered = filter_logits(logits, cfg)
    if key.ndim == 1:
      token = jax.vmap(lambda k, l: jax.random.categorical(k, l))(key, filtered).astype(jnp.int32)
    else:
      token = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    logp = jax.nn.log_softmax(filtered, axis=-1)
  return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def prompt_layout(prompt_mask: jax.Array):
  """Positions and segment ids of left-padded prompts [B, P]: positions count real tokens from 0;
  padding gets segment 0."""
  mask = prompt_mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  return positions, mask


class Rollout(struct.PyTreeNode):
  """Sampled responses to left-padded prompts: what RL steps and evaluation score.

  Attributes:
    prompt_tokens: [B, P] int32, left-padded with pad_id.
    prompt_mask: [B, P] bool, True on prompt tokens.
    tokens: [B, N] int32 response tokens (pad_id after a row's end).
    mask: [B, N] float32, 1 on real response tokens (up to and including `<eos>`).
    logprobs: [B, N] float32 nats, the sampling distribution's logprobs of the tokens.
    ended: [B] bool, the row emitted `<eos>` (or another of the tokenizer's stop ids).
  """

  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  ended: jax.Array

  @property
  def lengths(self) -> jax.Array:
    """[B] int32 response lengths in tokens."""
    return jnp.sum(self.mask, axis=1).astype(jnp.int32)

  def masked(self, valid: jax.Array) -> "Rollout":
    """The rollout with rows where `valid` [B] is 0 (filler prompts) masked out entirely."""
    return self.replace(mask=self.mask * valid[:, None])


def generate(lm: LanguageModel, cfg: SamplingConfig, eos_id: int, pad_id: int, params,
             prompt_tokens, prompt_mask, key, row_ids=None, group_size: int = 1) -> Rollout:
  """Samples `group_size` responses to each prompt [P, L] (prefill, then a `while_loop` decode):
  B = P * group_size rows, the samples of a prompt adjacent. Each prompt is prefilled once and its
  KV cache repeated for its group.

  `eos_id` is an id or a tuple of ids (a tokenizer's `stop_ids`): a row ends at any of them.
  With `row_ids` [B] int32, row r draws from `fold_in(key, row_ids[r])`: its samples do not
  depend on the batch's layout (a pmap device's shard draws what the same rows draw on one
  device). Pure and jit-able; `Sampler` wraps it for host use.
  """
  stop = jnp.asarray(eos_id if isinstance(eos_id, (tuple, list)) else (eos_id,), jnp.int32)
  positions, segments = prompt_layout(prompt_mask)
  p = prompt_tokens.shape[1]
  n = cfg.max_new_tokens
  cache = lm.init_cache(prompt_tokens.shape[0], p + n)
  logits, cache = lm.apply(params, prompt_tokens, positions, segments, cache)
  if group_size > 1:
    rep = lambda x: jnp.repeat(x, group_size, axis=0)
    cache = dict(k=tuple(rep(x) for x in cache["k"]), v=tuple(rep(x) for x in cache["v"]),
                 segment_ids=rep(cache["segment_ids"]), end=cache["end"])
    logits, prompt_tokens, prompt_mask = rep(logits[:, -1:]), rep(prompt_tokens), rep(prompt_mask)
  cache = lm.with_layers(params, cache)  # sliced once, not at every decode step
  b = prompt_tokens.shape[0]
  row_keys = None if row_ids is None else jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)
  prompt_len = jnp.sum(prompt_mask.astype(jnp.int32), axis=1)
  state = dict(
      i=jnp.zeros((), jnp.int32), cache=cache, logits=logits[:, -1],
      tokens=jnp.full((b, n), pad_id, jnp.int32), logprobs=jnp.zeros((b, n), jnp.float32),
      mask=jnp.zeros((b, n), jnp.float32), done=jnp.zeros((b,), bool))

  def cond(s):
    return (s["i"] < n) & ~jnp.all(s["done"])

  def body(s):
    i = s["i"]
    step_key = (jax.random.fold_in(key, i) if row_keys is None
                else jax.vmap(lambda k: jax.random.fold_in(k, i))(row_keys))
    token, logp = choose_tokens(s["logits"], step_key, cfg)
    alive = ~s["done"]
    token = jnp.where(alive, token, pad_id)
    tokens = s["tokens"].at[:, i].set(token)
    logprobs = s["logprobs"].at[:, i].set(jnp.where(alive, logp, 0.0))
    mask = s["mask"].at[:, i].set(alive.astype(jnp.float32))
    done = s["done"] | (alive & jnp.isin(token, stop))
    # Finished rows still run through the model (shapes are static) but as padding: segment 0.
    seg = alive.astype(jnp.int32)[:, None]
    logits, cache = lm.apply(params, token[:, None], (prompt_len + i)[:, None], seg, s["cache"])
    return dict(i=i + 1, cache=cache, logits=logits[:, -1], tokens=tokens, logprobs=logprobs,
                mask=mask, done=done)

  out = jax.lax.while_loop(cond, body, state)
  return Rollout(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask, tokens=out["tokens"],
                 mask=out["mask"], logprobs=out["logprobs"], ended=out["done"])


def _generate_dict(lm, cfg, eos_id, pad_id, params, prompt_tokens, prompt_mask, key) -> dict:
  r = generate(lm, cfg, eos_id, pad_id, params, prompt_tokens, prompt_mask, key)
  return dict(tokens=r.tokens, logprobs=r.logprobs, mask=r.mask, lengths=r.lengths, ended=r.ended)


def stop_ids(tokenizer) -> tuple[int, ...]:
  """The ids a response ends at: the tokenizer's `stop_ids` (an imported instruct model's
  end-of-turn tokens besides its eos), else its `eos_id`."""
  return tuple(int(i) for i in getattr(tokenizer, "stop_ids", None) or (tokenizer.eos_id,))


def bucket_length(n: int, minimum: int = 16) -> int:
  """The padded prompt length for n tokens: the next power of two >= max(n, minimum)."""
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class Sampler:
  """Samples completions from an LM, compiling once per (batch, prompt bucket).

  Usage:
    sampler = Sampler(lm, tokenizer, SamplingConfig(temperature=0.7, max_new_tokens=48))
    out = sampler.generate(params, prompt_ids_list, key)   # numpy dict
    texts = sampler.decode(out)
  """

  def __init__(self, lm: LanguageModel, tokenizer, cfg: SamplingConfig, *, min_bucket: int = 16):
    self.lm, self.tokenizer, self.cfg, self.min_bucket = lm, tokenizer, cfg, min_bucket
    self.stop_ids = stop_ids(tokenizer)
    self._fn = jax.jit(functools.partial(_generate_dict, lm, cfg, self.stop_ids, tokenizer.pad_id))
    self.shapes_compiled: set[tuple[int, int]] = set()

  @property
  def num_compiles(self) -> int:
    return len(self.shapes_compiled)

  def pad_prompts(self, prompts: Sequence[Sequence[int]]):
    """Left-pads token lists to a bucketed length: (tokens [B, P] int32, mask [B, P] bool)."""
    longest = max(len(p) for p in prompts)
    p = bucket_length(longest, self.min_bucket)
    limit = self.lm.config.max_seq_len - self.cfg.max_new_tokens
    if p > limit:
      if longest > limit:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={self.cfg.max_new_tokens} "
                         f"exceeds model.max_seq_len={self.lm.config.max_seq_len}")
      p = limit
    tokens = np.full((len(prompts), p), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((len(prompts), p), bool)
    for row, ids in enumerate(prompts):
      tokens[row, p - len(ids):] = ids
      mask[row, p - len(ids):] = True
    return tokens, mask

  def generate_padded(self, params, tokens, mask, key) -> dict:
    """Device arrays (a dict of `Rollout`'s response fields and `lengths`) for already padded
    prompts [B, P]."""
    shape = tuple(tokens.shape)
    if shape not in self.shapes_compiled:
      self.shapes_compiled.add(shape)
      logging.info("sampler: compiling for batch %d x prompt %d (%d shapes so far)", shape[0], shape[1],
                   len(self.shapes_compiled))
    return self._fn(params, tokens, mask, key)

  def generate(self, params, prompts: Sequence[Sequence[int]], key) -> dict:
    """Completions for prompt token lists; returns numpy arrays (see `generate_padded`)."""
    tokens, mask = self.pad_prompts(prompts)
    out = self.generate_padded(params, tokens, mask, key)
    return jax.device_get(out)

  def decode(self, out: dict) -> list[str]:
    """Completion texts (without the `<eos>`)."""
    texts = []
    for row, n in zip(out["tokens"], out["lengths"]):
      ids = [int(t) for t in row[: int(n)] if int(t) not in self.stop_ids]
      texts.append(self.tokenizer.decode(ids))
    return texts
