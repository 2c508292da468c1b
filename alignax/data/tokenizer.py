"""Tokenizers: a byte-level default that needs no files, behind one small protocol.

Every tokenizer exposes the same attributes and methods, so the data layer and the
chat template never care which one is in use:

  vocab_size, pad_id, bos_id, eos_id, role_ids (dict role -> marker id)
  encode(text) -> list[int]            plain text, special tokens never parsed from it
  decode(ids, skip_special=True) -> str
  encode_batch(texts, max_len, ...) -> (ids [B, T] int32, mask [B, T] bool, num_truncated)

Optional: `add_bos` (whether plain text starts with `bos_id`; read by `plain_text_bos`, True
when absent) and `chat_template` (a Jinja template of the tokenizer's own: HF tokenizers).

The byte tokenizer maps byte b to id b (0..255), followed by the special tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  role_ids: dict[str, int]

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes plus special tokens: <pad>, <bos>, <eos> and one marker per chat role."""

  specials: tuple[str, ...] = ("<pad>", "<bos>", "<eos>") + tuple(f"<|{r}|>" for r in ROLES)

  @property
  def vocab_size(self) -> int:
    return 256 + len(self.specials)

  def special_id(self, name: str) -> int:
    return 256 + self.specials.index(name)

  @property
  def pad_id(self) -> int:
    return self.special_id("<pad>")

  @property
  def bos_id(self) -> int:
    return self.special_id("<bos>")

  @property
  def eos_id(self) -> int:
    return self.special_id("<eos>")

  @property
  def role_ids(self) -> dict[str, int]:
    return {r: self.special_id(f"<|{r}|>") for r in ROLES}

  def encode(self, text: str) -> list[int]:
    """Plain text to ids; special-token names inside `text` stay ordinary bytes."""
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Ids to text. Special tokens are dropped, or rendered by name when `skip_special` is False.

    Byte runs that are not valid UTF-8 (a model may emit any byte) decode with U+FFFD.
    """
    out: list[str] = []
    run = bytearray()
    for i in ids:
      i = int(i)
      if 0 <= i < 256:
        run.append(i)
        continue
      if run:
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
      if not skip_special and 256 <= i < self.vocab_size:
        out.append(self.specials[i - 256])
    if run:
      out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)

  def encode_batch(self, texts: Sequence[str], max_len: int, *, add_bos: bool = True,
                   add_eos: bool = False, pad_side: str = "right"):
    return encode_batch(self, texts, max_len, add_bos=add_bos, add_eos=add_eos, pad_side=pad_side)


def plain_text_bos(tok: Tokenizer) -> bool:
  """Whether plain text (a pretraining document) starts with `bos_id`: a tokenizer's `add_bos`
  (an HF tokenizer's own files decide, see `hf_tokenizer`), True for the others. Chat templates
  decide their BOS themselves."""
  return bool(getattr(tok, "add_bos", True))


def encode_batch(tok: Tokenizer, texts: Sequence[str], max_len: int, *, add_bos: bool = True,
                 add_eos: bool = False, pad_side: str = "right"):
  """Encodes and pads a batch to `max_len`; `add_bos` puts `bos_id` first as asked (whether the
  tokenizer's own plain text takes one is `plain_text_bos`).

  Returns:
    ids: [B, max_len] int32, padded with `tok.pad_id`.
    mask: [B, max_len] bool, True on real tokens.
    num_truncated: how many texts were longer than `max_len` and lost their tail
      (right padding) or head (left padding, which keeps the end next to the generation).
  """
  if pad_side not in ("left", "right"):
    raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
  ids = np.full((len(texts), max_len), tok.pad_id, np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  num_truncated = 0
  for row, text in enumerate(texts):
    seq = ([tok.bos_id] if add_bos else []) + tok.encode(text) + ([tok.eos_id] if add_eos else [])
    if len(seq) > max_len:
      num_truncated += 1
      seq = seq[:max_len] if pad_side == "right" else seq[-max_len:]
    n = len(seq)
    if pad_side == "right":
      ids[row, :n], mask[row, :n] = seq, True
    else:
      ids[row, max_len - n:], mask[row, max_len - n:] = seq, True
  return ids, mask, num_truncated
