"""A SentencePiece tokenizer behind the same protocol as `ByteTokenizer`, and offline training.

The special tokens (<pad>, <bos>, <eos>, and the chat role markers <|system|>, <|user|>,
<|assistant|>) are SentencePiece *control* symbols: they have fixed ids and are never
produced from raw text, so a message that contains the string "<|user|>" cannot forge a turn
(the protocol's "special tokens never parsed from text"). User-defined symbols would be
matched inside text, which is why they are not used for the markers.

`train_sentencepiece` trains a byte-fallback BPE with identity normalization, so decode(encode(s))
gives back s exactly (whitespace included) and no input is ever <unk>.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

from alignax.data import tokenizer as byte_tokenizer
from alignax.data.tokenizer import ROLES
from alignax.errors import DataError

ROLE_PIECES = {r: f"<|{r}|>" for r in ROLES}
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"


def _load(model_file: str):
  import sentencepiece as spm

  if not os.path.isfile(model_file):
    raise DataError(f"{model_file}: SentencePiece model file not found")
  try:
    return spm.SentencePieceProcessor(model_file=model_file)
  except (RuntimeError, OSError) as e:
    raise DataError(f"{model_file}: not a SentencePiece model ({e})") from None


class SentencePieceTokenizer:
  """SentencePiece model with the alignax specials.

  Attributes (the tokenizer protocol): vocab_size, pad_id, bos_id, eos_id, role_ids.
  Methods: encode(text) -> list[int]; decode(ids, skip_special=True) -> str;
  encode_batch(texts, max_len, ...) -> (ids [B, T] int32, mask [B, T] bool, num_truncated).
  """

  def __init__(self, model_file: str):
    self.model_file = model_file
    self._sp = sp = _load(model_file)
    self.vocab_size = sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = sp.pad_id(), sp.bos_id(), sp.eos_id()
    for name, i in (("pad", self.pad_id), ("bos", self.bos_id), ("eos", self.eos_id)):
      if i < 0:
        raise DataError(f"{model_file}: the model has no {name} piece; train it with "
                        f"{name}_id set (train_sentencepiece does)")
    self.role_ids = {}
    for role, piece in ROLE_PIECES.items():
      i = sp.piece_to_id(piece)
      if i == sp.unk_id() or sp.id_to_piece(i) != piece:
        raise DataError(f"{model_file}: the model has no {piece} piece; train it with the role "
                        f"markers as control symbols (train_sentencepiece does)")
      self.role_ids[role] = i
    # Ids decode() must not hand to SentencePiece as text: specials and anything unknown.
    self._special = np.zeros(self.vocab_size, bool)
    for i in [self.pad_id, self.bos_id, self.eos_id, *self.role_ids.values()]:
      self._special[i] = True
    self._special |= np.array([sp.is_control(i) for i in range(self.vocab_size)])

  def encode(self, text: str) -> list[int]:
    """Plain text to ids; special-token names inside `text` stay ordinary text."""
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Ids to text. Specials are dropped, or rendered by name when `skip_special` is False;
    ids outside the vocabulary (a model may emit padding logits) are dropped."""
    out: list[str] = []
    run: list[int] = []
    for i in ids:
      i = int(i)
      if 0 <= i < self.vocab_size and not self._special[i]:
        run.append(i)
        continue
      if run:
        out.append(self._sp.decode(run))
        run = []
      if not skip_special and 0 <= i < self.vocab_size:
        out.append(self._sp.id_to_piece(i))
    if run:
      out.append(self._sp.decode(run))
    return "".join(out)

  def encode_batch(self, texts: Sequence[str], max_len: int, *, add_bos: bool = True,
                   add_eos: bool = False, pad_side: str = "right"):
    return byte_tokenizer.encode_batch(self, texts, max_len, add_bos=add_bos, add_eos=add_eos,
                                       pad_side=pad_side)

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"


def train_sentencepiece(texts: Iterable[str], out_prefix: str, vocab_size: int, *,
                        model_type: str = "bpe", seed_sentences: int = 1_000_000,
                        num_threads: int = 1) -> str:
  """Trains a SentencePiece model offline and returns the path of `<out_prefix>.model`.

  Pieces 0..6 are <pad>, <unk>, <bos>, <eos>, <|system|>, <|user|>, <|assistant|>; then the
  256 byte-fallback pieces; then the learned merges. So `vocab_size` must be at least
  263 + the number of distinct characters in `texts`.

  Args:
    texts: training documents (any iterable of str).
    out_prefix: path prefix; writes `<out_prefix>.model` and `<out_prefix>.vocab`.
    vocab_size: total pieces.
    model_type: "bpe" (default) or "unigram".
    seed_sentences: at most this many texts are used.
    num_threads: trainer threads (1 keeps training deterministic).
  """
  import sentencepiece as spm

  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=out_prefix, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        control_symbols=list(ROLE_PIECES.values()), byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False,
        input_sentence_size=seed_sentences, shuffle_input_sentence=True,
        num_threads=num_threads, minloglevel=2)
  except RuntimeError as e:
    raise DataError(f"SentencePiece training failed: {e}") from None
  return out_prefix + ".model"
