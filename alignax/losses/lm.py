"""Language-model losses: per-token logprobs by gather, masked next-token cross-entropy.

Alignment convention (shared by every batch in alignax): arrays are `[B, T]` and aligned with
`tokens`. `logprobs[:, t] = log p(tokens[t] | tokens[<t])`, computed from the logits at t-1;
column 0 has no prediction and is 0. `loss_mask[:, t] = 1` where that prediction counts.

No `[B, T, V]` one-hot or log-softmax is built: the target logit is gathered and the
log-normalizer comes from `logsumexp`, which XLA fuses into one pass over the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def next_token_logprobs(logits: Array, tokens: Array) -> Array:
  """Log-probabilities of each token under the previous position's logits.

  Args:
    logits: [B, T, V] (any float dtype; computed in float32).
    tokens: [B, T] int.

  Returns:
    [B, T] float32 nats; column 0 is 0.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  lp = target_logits - jax.nn.logsumexp(logits, axis=-1)
  return jnp.pad(lp, ((0, 0), (1, 0)))


def next_token_entropy(logits: Array) -> Array:
  """Entropy (nats) of the next-token distribution that predicts each token, aligned like logprobs.

  Args:
    logits: [B, T, V].

  Returns:
    [B, T] float32; column 0 is 0.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return jnp.pad(ent, ((0, 0), (1, 0)))


def masked_cross_entropy(logits: Array, tokens: Array, loss_mask: Array):
  """Summed next-token cross-entropy over the positions `loss_mask` selects.

  Args:
    logits: [B, T, V]; tokens: [B, T] int; loss_mask: [B, T] (1 where tokens[t] is a target).

  Returns:
    (sum of -log p over masked tokens, number of masked tokens, metrics). Divide the first by
    the second for the mean per-token loss in nats; keeping them apart makes gradient
    accumulation and packing exact.
  """
  mask = loss_mask.astype(jnp.float32)
  lp = next_token_logprobs(logits, tokens)
  total = -jnp.sum(lp * mask)
  count = jnp.sum(mask)
  return total, count, {}


def sequence_logprobs(logprobs: Array, mask: Array) -> Array:
  """Per-sequence sums of token logprobs over the mask: [B, T] -> [B] (nats per sequence)."""
  return jnp.sum(logprobs * mask.astype(logprobs.dtype), axis=-1)
