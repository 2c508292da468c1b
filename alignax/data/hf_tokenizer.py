"""A Hugging Face `tokenizer.json` behind the same protocol as `ByteTokenizer`.

Built on the `tokenizers` package (`Tokenizer.from_file`); `transformers` is not needed.

Special tokens:
  bos / eos / pad: named by `tokenizer_config.json` or `special_tokens_map.json` beside the file
    when present, else found by common names ("<s>", "</s>", "<|endoftext|>", ...). A tokenizer
    without a pad token (GPT-2) pads with eos; one without a bos token (Qwen2) uses eos as bos.
  role markers: the chat template needs one id per role. Existing special tokens named
    `<|system|>`, `<|user|>`, `<|assistant|>` are used; missing ones are ADDED as new special
    tokens at ids >= the file's vocabulary, always in that order, so loading the same file
    again gives the same ids. A model used with this tokenizer then needs
    `vocab_size >= tokenizer.vocab_size`: `alignax.models.hf.import_hf(..., pad_vocab_to=...)`
    grows a pretrained embedding (and untied head) to fit, with new rows set to the mean
    embedding (`alignax import-hf` does this itself).

`encode` never adds special tokens (no BOS/EOS template) and never parses special-token text:
"<|user|>" typed by a user stays plain text, so a message cannot forge a turn.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from alignax.data import tokenizer as byte_tokenizer
from alignax.data.tokenizer import ROLES
from alignax.errors import DataError

ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}
# Fallback names, most specific first: the first one the vocabulary has is used.
BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
EOS_NAMES = ("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def resolve_tokenizer_file(path: str) -> str:
  """`path` itself if it is a file, else `path/tokenizer.json`; DataError when neither exists."""
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise DataError(f"{path}: Hugging Face tokenizer file not found")
  return path


def _token_name(value) -> str | None:
  """A special-token entry of tokenizer_config.json: a string, an AddedToken dict, or null."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _read_special_names(directory: str) -> dict[str, str | None]:
  """{"bos"|"eos"|"pad": name or None} from tokenizer_config.json over special_tokens_map.json.

  A key present with null (Qwen2's `"bos_token": null`) means "none"; a missing key means
  "not said" and is left out, so the caller falls back to common names.
  """
  names: dict[str, str | None] = {}
  for filename in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
    file = os.path.join(directory, filename)
    if not os.path.isfile(file):
      continue
    try:
      with open(file, encoding="utf-8") as f:
        values = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"{file}: cannot be read as JSON ({e})") from None
    for kind in ("bos", "eos", "pad"):
      if f"{kind}_token" in values:
        names[kind] = _token_name(values[f"{kind}_token"])
  return names


class HFTokenizer:
  """A `tokenizers` tokenizer with the alignax specials.

  Args:
    path: a `tokenizer.json` file, or a directory containing one (its `tokenizer_config.json` /
      `special_tokens_map.json`, when present, name bos/eos/pad).

  Attributes (the tokenizer protocol): vocab_size, pad_id, bos_id, eos_id, role_ids.
  Also: `added_tokens` (names of the role markers this class added to the file's vocabulary,
  in id order) and `path`.
  Methods: encode(text) -> list[int]; decode(ids, skip_special=True) -> str;
  encode_batch(texts, max_len, ...) -> (ids [B, T] int32, mask [B, T] bool, num_truncated).
  """

  def __init__(self, path: str):
    self.path = resolve_tokenizer_file(path)
    try:
      import tokenizers
    except ImportError:
      raise DataError(f"{self.path}: a Hugging Face tokenizer.json needs the `tokenizers` package "
                      f"(pip install tokenizers)") from None
    try:
      tok = tokenizers.Tokenizer.from_file(self.path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
      raise DataError(f"{self.path}: not a Hugging Face tokenizer.json ({e})") from None
    # The file may carry truncation/padding settings for another pipeline; encode_batch pads.
    tok.no_truncation()
    tok.no_padding()
    # Special-token text inside plain text is tokenized as text (the protocol's guarantee).
    tok.encode_special_tokens = True
    self._tok = tok

    vocab = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()  # {id: AddedToken}
    added_ids = {t.content: i for i, t in added.items()}
    named = _read_special_names(os.path.dirname(self.path))

    def find(kind: str, fallbacks) -> int | None:
      name = named.get(kind)
      if name is not None:
        if name not in vocab:
          raise DataError(f"{self.path}: the {kind} token {name!r} named by tokenizer_config.json "
                          f"is not in the vocabulary")
        return vocab[name]
      # An explicit null is still worth a fallback (Qwen2: no bos, but <|endoftext|> exists).
      return next((vocab[n] for n in fallbacks if n in vocab), None)

    eos = find("eos", EOS_NAMES)
    if eos is None:
      raise DataError(f"{self.path}: no eos token: name one as eos_token in tokenizer_config.json "
                      f"beside it (none of {', '.join(EOS_NAMES)} is in the vocabulary)")
    bos = find("bos", BOS_NAMES)
    pad = find("pad", PAD_NAMES)
    self.eos_id = eos
    self.bos_id = eos if bos is None else bos
    self.pad_id = eos if pad is None else pad  # padding is masked out, so sharing eos is safe

    self.role_ids: dict[str, int] = {}
    self.added_tokens: list[str] = []
    for role, name in ROLE_TOKENS.items():
      if name in vocab and name not in added_ids:
        # A plain vocabulary piece could come out of BPE merges over user text.
        raise DataError(f"{self.path}: {name} is an ordinary vocabulary piece, not a special "
                        f"token, so user text could produce it; it cannot mark chat roles")
      if name not in vocab:
        self.added_tokens.append(name)
      # Re-adding an existing added token keeps its id and makes sure it is special.
      tok.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)])
      self.role_ids[role] = tok.token_to_id(name)

    vocab = tok.get_vocab(with_added_tokens=True)
    # Added-token ids may leave gaps, so the size is the largest id + 1, not the count.
    self.vocab_size = max(vocab.values()) + 1
    self._special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    self._special |= {self.bos_id, self.eos_id, self.pad_id, *self.role_ids.values()}

  def encode(self, text: str) -> list[int]:
    """Plain text to ids: no BOS/EOS added, special-token names inside `text` stay text."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Ids to text. Specials are dropped, or rendered by name when `skip_special` is False;
    ids outside the vocabulary (a model's padded embedding rows) are dropped."""
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    if skip_special:
      ids = [i for i in ids if i not in self._special]
    return self._tok.decode(ids, skip_special_tokens=False)

  def encode_batch(self, texts: Sequence[str], max_len: int, *, add_bos: bool = True,
                   add_eos: bool = False, pad_side: str = "right"):
    return byte_tokenizer.encode_batch(self, texts, max_len, add_bos=add_bos, add_eos=add_eos,
                                       pad_side=pad_side)

  def id_to_token(self, i: int) -> str | None:
    return self._tok.id_to_token(int(i))

  def save(self, directory: str, chat_template: str | None = None) -> str:
    """Writes `tokenizer.json` (with the added role markers, so ids match) and a
    `tokenizer_config.json` naming bos/eos/pad, so `transformers.AutoTokenizer` loads it too.

    The source's tokenizer_config.json entries (its Jinja `chat_template`, ...) and a
    `chat_template.jinja` beside it are kept; `chat_template` replaces the template.
    """
    os.makedirs(directory, exist_ok=True)
    source = os.path.dirname(self.path)
    config = {}
    source_config = os.path.join(source, "tokenizer_config.json")
    if os.path.isfile(source_config):
      with open(source_config, encoding="utf-8") as f:
        config = json.load(f)
    jinja = os.path.join(source, "chat_template.jinja")
    if chat_template is None and os.path.isfile(jinja) and "chat_template" not in config:
      with open(jinja, encoding="utf-8") as f:
        chat_template = f.read()
    path = os.path.join(directory, "tokenizer.json")
    self._tok.save(path)
    names = {k: self._tok.id_to_token(i) for k, i in
             (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))}
    config.pop("added_tokens_decoder", None)  # ids come from tokenizer.json, markers included
    config.update(tokenizer_class="PreTrainedTokenizerFast", **names)
    if chat_template is not None:
      config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
    return path

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"
