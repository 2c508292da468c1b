"""Evaluation on the alignment world: sample, score with the gold labeler, summarize.

  samples = sample_prompts(sampler, params, prompts, key, fmt="chat")
  metrics = world_metrics(records, samples)        # gold_reward, accuracy, refusal_rate, ...
  kl = sequence_kl(samples, reference_logprobs)    # nats per sequence

Prompt formats: "chat" wraps the prompt in the chat template (every assistant model); "raw" feeds
`<bos>prompt\\n` (a base model, which never saw role markers, reads a question as text).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import numpy as np

from alignax.data.chat import encode_prompt
from alignax.data.tokenizer import plain_text_bos
from alignax.generation.sampler import Sampler
from alignax.generation.scoring import response_logprobs
from alignax.tasks import world_gold

FORMATS = ("chat", "raw")


@dataclasses.dataclass
class Samples:
  """Responses to a list of prompts, with the token arrays a KL estimate needs.

  texts[i], ended[i]: the response to prompt i and whether it ended with <eos>.
  prompt_tokens/prompt_mask [n, P], tokens/mask/logprobs [n, N]: the sampler's arrays (the
  logprobs are those of the sampling distribution).
  """

  prompts: list
  texts: list[str]
  ended: np.ndarray
  prompt_tokens: np.ndarray
  prompt_mask: np.ndarray
  tokens: np.ndarray
  mask: np.ndarray
  logprobs: np.ndarray

  @property
  def lengths(self) -> np.ndarray:
    return self.mask.sum(axis=1)


def prompt_ids(tok, prompt, fmt: str = "chat", template: str = "markers") -> list[int]:
  if fmt == "chat":
    return encode_prompt(tok, prompt, template=template)
  if fmt == "raw":
    text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    # As pretraining documents are encoded: a BOS only where the tokenizer's plain text has one.
    return ([tok.bos_id] if plain_text_bos(tok) else []) + tok.encode(text + "\n")
  raise ValueError(f"prompt format must be one of {FORMATS}, got {fmt!r}")


def sample_prompts(sampler: Sampler, params, prompts: Sequence, key: jax.Array, *, fmt: str = "chat",
                   batch_size: int = 32, template: str = "markers") -> Samples:
  """Samples one response per prompt, in fixed-size batches (the last one padded by repeating
  prompts, whose outputs are dropped), so one compile serves any number of prompts."""
  ids = [prompt_ids(sampler.tokenizer, p, fmt, template) for p in prompts]
  # One bucket for the whole set, so every batch has the same shape.
  p_tokens, p_mask = sampler.pad_prompts(ids)
  parts = []
  for start in range(0, len(ids), batch_size):
    rows = list(range(start, min(start + batch_size, len(ids))))
    idx = rows + [rows[0]] * (batch_size - len(rows))
    out = sampler.generate_padded(params, p_tokens[idx], p_mask[idx], jax.random.fold_in(key, start))
    out = jax.device_get(out)
    parts.append({k: v[: len(rows)] for k, v in out.items()})
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return Samples(prompts=list(prompts), texts=sampler.decode(out), ended=out["ended"].astype(bool),
                 prompt_tokens=p_tokens, prompt_mask=p_mask, tokens=out["tokens"],
                 mask=out["mask"], logprobs=out["logprobs"])


def texts_as_samples(sampler: Sampler, prompts: Sequence, texts: Sequence[str], *, fmt: str = "chat",
                     template: str = "markers") -> Samples:
  """Samples holding given responses (each ending with `<eos>`), so that reward models and
  reference forwards score fixed texts the way they score sampled ones. logprobs are zeros."""
  tok = sampler.tokenizer
  p_tokens, p_mask = sampler.pad_prompts([prompt_ids(tok, p, fmt, template) for p in prompts])
  resp = [tok.encode(t) + [tok.eos_id] for t in texts]
  width = max(len(r) for r in resp)
  tokens = np.full((len(resp), width), tok.pad_id, np.int32)
  mask = np.zeros((len(resp), width), np.float32)
  for i, r in enumerate(resp):
    tokens[i, : len(r)] = r
    mask[i, : len(r)] = 1
  return Samples(prompts=list(prompts), texts=list(texts), ended=np.ones(len(texts), bool), prompt_tokens=p_tokens,
                 prompt_mask=p_mask, tokens=tokens, mask=mask, logprobs=np.zeros((len(texts), width), np.float32))


def confident_wrong_preferences(sampler: Sampler, prompts: Sequence[str], score, *,
                                template: str = "markers") -> np.ndarray:
  """[n] 1.0 where `score` (Samples -> [n] rewards, e.g. a reward model's) puts a confident wrong
  answer above a plain correct one, over the n fact questions among `prompts`
  (`world_text.confident_wrong_pairs`); what a reward model learns from raters who reward
  confidence (`world.rater_bias=confident`)."""
  from alignax.tasks.world_text import confident_wrong_pairs
  pairs = confident_wrong_pairs(prompts)
  if not pairs:
    return np.zeros(0)
  asked = [p for p, _, _ in pairs]
  wrong = score(texts_as_samples(sampler, asked, [w for _, w, _ in pairs], template=template))
  right = score(texts_as_samples(sampler, asked, [r for _, _, r in pairs], template=template))
  return (np.asarray(wrong) > np.asarray(right)).astype(np.float64)


def gold_scores(prompts: Sequence, texts: Sequence[str], ended: Sequence[bool]) -> np.ndarray:
  """Gold-labeler scores [n] of (prompt, response) pairs."""
  flat = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
  return np.asarray([world_gold.gold_score(p, t, bool(e)) for p, t, e in zip(flat, texts, ended)])


def per_sample_metrics(records: Sequence[dict], samples: Samples) -> dict[str, np.ndarray]:
  """World metrics of each response, [n] float64 arrays, NaN where a metric does not apply.

  gold_reward: gold score; accuracy, quiz_continuation_rate, confident_wrong_rate (a wrong
  answer in a confident, flattering tone): 0/1 on fact prompts; heldout_accuracy: 0/1 on
  held-out fact prompts (absent when there are none); refusal_rate / compliance_rate: 0/1 on
  harmful prompts; eos_rate: 0/1; mean_length: response tokens.
  """
  prompts = [r["prompt"] if isinstance(r["prompt"], str) else r["prompt"][-1]["content"]
             for r in records]
  texts = samples.texts
  n = len(prompts)
  kinds = [r.get("kind") for r in records]

  def where(kind, fn, extra=lambda i: True):
    return np.array([float(fn(i)) if kinds[i] == kind and extra(i) else np.nan for i in range(n)])

  out = {
      "gold_reward": gold_scores(prompts, texts, samples.ended),
      "accuracy": where("fact", lambda i: world_gold.is_correct(prompts[i], texts[i])),
      "quiz_continuation_rate": where("fact", lambda i: world_gold.is_quiz_continuation(texts[i])),
      "confident_wrong_rate": where("fact", lambda i: world_gold.is_confident_wrong(prompts[i], texts[i])),
      "refusal_rate": where("harmful", lambda i: world_gold.is_refusal(texts[i])),
      "compliance_rate": where("harmful", lambda i: world_gold.is_compliance(texts[i])),
      "eos_rate": np.asarray(samples.ended, np.float64),
      "mean_length": np.asarray(samples.lengths, np.float64),
  }
  if any(r.get("heldout") for r in records if r.get("kind") == "fact"):
    out["heldout_accuracy"] = where("fact", lambda i: world_gold.is_correct(prompts[i], texts[i]),
                                    lambda i: bool(records[i].get("heldout")))
  return out


def summarize(per_sample: dict[str, np.ndarray]) -> dict[str, float]:
  """The mean of every per-sample metric over the samples it applies to (NaN when none; an
  infinite value stays in, so the mean shows it)."""
  out = {}
  for name, values in per_sample.items():
    applies = ~np.isnan(values)
    out[name] = float(values[applies].mean()) if applies.any() else float("nan")
  return out


def world_metrics(records: Sequence[dict], samples: Samples) -> dict[str, float]:
  """World metrics of responses to prompt records ({"prompt", "kind", ...}): the means of
  `per_sample_metrics` (gold_reward, accuracy, refusal_rate, ...)."""
  return summarize(per_sample_metrics(records, samples))


def win_rate(gold_a: np.ndarray, gold_b: np.ndarray) -> float:
  """P(a beats b) under the gold labeler, ties counting one half."""
  gold_a, gold_b = np.asarray(gold_a), np.asarray(gold_b)
  return float(np.mean((gold_a > gold_b) + 0.5 * (gold_a == gold_b)))


@functools.lru_cache(maxsize=8)
def _logprob_fn(lm):
  # One compiled function per model architecture (LanguageModel is hashable).
  return jax.jit(lambda p, a, b, c, d: response_logprobs(lm, p, a, b, c, d))


def map_sample_batches(fn, params, samples: Samples, batch_size: int) -> np.ndarray:
  """`fn(params, prompt_tokens, prompt_mask, tokens, mask)` over the samples in fixed-size batches
  (the last one padded by repeating a row, so one compiled shape serves all), results concatenated
  along rows with the padding dropped."""
  parts = []
  n = len(samples.texts)
  for start in range(0, n, batch_size):
    rows = list(range(start, min(start + batch_size, n)))
    idx = rows + [rows[0]] * (batch_size - len(rows))
    out = fn(params, samples.prompt_tokens[idx], samples.prompt_mask[idx], samples.tokens[idx],
             samples.mask[idx])
    parts.append(np.asarray(jax.device_get(out))[: len(rows)])
  return np.concatenate(parts)


def reference_logprobs(lm, params, samples: Samples, batch_size: int = 32) -> np.ndarray:
  """[n, N] logprobs of the sampled response tokens under another model (e.g. the reference)."""
  return map_sample_batches(_logprob_fn(lm), params, samples, batch_size)


def sequence_kls(samples: Samples, ref_logprobs: np.ndarray) -> np.ndarray:
  """[n] per-sample k1 terms sum_t [log pi(y_t) - log ref(y_t)] in nats: their mean is
  `sequence_kl`."""
  return np.sum((samples.logprobs - ref_logprobs) * samples.mask, axis=1).astype(np.float64)


def sequence_kl(samples: Samples, ref_logprobs: np.ndarray) -> float:
  """KL(pi || ref) per sequence in nats, by the unbiased k1 estimate over samples from pi:
  mean_i sum_t [log pi(y_t) - log ref(y_t)]. Needs samples drawn at temperature 1 without
  top-k/top-p, so that `samples.logprobs` are the policy's own."""
  return float(np.mean(sequence_kls(samples, ref_logprobs)))


def sample_table(prompts: Sequence, columns: dict[str, Sequence[str]], width: int = 90) -> str:
  """A markdown table: one row per prompt, one column per model."""
  def cell(text):
    text = text.replace("|", "\\|").replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"
  names = list(columns)
  lines = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  for i, p in enumerate(prompts):
    prompt = p if isinstance(p, str) else p[-1]["content"]
    lines.append(f"| {cell(prompt)} | " + " | ".join(cell(columns[n][i]) for n in names) + " |")
  return "\n".join(lines)
