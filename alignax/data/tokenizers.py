"""Which tokenizer a spec names: "bytes", a SentencePiece "*.model" or a Hugging Face
"tokenizer.json" (or a directory holding one). Above the tokenizer implementations, so none of
them imports another."""

from __future__ import annotations

import os

from alignax.data.hf_tokenizer import HFTokenizer
from alignax.data.sentencepiece_tokenizer import SentencePieceTokenizer
from alignax.data.tokenizer import ByteTokenizer, Tokenizer
from alignax.errors import DataError


def make_tokenizer(name_or_path: str) -> Tokenizer:
  """"bytes" -> ByteTokenizer; "*.model" -> SentencePieceTokenizer; a Hugging Face
  `tokenizer.json` (or a directory containing one) -> HFTokenizer."""
  if name_or_path in ("bytes", "byte"):
    return ByteTokenizer()
  if name_or_path.endswith(".model"):
    return SentencePieceTokenizer(name_or_path)
  if name_or_path.endswith(".json") or os.path.isdir(name_or_path):
    if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "tokenizer.json")):
      raise DataError(f"tokenizer {name_or_path!r}: the directory has no tokenizer.json")
    return HFTokenizer(name_or_path)
  raise DataError(f"unknown tokenizer {name_or_path!r}; expected 'bytes', a SentencePiece "
                 f"'*.model' file or a Hugging Face 'tokenizer.json'")
