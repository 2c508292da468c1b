"""`make_tokenizer(name_or_path)`: where a config's `tokenizer` string becomes a tokenizer."""

from __future__ import annotations

import os

from alignax.data.schemas import DataError
from alignax.data.tokenizer import ByteTokenizer, Tokenizer


def make_tokenizer(name_or_path: str) -> Tokenizer:
  """"bytes" -> ByteTokenizer; "*.model" -> SentencePieceTokenizer.

  A HuggingFace `tokenizer.json` is not supported yet and says so.
  """
  if name_or_path in ("bytes", "byte"):
    return ByteTokenizer()
  if name_or_path.endswith(".model"):
    from alignax.data.sentencepiece_tokenizer import SentencePieceTokenizer
    return SentencePieceTokenizer(name_or_path)
  if name_or_path.endswith(".json") or os.path.isdir(name_or_path):
    raise DataError(f"tokenizer {name_or_path!r}: HuggingFace tokenizer.json support is not "
                    f"implemented yet; use 'bytes' or a SentencePiece '*.model' file")
  raise DataError(f"unknown tokenizer {name_or_path!r}; expected 'bytes' or a SentencePiece "
                  f"'*.model' file")
