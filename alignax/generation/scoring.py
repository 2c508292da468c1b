"""Scoring sampled responses with a training-style forward: prompt + response in one sequence.

The one home of response forwards (logprobs, entropies, values, reward-model scores), used by
every RL algorithm and by evaluation.

A rollout keeps the prompt left-padded ([B, P]) and the response right-padded ([B, N]); joined,
every row is `[pad..., prompt, response, pad...]` with segment id 1 on real tokens. Response
token j sits at column P + j and is predicted from column P + j - 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignax.generation.sampler import prompt_layout
from alignax.losses.lm import next_token_entropy, next_token_logprobs
from alignax.models.heads import last_token

Array = jax.Array


def join_prompt_response(prompt_tokens: Array, prompt_mask: Array, response_tokens: Array,
                         response_mask: Array):
  """(tokens, positions, segment_ids) [B, P + N] of left-padded prompts followed by responses."""
  prompt_pos, prompt_seg = prompt_layout(prompt_mask)
  prompt_len = jnp.sum(prompt_mask.astype(jnp.int32), axis=1, keepdims=True)
  n = response_tokens.shape[1]
  response_pos = prompt_len + jnp.arange(n)[None, :]
  response_seg = (response_mask > 0).astype(jnp.int32)
  tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
  positions = jnp.concatenate([prompt_pos, response_pos * response_seg], axis=1)
  segments = jnp.concatenate([prompt_seg, response_seg], axis=1)
  return tokens, positions, segments


def response_logprobs(lm, params, prompt_tokens, prompt_mask, response_tokens, response_mask,
                      temperature: float = 1.0) -> Array:
  """log pi(response_j | prompt, response_<j) for each response token: [B, N] float32 nats,
  0 where response_mask is 0. `temperature` divides the logits (as the sampler does). Under jit
  the unused entropy of `response_logprobs_and_entropy` is never computed."""
  return response_logprobs_and_entropy(lm, params, prompt_tokens, prompt_mask, response_tokens,
                                       response_mask, temperature)[0]


def response_logprobs_and_entropy(lm, params, prompt_tokens, prompt_mask, response_tokens,
                                  response_mask, temperature: float | Array = 1.0):
  """(logprobs [B, N], entropy [B, N]) in nats of the response tokens under logits / temperature
  (the distribution the sampler drew from); 0 where response_mask is 0."""
  tokens, positions, segments = join_prompt_response(prompt_tokens, prompt_mask, response_tokens,
                                                     response_mask)
  logits, _ = lm.apply(params, tokens, positions, segments)
  logits = logits / temperature
  p = prompt_tokens.shape[1]
  lp = next_token_logprobs(logits, tokens)[:, p:] * response_mask
  ent = next_token_entropy(logits)[:, p:] * response_mask
  return lp, ent


def response_values(value_model, params, prompt_tokens, prompt_mask, response_tokens, response_mask):
  """[B, N] values V(s_j) of the state before each response token: a scalar model's output at the
  column that predicts token j (column P + j - 1); 0 where response_mask is 0."""
  tokens, positions, segments = join_prompt_response(prompt_tokens, prompt_mask, response_tokens,
                                                     response_mask)
  values = value_model.values(params, tokens, positions, segments)
  p, n = prompt_tokens.shape[1], response_tokens.shape[1]
  return values[:, p - 1: p - 1 + n] * response_mask


def response_scores(reward_model, params, prompt_tokens, prompt_mask, response_tokens, response_mask):
  """[B] reward-model scores of whole responses: the scalar head at the last real token."""
  tokens, positions, segments = join_prompt_response(prompt_tokens, prompt_mask, response_tokens,
                                                     response_mask)
  return last_token(reward_model.values(params, tokens, positions, segments), segments)


def grouped_response_logprobs(lm, params, prompt_tokens, prompt_mask, response_tokens, response_mask,
                              group_size: int, temperature: float | Array = 1.0) -> Array:
  """`response_logprobs` for rows that come in groups of `group_size` sharing one prompt (GRPO,
  RLOO): each prompt runs through the model once, its KV cache is repeated for its group, and
  only the responses run per row. Equal to `response_logprobs` of the repeated prompts, with
  (group_size - 1) / group_size of the prompt tokens' compute saved (forward and backward).

  Args:
    prompt_tokens, prompt_mask: [G_n, P] the groups' prompts, left-padded.
    response_tokens, response_mask: [G_n * group_size, N], rows of a group adjacent.

  Returns:
    [B, N] float32 nats, 0 where response_mask is 0.
  """
  n_groups, p = prompt_tokens.shape
  n = response_tokens.shape[1]
  positions, segments = prompt_layout(prompt_mask)
  cache = lm.init_cache(n_groups, p + n)
  prompt_logits, cache = lm.apply(params, prompt_tokens, positions, segments, cache)
  rep = lambda x: jnp.repeat(x, group_size, axis=0)
  cache = dict(k=tuple(rep(x) for x in cache["k"]), v=tuple(rep(x) for x in cache["v"]),
               segment_ids=rep(cache["segment_ids"]), end=cache["end"])
  prompt_len = rep(jnp.sum(prompt_mask.astype(jnp.int32), axis=1, keepdims=True))
  seg = (response_mask > 0).astype(jnp.int32)
  pos = (prompt_len + jnp.arange(n)[None, :]) * seg
  response_logits, _ = lm.apply(params, response_tokens, pos, seg, cache)
  # Response token j is predicted from the column before it: the prompt's last for j = 0.
  logits = jnp.concatenate([rep(prompt_logits[:, -1:]), response_logits[:, :-1]], axis=1)
  logits = logits.astype(jnp.float32) / temperature
  target = jnp.take_along_axis(logits, response_tokens[..., None], axis=-1)[..., 0]
  return (target - jax.nn.logsumexp(logits, axis=-1)) * response_mask
