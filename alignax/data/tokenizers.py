"""Which tokenizer a spec names: "bytes", a SentencePiece "*.model" or a Hugging Face
"tokenizer.json" (or a directory holding one). Above the tokenizer implementations, so none of
them imports another."""

from __future__ import annotations

import os

from alignax.data.hf_tokenizer import HFTokenizer, read_chat_template
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


def spec_chat_template(name_or_path: str) -> str | None:
  """The Jinja chat template of the tokenizer a spec names, read from its files without loading
  it (config validation, before a stage runs): an HF tokenizer directory's (or the directory
  of its tokenizer.json), None for every other spec (bytes, SentencePiece, the world BPE)."""
  if name_or_path.endswith(".json") and os.path.isfile(name_or_path):
    directory = os.path.dirname(name_or_path)
  elif os.path.isdir(name_or_path):
    directory = name_or_path
  else:
    return None
  return read_chat_template(directory)[0]


def resolve_chat_template_name(tokenizer_spec: str, name: str) -> str:
  """The concrete `data.chat_template` for a tokenizer: "auto" becomes "model" when the
  tokenizer's files carry a Jinja template, else "markers"; "model" with a tokenizer without one
  is a ConfigError naming data.chat_template (read from the files, so before any stage runs or
  compiles). Runs record the concrete name, so a resume compares like with like."""
  from alignax.errors import ConfigError
  if name not in ("auto", "model"):
    return name
  has_template = bool(spec_chat_template(tokenizer_spec))
  if name == "model" and not has_template:
    raise ConfigError(f"data.chat_template: 'model' renders with the tokenizer's own Jinja "
                      f"template, but tokenizer {tokenizer_spec!r} has none (no chat_template in "
                      f"its tokenizer_config.json, no chat_template.jinja); use 'markers' or "
                      f"'plain'")
  return "model" if has_template else "markers"
