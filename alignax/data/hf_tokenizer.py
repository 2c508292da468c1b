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

BOS follows the tokenizer's own files:
  `add_bos` says whether plain text (a pretraining document) starts with `bos_id`, as
    transformers' `tokenizer(text)` does: never for a config's `"bos_token": null`; else the
    `add_bos_token` of tokenizer_config.json when it says (transformers 4's fast Llama/Gemma
    tokenizers rebuild their post-processor from it; 5 ignores it beside a tokenizer.json, and
    the published checkpoints' two agree); else whether tokenizer.json's post-processor puts
    the bos token first (Llama 3's TemplateProcessing does; Qwen2's ByteLevel and GPT-2's none
    do not). `bos_id` stays an id for code that needs one (eos when there is no bos).
  The model's own chat template writes its BOS itself (`{{ bos_token }}` in Llama 3's, nothing
    in Qwen's): `template_variables` holds only the specials tokenizer_config.json names, so a
    null `bos_token` is undefined in the template, as in transformers.

`encode` never adds special tokens (no BOS/EOS template) and never parses special-token text:
"<|user|>" typed by a user stays plain text, so a message cannot forge a turn. Text a chat
template rendered goes through `encode_rendered` instead, which parses the tokenizer file's own
special tokens (not the role markers added here), as transformers tokenizes a rendered chat
(`alignax.data.model_template` keeps control tokens that came from message text plain).
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


def _read_json(file: str) -> dict:
  """A JSON object file, {} when it does not exist; DataError when it is not JSON."""
  if not os.path.isfile(file):
    return {}
  try:
    with open(file, encoding="utf-8") as f:
      values = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{file}: cannot be read as JSON ({e})") from None
  if not isinstance(values, dict):
    raise DataError(f"{file}: expected a JSON object")
  return values


def _read_special_names(directory: str, kinds=("bos", "eos", "pad")) -> dict[str, str | None]:
  """{kind: name or None} from tokenizer_config.json over special_tokens_map.json.

  A key present with null (Qwen2's `"bos_token": null`) means "none"; a missing key means
  "not said" and is left out, so the caller falls back to common names.
  """
  names: dict[str, str | None] = {}
  for filename in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
    values = _read_json(os.path.join(directory, filename))
    for kind in kinds:
      if f"{kind}_token" in values:
        names[kind] = _token_name(values[f"{kind}_token"])
  return names


def read_chat_template(directory: str) -> tuple[str | None, tuple[str, ...]]:
  """(the directory's own Jinja chat template or None, the names of its named templates).

  Where transformers finds it: `chat_template.jinja` beside tokenizer.json wins over
  tokenizer_config.json's "chat_template", which is a string or a list of {"name",
  "template"} (the one named "default" is used; a list without one gives None, and the
  names say why).
  """
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read(), ()
  value = _read_json(os.path.join(directory, "tokenizer_config.json")).get("chat_template")
  if isinstance(value, str):
    return (value or None), ()
  if isinstance(value, list):
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    default = named.get("default")
    return (default if isinstance(default, str) and default else None), tuple(map(str, named))
  return None, ()


def _generation_eos_ids(directory: str, path: str) -> tuple[int, ...]:
  """The `eos_token_id` (an int or a list) of generation_config.json beside the tokenizer, where
  instruct checkpoints list their end-of-turn tokens (Llama 3's <|eot_id|>, Gemma's
  <end_of_turn>, Qwen's <|im_end|>); () without one."""
  file = os.path.join(directory, "generation_config.json")
  if not os.path.isfile(file):
    return ()
  value = _read_json(file).get("eos_token_id")
  values = value if isinstance(value, list) else [value]
  if not all(isinstance(v, int) and not isinstance(v, bool) for v in values if v is not None):
    raise DataError(f"{file}: eos_token_id must be an integer or a list of integers, got {value!r}")
  return tuple(int(v) for v in values if v is not None)


def _plain_text_bos(config: dict, tok, bos: int | None) -> bool:
  """Whether transformers' `tokenizer(text)` starts plain text with the bos token: the config's
  `add_bos_token` when it says (v4's fast Llama/Gemma tokenizers rebuild their post-processor
  from it), else whether tokenizer.json's post-processor puts `bos` first (probed)."""
  if bos is None:
    return False
  if "add_bos_token" in config:
    return bool(config["add_bos_token"])
  if tok.post_processor is None:
    return False
  with_specials = tok.encode("a", add_special_tokens=True).ids
  plain = tok.encode("a", add_special_tokens=False).ids
  return bool(with_specials) and with_specials[0] == bos and plain[:1] != [bos]


class HFTokenizer:
  """A `tokenizers` tokenizer with the alignax specials.

  Args:
    path: a `tokenizer.json` file, or a directory containing one (its `tokenizer_config.json` /
      `special_tokens_map.json`, when present, name bos/eos/pad).

  Attributes (the tokenizer protocol): vocab_size, pad_id, bos_id, eos_id, role_ids; stop_ids
  (eos_id, then the other end ids generation_config.json beside the file lists: the sampler
  stops at any of them).
  Also: `added_tokens` (names of the role markers this class added to the file's vocabulary,
  in id order), `path`, `add_bos` (plain text starts with `bos_id`, see above),
  `special_ids` (every special id, markers included), and for the model's own chat template:
  `chat_template` (its Jinja source or None), `chat_template_names` (named templates, when
  there is no default one), `template_variables` ({"bos_token": ..., ...}: the specials the
  config names), `template_added_tokens` ({content: special} of the file's added tokens) and
  `chat_control_tokens` (tokenizer_config.json's list, or None).
  Methods: encode(text) -> list[int]; encode_rendered(text, literal=False) -> (ids, offsets);
  decode(ids, skip_special=True) -> str;
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
    directory = os.path.dirname(self.path)
    named = _read_special_names(directory)
    self._named = named

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
    self.stop_ids = (self.eos_id,) + tuple(i for i in _generation_eos_ids(directory, self.path)
                                           if i != self.eos_id and 0 <= i < self.vocab_size)
    self._init_template(added, directory, None if named.get("bos", "") is None else bos)

  def _init_template(self, file_added: dict, directory: str, bos: int | None) -> None:
    """What rendering the model's own chat template needs, and `add_bos`.

    `file_added`: {id: AddedToken} of the file itself (before the role markers were added).
    Rendered text is tokenized by a second copy of the file (`_rendered`), without the role
    markers this class adds: transformers loads the same file, so "<|user|>" written by a
    Zephyr-style template stays the text pieces transformers gives, and every other id is the
    same in both copies.
    """
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    self.chat_template, self.chat_template_names = read_chat_template(directory)
    names = _read_special_names(directory, ("bos", "eos", "unk", "sep", "pad", "cls", "mask"))
    # transformers passes its named specials to the template; a null or unnamed one is undefined.
    self.template_variables = {f"{k}_token": v for k, v in names.items() if v is not None}
    controls = config.get("chat_control_tokens")
    self.chat_control_tokens = tuple(controls) if isinstance(controls, list) else None
    self.template_added_tokens = {t.content: bool(t.special) for _, t in sorted(file_added.items())}
    # transformers makes every named special an added special token (a vocabulary piece the
    # config names as bos would otherwise come out of BPE as several pieces); only pieces the
    # file has: a new id would collide with the role markers' ids.
    pieces = self._tok.get_vocab(with_added_tokens=False)
    self._named_pieces = [v for v in self.template_variables.values()
                          if v not in self.template_added_tokens and v in pieces]
    self.template_added_tokens.update(dict.fromkeys(self._named_pieces, True))
    self._rendered_tok = None  # built on first use (only the model's template needs them)
    self._literal_tok = None
    self.add_bos = _plain_text_bos(config, self._tok, bos)

  def _rendered(self):
    """The file as transformers loads it: its own added tokens (and named specials) parsed."""
    if self._rendered_tok is None:
      import tokenizers
      tok = tokenizers.Tokenizer.from_file(self.path)
      tok.no_truncation()
      tok.no_padding()
      tok.encode_special_tokens = False  # the template's own <|im_start|> etc. are tokens
      if self._named_pieces:
        tok.add_special_tokens([tokenizers.AddedToken(v, special=True, normalized=False)
                                for v in self._named_pieces])
      self._rendered_tok = tok
    return self._rendered_tok

  @property
  def special_ids(self) -> frozenset[int]:
    """Every special id: added special tokens, bos/eos/pad and the role markers."""
    return frozenset(self._special)

  def encode(self, text: str) -> list[int]:
    """Plain text to ids: no BOS/EOS added, special-token names inside `text` stay text."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_rendered(self, text: str,
                      literal: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, char offsets [(start, end)] into `text`) of chat-template output: no BOS/EOS
    added, and the tokenizer file's own special tokens in `text` parsed as tokens (the template
    writes `<|im_start|>` as text), as transformers tokenizes a rendered chat.

    `literal=True` encodes `text` with no added token matched at all (transformers' encoding of
    a control token a message contained, under `sanitize_control_tokens`).
    """
    tok = self._rendered()
    if literal:
      if self._literal_tok is None:
        self._literal_tok = self._without_added_tokens()
      tok = self._literal_tok
    enc = tok.encode(text, add_special_tokens=False)
    return list(enc.ids), [tuple(o) for o in enc.offsets]

  def template_token_id(self, content: str) -> int | None:
    """The id of an added token of the file (as `encode_rendered` sees it), else None."""
    return self._rendered().token_to_id(content) if content in self.template_added_tokens else None

  def _without_added_tokens(self):
    """The file's pipeline (normalizer, pre-tokenizer, model) with no added-token matching."""
    import tokenizers
    with open(self.path, encoding="utf-8") as f:
      spec = json.load(f)
    spec["added_tokens"] = []
    spec["post_processor"] = None
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    tok.no_truncation()
    tok.no_padding()
    return tok

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
    if chat_template is None and os.path.isfile(jinja):  # the file wins, as `read_chat_template`
      with open(jinja, encoding="utf-8") as f:
        chat_template = f.read()
    path = os.path.join(directory, "tokenizer.json")
    self._tok.save(path)
    names = {k: self._tok.id_to_token(i) for k, i in
             (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id))}
    if chat_template is None and "bos" in self._named and self._named["bos"] is None:
      # The source's own template (kept) saw no bos_token (Qwen2's null): keep it undefined so
      # apply_chat_template renders what alignax trained on. alignax's markers template
      # (`chat_template` given) writes `{{ bos_token }}`, which must name `bos_id`.
      names["bos_token"] = None
    config.pop("added_tokens_decoder", None)  # ids come from tokenizer.json, markers included
    config.update(tokenizer_class="PreTrainedTokenizerFast", **names)
    if chat_template is not None:
      config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2)
    return path

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"
