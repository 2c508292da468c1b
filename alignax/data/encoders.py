"""Record encoders: one validated record -> the numpy arrays of one example.

An encoder is `encode(record) -> example`: a dict of numpy arrays, or a skip marker
(`screening.skip_marker(reason, message)`) for a record the pipeline cannot use; it may add
"_counts" {counter: increment} (truncations). The pipelines in `alignax.data.pipeline` run the
same encoder in the validation pass and in the grain map, so both see the same verdict.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np

from alignax.data import chat
from alignax.data.schemas import EMPTY_TEXT, INVALID, PAIR_TOO_LONG, PROMPT_TOO_LONG
from alignax.data.screening import TOO_LONG, skip_marker as _skip
from alignax.data.tokenizer import ByteTokenizer, Tokenizer, plain_text_bos

Example = dict
Batch = dict
Encoder = Callable[[dict], Example]


def text_ids(tok: Tokenizer, text: str) -> np.ndarray:
  """Token ids [n] int32 of plain text; the byte tokenizer takes a numpy fast path."""
  if isinstance(tok, ByteTokenizer):
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  return np.asarray(tok.encode(text), np.int32)


def lm_row(ids: Sequence[int], mask: Sequence[float], seq_len: int, pad_id: int,
           *, left: bool = False) -> dict[str, np.ndarray]:
  """One sequence as one row of the batch contract, padded to `seq_len`.

  Args:
    ids: [n] token ids, n <= seq_len. mask: [n] loss mask (1 = target).
    left: pad on the left (prompts for generation) instead of the right.

  Returns:
    tokens, positions, segment_ids [seq_len] int32 and loss_mask [seq_len] float32, with
    loss_mask 0 on the first token (nothing precedes it) and on padding.
  """
  n = len(ids)
  sl = slice(seq_len - n, seq_len) if left else slice(0, n)
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[sl] = ids
  segment_ids = np.zeros(seq_len, np.int32)
  segment_ids[sl] = 1
  positions = np.zeros(seq_len, np.int32)
  positions[sl] = np.arange(n, dtype=np.int32)
  loss_mask = np.zeros(seq_len, np.float32)
  loss_mask[sl] = mask
  if n:
    loss_mask[sl.start] = 0.0
  return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids,
          "loss_mask": loss_mask}


def packed_to_contract(batch: Batch) -> Batch:
  """grain's packer output ({tokens, loss_mask} + *_segment_ids, *_positions) -> contract."""
  positions = batch["tokens_positions"]
  return {"tokens": batch["tokens"].astype(np.int32),
          "positions": positions.astype(np.int32),
          "segment_ids": batch["tokens_segment_ids"].astype(np.int32),
          # The first token of each packed segment has no context inside its segment.
          "loss_mask": (batch["loss_mask"] * (positions > 0)).astype(np.float32)}


def template_guarded(encode: Encoder) -> Encoder:
  """`encode`, with a conversation the model's chat template refuses (its `raise_exception`, a
  template that is not prefix-stable for it, ...) an invalid record: the pipeline names it with
  its file and line and applies `bad_records`."""
  @functools.wraps(encode)
  def guarded(rec: dict) -> Example:
    try:
      return encode(rec)
    except chat.TemplateRefused as e:
      return _skip(INVALID, str(e))
  return guarded


def prompt_ids(tok: Tokenizer, prompt: list, template: str) -> list[int]:
  """The prompt as a generator would see it: the conversation so far plus the opening of the
  response (the role marker, or the model template's generation prompt)."""
  return chat.encode_prompt(tok, prompt, template=template)


def prompt_and_response(tok: Tokenizer, prompt: list, response: list, seq_len: int,
                         max_prompt_len: int | None, ended: bool = True,
                         template: str = "markers", known_prompt_ids: list[int] | None = None):
  """(ids [<= T] int32, loss mask [<= T] float32, prompt length, full length) of prompt +
  response, cut to `seq_len`; the mask is on the response's assistant text and eos only.
  `ended=False` drops the final `<eos>` (the model template's end of turn): a response that
  was cut off before ending (`chat.drop_turn_end`).
  `known_prompt_ids`: `prompt_ids(tok, prompt, template)` if already known (both sides of a pair
  share it). The conversation's ids must start with them: a template that renders the prompt
  differently once a response follows raises TemplateRefused (never markers or plain).
  Returns a skip marker instead when the prompt leaves no room for a response token."""
  if known_prompt_ids is None:
    known_prompt_ids = prompt_ids(tok, prompt, template)
  n_prompt = len(known_prompt_ids)
  ids, mask = chat.encode_chat(tok, prompt + response, template=template)
  if list(ids[:n_prompt]) != list(known_prompt_ids):
    raise chat.TemplateRefused(
        f"the chat template ({template}, {getattr(tok, 'path', type(tok).__name__)}) renders "
        f"the prompt with its generation prompt as "
        f"{n_prompt} tokens that do not start the prompt + response rendering, so the response's "
        f"tokens cannot be found (a template must render a response after the prompt it opens)")
  if not ended:
    ids, mask = chat.drop_turn_end(tok, ids, mask)
  mask = np.asarray(mask, np.float32)
  mask[:n_prompt] = 0.0  # assistant turns inside a multi-turn prompt are context, not targets
  too_long_prompt = max_prompt_len is not None and n_prompt > max_prompt_len
  if too_long_prompt or not mask[:seq_len].any():
    limit = max_prompt_len if too_long_prompt else seq_len
    return _skip(PROMPT_TOO_LONG, f"prompt is {n_prompt} tokens, too long for max length "
                 f"{limit} (no response token would fit)")
  return np.asarray(ids[:seq_len], np.int32), mask[:seq_len], n_prompt, len(ids)


def gold_label(rec: dict) -> np.float32:
  """1 when the gold scores rank chosen above rejected, 0 below, -1 when unknown or tied."""
  if "chosen_gold" not in rec or "rejected_gold" not in rec:
    return np.float32(-1.0)
  diff = rec["chosen_gold"] - rec["rejected_gold"]
  return np.float32(1.0 if diff > 0 else 0.0 if diff < 0 else -1.0)


def lm_encoder(tok: Tokenizer, seq_len: int, long_docs: str) -> Encoder:
  """{"text"} -> `<bos> text <eos>`: "tokens" [n] int32, "loss_mask" [n] float32 (all ones);
  cut to `seq_len` under long_docs="truncate" (longer ones are split later, by the screen
  stage). Empty text is an empty_text bad record. The `<bos>` is there only when the
  tokenizer's plain text takes one (`plain_text_bos`: always for bytes and SentencePiece; an
  HF tokenizer's `add_bos`, e.g. not Qwen2's)."""
  bos = [np.int32(tok.bos_id)] if plain_text_bos(tok) else []
  eos = np.int32(tok.eos_id)

  def encode(rec: dict) -> Example:
    body = text_ids(tok, rec["text"])
    if body.size == 0:
      return _skip(EMPTY_TEXT)
    ids = np.concatenate([bos, body, [eos]]).astype(np.int32)
    ex = {"tokens": ids, "loss_mask": np.ones(len(ids), np.float32)}
    if long_docs == "truncate" and len(ids) > seq_len:
      ex = {k: v[:seq_len] for k, v in ex.items()}
      ex["_counts"] = {"truncated": 1, "truncated_tokens": len(ids) - seq_len}
    return ex
  return encode


def sft_encoder(tok: Tokenizer, seq_len: int, too_long: str, template: str) -> Encoder:
  """{"messages"} -> the chat template: "tokens" [n] int32, "loss_mask" [n] float32 (on
  assistant text and its eos), n <= seq_len. Longer conversations are cut ("truncate",
  counted) or skipped (too_long="skip"); a cut that leaves no assistant token is a
  prompt_too_long bad record."""

  def encode(rec: dict) -> Example:
    ids, mask = chat.encode_chat(tok, rec["messages"], template=template)
    ex: Example = {"tokens": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.float32)}
    if len(ids) <= seq_len:
      return ex
    if too_long == "skip":
      return _skip(TOO_LONG, f"conversation is {len(ids)} tokens, longer than seq_len {seq_len}")
    ex = {k: v[:seq_len] for k, v in ex.items()}
    if not ex["loss_mask"][1:].any():
      return _skip(PROMPT_TOO_LONG, f"no assistant token within the first {seq_len} tokens "
                   f"(conversation is {len(ids)} tokens)")
    ex["_counts"] = {"truncated": 1, "truncated_tokens": len(ids) - seq_len}
    return ex
  return template_guarded(encode)


def preference_encoder(tok: Tokenizer, seq_len: int, max_prompt_len: int | None,
                       template: str, pair_len: int = 0) -> Encoder:
  """{"prompt", "chosen", "rejected", ...} -> {"chosen": row, "rejected": row, "prompt_len",
  "valid", "margin", "chosen_prob", "gold_label"}; each row is `lm_row` [seq_len] plus
  "response_len" (its loss tokens), and both rows start with the same `prompt_len` prompt tokens.
  The prompt is encoded once for both sides. `pair_len` > 0: the pair will be packed into one
  row of that many tokens (`alignax.algorithms.shared_prompt`), the prompt once and each side's
  rest after it; a pair that does not fit is a pair_too_long bad record."""

  def side(prompt, response, ended, p_ids):
    out = prompt_and_response(tok, prompt, response, seq_len, max_prompt_len, ended=ended,
                              template=template, known_prompt_ids=p_ids)
    if isinstance(out, dict):
      return out, 0, 0
    ids, mask, _, n_full = out
    row = lm_row(ids, mask, seq_len, tok.pad_id)
    row["response_len"] = np.int32(row["loss_mask"].sum())
    lost = max(0, n_full - seq_len)
    return row, int(lost > 0), lost

  def encode(rec: dict) -> Example:
    # Rendered once: chosen and rejected must both start with these ids (prompt_and_response).
    p_ids = prompt_ids(tok, rec["prompt"], template)
    chosen, t1, lost1 = side(rec["prompt"], rec["chosen"], rec.get("chosen_ended", True), p_ids)
    if "_skip" in chosen:
      return chosen
    rejected, t2, lost2 = side(rec["prompt"], rec["rejected"], rec.get("rejected_ended", True),
                               p_ids)
    if "_skip" in rejected:
      return rejected
    n_prompt = len(p_ids)
    if pair_len:
      n_c, n_r = int(chosen["segment_ids"].sum()), int(rejected["segment_ids"].sum())
      packed = n_c + n_r - n_prompt
      if packed > pair_len:
        return _skip(PAIR_TOO_LONG, f"pair is {packed} tokens with its prompt once (prompt "
                     f"{n_prompt} + chosen {n_c - n_prompt} + rejected {n_r - n_prompt}), longer "
                     f"than data.pair_len {pair_len}")
    ex = {"chosen": chosen, "rejected": rejected, "prompt_len": np.int32(n_prompt),
          "valid": np.float32(1.0),
          "margin": np.float32(rec.get("margin", 0.0)),
          "chosen_prob": np.float32(rec.get("chosen_prob", 1.0)), "gold_label": gold_label(rec)}
    if t1 or t2:
      ex["_counts"] = {"truncated": 1, "truncated_tokens": lost1 + lost2}
    return ex
  return template_guarded(encode)


def unpaired_encoder(tok: Tokenizer, seq_len: int, max_prompt_len: int | None,
                     template: str) -> Encoder:
  """{"prompt", "completion", "label"} -> `lm_row` [seq_len] (loss on the completion) plus
  "response_len", "label" (1 desirable, 0 undesirable) and "valid"."""

  def encode(rec: dict) -> Example:
    out = prompt_and_response(tok, rec["prompt"], rec["completion"], seq_len, max_prompt_len,
                              template=template)
    if isinstance(out, dict):
      return out
    ids, mask, _, n_full = out
    ex = lm_row(ids, mask, seq_len, tok.pad_id)
    ex["response_len"] = np.int32(ex["loss_mask"].sum())
    ex["label"] = np.float32(rec["label"])
    ex["valid"] = np.float32(1.0)
    if n_full > seq_len:
      ex["_counts"] = {"truncated": 1, "truncated_tokens": n_full - seq_len}
    return ex
  return template_guarded(encode)


def prompt_encoder(tok: Tokenizer, prompt_len: int, template: str) -> Encoder:
  """{"prompt"} -> a left-padded generation prompt [prompt_len] ending in the assistant's
  opening: "tokens", "positions", "segment_ids", "mask" (bool), "prompt_len", "valid". A
  longer prompt is a prompt_too_long bad record."""

  def encode(rec: dict) -> Example:
    ids = chat.encode_prompt(tok, rec["prompt"], template=template)
    if len(ids) > prompt_len:
      return _skip(PROMPT_TOO_LONG,
                   f"prompt is {len(ids)} tokens, longer than prompt_len {prompt_len}")
    row = lm_row(ids, np.zeros(len(ids), np.float32), prompt_len, tok.pad_id, left=True)
    return {"tokens": row["tokens"], "mask": row["segment_ids"] > 0,
            "positions": row["positions"], "segment_ids": row["segment_ids"],
            "prompt_len": np.int32(len(ids)), "valid": np.float32(1.0)}
  return template_guarded(encode)
