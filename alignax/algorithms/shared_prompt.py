"""Preference pairs in one row: the prompt once, then the chosen and the rejected response.

A pair batch holds two rows per pair, [prompt | chosen] and [prompt | rejected], so the prompt
goes through the model twice. `pack_pairs` lays the pair out as one row of `pair_len` tokens
(`data.pair_len`), built on the device from the two-row batch:

  slots     0 .. P-1      P .. n_c-1          n_c .. n_c+n_r-P-1     rest
  tokens    prompt        chosen response     rejected response      padding
  segment   1             1                   2                      0
  position  0 .. P-1      P .. n_c-1          P .. n_r-1             0

with P = "prompt_len" and n_c, n_r each row's real tokens. The attention mask's `shared_prefix`
(`alignax.models.transformer.attention_mask`) lets segment 2 see the prompt but not the chosen
response, and each token keeps its position in its own sequence, so every hidden state equals
the two-row one: the losses are the same, on about (n_c + n_r - P) / (2 T) of the tokens
(3/4 for a prompt as long as each response).

One prediction needs care. In two rows, the first rejected token is predicted from the prompt's
last position; in the packed row the slot before it is the chosen response's last. Its logprob
(`packed_pair_logps`) and nothing else is read from slot P-1 instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax.losses.lm import next_token_logprobs, sequence_logprobs

Array = jax.Array


def real_len(row: dict) -> Array:
  """[B] real (non-padding) tokens of a right-padded row."""
  return jnp.sum(row["segment_ids"] > 0, axis=1)


def pack_pairs(batch: dict, pair_len: int) -> dict:
  """The one-row layout of a pair batch.

  Args:
    batch: {"chosen", "rejected": LM rows {"tokens", "positions", "segment_ids" [B, T] int32,
      "loss_mask" [B, T]}, "prompt_len" [B] int32}: right-padded rows that both start with
      their pair's `prompt_len` prompt tokens (`alignax.data.pipeline.preference_pipeline`).
    pair_len: L, the packed row's length; every pair must fit (n_c + n_r - P <= L, which the
      pipeline checks for data.pair_len).

  Returns:
    {"tokens", "positions", "segment_ids" [B, L] int32, "shared_prefix" [B] int32 (= P),
    "chosen_mask", "rejected_mask" [B, L] float32 (each side's loss_mask at its packed slots),
    "rejected_start" [B] (slot of the first rejected response token, = n_c),
    "chosen_last", "rejected_last" [B] (slot of each side's last token; 0 for an empty row)}.
  """
  c, r = batch["chosen"], batch["rejected"]
  p = batch["prompt_len"].astype(jnp.int32)
  t = c["tokens"].shape[1]
  n_c, n_r = real_len(c), real_len(r)
  slot = jnp.arange(pair_len)[None, :]
  in_c = slot < n_c[:, None]
  src_r = p[:, None] + slot - n_c[:, None]  # the rejected row's column at each tail slot
  in_r = ~in_c & (src_r < n_r[:, None])
  col_c, col_r = jnp.clip(slot, 0, t - 1), jnp.clip(src_r, 0, t - 1)

  def gather(key, fill):
    from_c = jnp.take_along_axis(c[key], jnp.broadcast_to(col_c, in_c.shape), axis=1)
    from_r = jnp.take_along_axis(r[key], col_r, axis=1)
    return jnp.where(in_c, from_c, jnp.where(in_r, from_r, fill))

  zero = jnp.zeros((), jnp.float32)
  return {
      "tokens": gather("tokens", 0),
      "positions": gather("positions", 0),
      "segment_ids": jnp.where(in_c, 1, jnp.where(in_r, 2, 0)).astype(jnp.int32),
      "shared_prefix": p,
      "chosen_mask": jnp.where(in_c, gather("loss_mask", zero), zero),
      "rejected_mask": jnp.where(in_r, gather("loss_mask", zero), zero),
      "rejected_start": n_c,
      "chosen_last": jnp.maximum(n_c - 1, 0),
      "rejected_last": jnp.maximum(n_c + n_r - p - 1, 0),
  }


def packed_pair_logps(lm, params, batch: dict, pair_len: int) -> tuple[Array, Array]:
  """(chosen [B], rejected [B]) response logprob sums (nats per sequence) of a pair batch, from
  one forward of the packed rows: the same values as two-row `pair_logps`."""
  pk = pack_pairs(batch, pair_len)
  logits, _ = lm.apply(params, pk["tokens"], pk["positions"], pk["segment_ids"],
                       shared_prefix=pk["shared_prefix"])
  lp = next_token_logprobs(logits, pk["tokens"])
  # The first rejected token is predicted from the prompt's last slot (P - 1).
  start = pk["rejected_start"]
  prompt_last = jnp.maximum(pk["shared_prefix"] - 1, 0)
  branch_logits = jnp.take_along_axis(logits, prompt_last[:, None, None], axis=1)[:, 0]
  branch_logits = branch_logits.astype(jnp.float32)
  first_rejected = jnp.take_along_axis(pk["tokens"], jnp.minimum(start, pair_len - 1)[:, None],
                                       axis=1)[:, 0]
  branch = (jnp.take_along_axis(branch_logits, first_rejected[:, None], axis=1)[:, 0]
            - jax.nn.logsumexp(branch_logits, axis=-1))
  lp = jnp.where(jnp.arange(pair_len)[None, :] == start[:, None], branch[:, None], lp)
  return sequence_logprobs(lp, pk["chosen_mask"]), sequence_logprobs(lp, pk["rejected_mask"])


def packed_pair_rewards(model, params, batch: dict, pair_len: int) -> tuple[Array, Array]:
  """(r_chosen [B], r_rejected [B]) of a scalar-head model, read at each side's last token of
  the packed rows: the same values as the two-row forward."""
  pk = pack_pairs(batch, pair_len)
  values = model.values(params, pk["tokens"], pk["positions"], pk["segment_ids"],
                        shared_prefix=pk["shared_prefix"])
  at = lambda idx: jnp.take_along_axis(values, idx[:, None], axis=1)[:, 0]
  return at(pk["chosen_last"]), at(pk["rejected_last"])
