"""An AI feedback model: a chat LM asked a multiple-choice comparison, read as probabilities.

The judge reads `prompts.comparison_prompt(principle, prompt, first, second)` as a user turn
through its own chat template and the label is the normalized probability of each answer
(Bai et al. 2022's soft labels):

  P(first better) = exp(l_A) / (exp(l_A) + exp(l_B)),   l_X = log pi("(X)" | judge prompt)

l_X sums the log-probabilities (nats) of the answer's tokens. `both_orders` asks again with the
two responses swapped and averages P(first better) over the two positions, which cancels a
judge's preference for a position. Scoring is one compiled forward per batch (the RL scoring
path, `generation.scoring.grouped_response_logprobs`: each prompt once, its KV cache shared by
the two answers), on prompts padded to one bucket per call.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from alignax.cai import prompts as cai_prompts
from alignax.cai.constitution import Principle
from alignax.data.chat import encode_prompt
from alignax.generation.sampler import bucket_length
from alignax.generation.scoring import grouped_response_logprobs


@dataclasses.dataclass
class ChatModel:
  """A run's language model with what it takes to talk to it (`load_chat_model`)."""

  lm: object
  params: object
  tokenizer: object
  template: str  # the chat template it was trained with ("markers", "plain", "model")
  stage: str
  workdir: str


def load_chat_model(workdir: str) -> ChatModel:
  """The LM of a run directory (its export, else its latest checkpoint), its tokenizer and the
  chat template it talks through: the one it was trained with; for an imported checkpoint, its
  own Jinja template when it has one (an instruct model), else the role markers."""
  from alignax.config import read_config, world_config, world_section
  from alignax.data.sources import resolve_tokenizer
  from alignax.run_models import RAW_STAGES, chat_template_of, load_policy
  from alignax.data.tokenizers import resolve_chat_template_name
  lm, params, stage, spec = load_policy(workdir)
  try:
    world = read_config(workdir).world
  except Exception:  # an imported run has no config.json: the default world (unused by its tokenizer)
    world = world_section()
  tok = resolve_tokenizer(spec, world=world_config(world))
  # An import was trained by someone else: an instruct checkpoint talks through its own
  # template ("model"); one without a template gets the role markers import-hf added.
  template = (resolve_chat_template_name(spec, "auto") if stage in RAW_STAGES
              else chat_template_of(workdir))
  return ChatModel(lm=lm, params=params, tokenizer=tok, template=template, stage=stage,
                   workdir=workdir)


class ComparisonTooLong(ValueError):
  """Comparison `index` is `length` tokens, more than the judge reads before its answer."""

  def __init__(self, index: int, length: int, limit: int):
    self.index, self.length, self.limit = index, length, limit
    super().__init__(f"comparison {index} is {length} tokens; the judge reads at most {limit} "
                     "before its answer (its model.max_seq_len); shorten the responses")


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One question to the judge: which of `first` and `second` better follows `principle`."""

  principle: Principle
  prompt: object  # str or a message list
  first: str
  second: str


def _choice_rows(model: ChatModel) -> list[list[int]]:
  return [model.tokenizer.encode(c) for c in cai_prompts.CHOICES]


class Judge:
  """Scores comparisons with a chat model: `probs(comparisons) -> [n] P(first better)`."""

  def __init__(self, model: ChatModel, batch_size: int = 64):
    self.model, self.batch_size = model, int(batch_size)
    choices = _choice_rows(model)
    if choices[0] == choices[1]:
      raise ValueError(f"the judge's tokenizer encodes {cai_prompts.CHOICES} identically")
    width = max(len(c) for c in choices)
    self.choice_tokens = np.full((2, width), model.tokenizer.pad_id, np.int32)
    self.choice_mask = np.zeros((2, width), np.float32)
    for i, c in enumerate(choices):
      self.choice_tokens[i, : len(c)] = c
      self.choice_mask[i, : len(c)] = 1
    lm = model.lm

    def choice_logprobs(params, prompt_tokens, prompt_mask, choice_tokens, choice_mask):
      # Each prompt once (its KV cache shared by its two answers), then "(A)" and "(B)":
      # [B, 2] summed logprobs in nats.
      b = prompt_tokens.shape[0]
      ct = jnp.tile(choice_tokens, (b, 1))
      cm = jnp.tile(choice_mask, (b, 1))
      lp = grouped_response_logprobs(lm, params, prompt_tokens, prompt_mask, ct, cm, group_size=2)
      return jnp.sum(lp, axis=1).reshape(b, 2)

    self._score = jax.jit(choice_logprobs)

  def prompt_ids(self, c: Comparison) -> list[int]:
    text = cai_prompts.comparison_prompt(c.principle, c.prompt, c.first, c.second)
    return encode_prompt(self.model.tokenizer, [{"role": "user", "content": text}],
                         template=self.model.template)

  def choice_logprobs(self, comparisons: Sequence[Comparison]) -> np.ndarray:
    """[n, 2] log pi("(A)"), log pi("(B)") in nats (float32 from the model, as float64)."""
    if not comparisons:
      return np.zeros((0, 2))
    tok = self.model.tokenizer
    ids = [self.prompt_ids(c) for c in comparisons]
    limit = self.model.lm.config.max_seq_len - self.choice_tokens.shape[1]
    long = [i for i, r in enumerate(ids) if len(r) > limit]
    if long:
      raise ComparisonTooLong(long[0], len(ids[long[0]]), limit)
    width = min(bucket_length(max(len(r) for r in ids)), limit)
    out = []
    for start in range(0, len(ids), self.batch_size):
      rows = ids[start: start + self.batch_size]
      rows = rows + [rows[0]] * (self.batch_size - len(rows))  # one shape: one compile
      tokens = np.full((len(rows), width), tok.pad_id, np.int32)
      mask = np.zeros((len(rows), width), np.float32)
      for i, r in enumerate(rows):  # left-padded, as the sampler lays prompts out
        tokens[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
      lp = self._score(self.model.params, tokens, mask, self.choice_tokens, self.choice_mask)
      out.append(np.asarray(jax.device_get(lp), np.float64)[: min(self.batch_size, len(ids) - start)])
    return np.concatenate(out)

  def probs(self, comparisons: Sequence[Comparison], both_orders: bool = True) -> np.ndarray:
    """[n] P(first better) in [0, 1], normalized over the two answers (see the module
    docstring); with `both_orders`, the mean over the asked and the swapped order."""
    p = choice_probs(self.choice_logprobs(comparisons))
    if not both_orders:
      return p
    swapped = [dataclasses.replace(c, first=c.second, second=c.first) for c in comparisons]
    return 0.5 * (p + 1.0 - choice_probs(self.choice_logprobs(swapped)))


def choice_probs(logprobs: np.ndarray) -> np.ndarray:
  """[n, 2] answer logprobs -> [n] normalized probability of the first answer, float64."""
  lp = np.asarray(logprobs, np.float64)
  return special.expit(lp[:, 0] - lp[:, 1])
