"""The checkpoint's own chat template (`data.chat_template="model"`): the Jinja template a
Hugging Face tokenizer directory carries, rendered as `transformers`' `apply_chat_template`
renders it, with alignax's loss mask.

Rendering, as transformers does it: jinja's immutable sandbox with `trim_blocks` and
`lstrip_blocks` (plus loop controls), the helpers `raise_exception(message)` and
`strftime_now(format)`, a `tojson` filter that does not HTML-escape, and the variables
`messages`, `add_generation_prompt`, `tools=None`, `documents=None` and the special tokens
tokenizer_config.json names (`bos_token`, `eos_token`, ...; a null one is undefined).

Tokens: the rendered string is tokenized with the tokenizer file's own special tokens parsed
(the template writes `<|im_start|>` as text) and nothing added, so BOS is whatever the template
writes (Llama 3's `{{ bos_token }}`; nothing in Qwen's). Control tokens (the special tokens, and
added tokens the template's text contains) that come from a *message* stay plain text: a user
who types "<|im_end|>" cannot close a turn. That is transformers'
`apply_chat_template(..., sanitize_control_tokens=True)`, token for token; a conversation whose
messages contain no control-token text (every ordinary one) gets exactly the ids of the default
`apply_chat_template(tokenize=True)`, which tokenizes the whole string with specials parsed.

The loss mask is 1 on the assistant's tokens, every assistant turn:
  * a template with `{% generation %}` blocks: the tokens overlapping those blocks
    (transformers' `return_assistant_tokens_mask`);
  * otherwise by prefixes: message i's span is the text that rendering messages[:i+1] adds to
    messages[:i] with the generation prompt (the assistant header), up to and including its
    last control token (the end of turn: `<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`); the
    separator after it (ChatML's "\n") is context. Each prefix's text must be the start of the
    whole conversation's text: a template that rewrites earlier turns once later ones exist
    (Qwen3's drops earlier turns' reasoning) cannot be masked this way, and such a conversation
    is refused (`NotPrefixStable`, an invalid record naming the template and message): give one
    record per assistant turn (each then renders as the last turn), or a template with
    `{% generation %}` blocks.

A conversation the template refuses (`raise_exception`, or any error inside it) raises
`TemplateRefused`; the encoders turn both into invalid records, named with file and line.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from typing import Any, Sequence

from alignax.errors import DataError

# Private-use characters the renderer puts in the text and takes out before tokenizing: around a
# control token a message contained (encoded as plain text), and around a {% generation %} block.
_CONTROL_OPEN, _CONTROL_CLOSE = "\U000F0100", "\U000F0101"
_GEN_OPEN, _GEN_CLOSE = "\U000F0102", "\U000F0103"
_ALL_MARKS = _CONTROL_OPEN + _CONTROL_CLOSE + _GEN_OPEN + _GEN_CLOSE
_MARK = re.compile(f"[{_ALL_MARKS}]")
_MARK_SPLIT = re.compile(f"([{_ALL_MARKS}])")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class TemplateRefused(DataError):
  """The model's chat template cannot render (or mask) this conversation."""


class NotPrefixStable(TemplateRefused):
  """Rendering a prefix of the conversation does not give the start of the whole rendering."""


# --------------------------------------------------------------------------------------------
# The Jinja environment


def _raise_exception(message):
  import jinja2
  raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # jinja's own tojson escapes <, > and & for HTML, which a prompt must not see.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _environment():
  import jinja2
  import jinja2.ext
  import jinja2.sandbox

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: the block's output, between two markers."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
      return _GEN_OPEN + caller() + _GEN_CLOSE

  class Namespace(jinja2.utils.Namespace):
    # The sandbox checks attribute reads; this refuses underscore names on writes too, so a
    # template cannot reach CPython internals through a namespace.
    def __init__(*args, **kwargs):
      self, args = args[0], args[1:]
      for name in dict(*args, **kwargs):
        Namespace._check(name)
      jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name, value):
      Namespace._check(name)
      jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
      if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template cannot set {name!r} on a namespace")

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                     namespace=Namespace)
  return env


@functools.lru_cache(maxsize=32)
def compile_template(source: str):
  """The compiled template of a Jinja source (cached: every record renders with it)."""
  return _environment().from_string(source)


def check_template(tok) -> None:
  """DataError naming the tokenizer when its chat template does not compile."""
  try:
    compile_template(tok.chat_template)
  except Exception as e:  # jinja raises TemplateSyntaxError, and others for odd sources
    raise DataError(f"{tok.path}: the chat template does not compile ({e})") from None


def has_generation_blocks(source: str) -> bool:
  """Whether a template marks the assistant's tokens with `{% generation %}`."""
  return bool(_GENERATION_TAG.search(source))


@functools.lru_cache(maxsize=32)
def _literal_text(source: str) -> str:
  """The template's own text and string constants, joined by NULs (no match across two)."""
  import jinja2
  ast = compile_template(source).environment.parse(source)
  parts = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
  parts |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
  return "\0".join(sorted(parts))


def control_tokens(tok) -> tuple[str, ...]:
  """The tokens a message's text may not produce: every special added token, plus the added
  tokens tokenizer_config.json's `chat_control_tokens` lists, or (without that list) the ones
  the template's text contains (not whitespace ones: Gemma's "\\n" pieces are ordinary text).
  transformers' rule for `sanitize_control_tokens`. Kept on `tok` once found (a tokenizer may
  have thousands of added tokens)."""
  cached = tok.__dict__.get("_chat_control_tokens")
  if cached is not None and cached[0] == tok.chat_template:
    return cached[1]
  added = tok.template_added_tokens
  if tok.chat_control_tokens is not None:
    listed = set(tok.chat_control_tokens)
    found = tuple(c for c, special in added.items() if special or c in listed)
  else:
    literal = _literal_text(tok.chat_template)
    found = tuple(c for c, special in added.items()
                  if special or (c in literal and not c.isspace()))
  tok.__dict__["_chat_control_tokens"] = (tok.chat_template, found)
  return found


@functools.lru_cache(maxsize=32)
def _patterns(controls: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
  """(any control token, a marked control token or a lone marker); longest tokens first, so a
  token wins over the tokens inside it."""
  alternatives = "|".join(map(re.escape, sorted(controls, key=len, reverse=True))) or "(?!)"
  return (re.compile(alternatives),
          re.compile(f"{_CONTROL_OPEN}({alternatives}){_CONTROL_CLOSE}"
                     f"|[{_CONTROL_OPEN}{_CONTROL_CLOSE}]"))


def _mark_controls(value: Any, pattern: re.Pattern) -> Any:
  """Message values with each control token wrapped in markers (and any marker character the
  text itself had dropped, so a record cannot forge one)."""
  if isinstance(value, str):
    return pattern.sub(lambda m: _CONTROL_OPEN + m.group(0) + _CONTROL_CLOSE, _MARK.sub("", value))
  if isinstance(value, dict):
    return {k: _mark_controls(v, pattern) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_mark_controls(v, pattern) for v in value]
  return value


# --------------------------------------------------------------------------------------------
# Rendering and tokenizing


def mark_messages(tok, messages: Sequence[dict]) -> list[dict]:
  """Plain-dict copies of `messages` with their control tokens marked (what `render` takes)."""
  control, _ = _patterns(control_tokens(tok))
  return [_mark_controls(dict(m), control) for m in messages]


def render(tok, msgs: Sequence[dict], add_generation_prompt: bool, what: str = "") -> str:
  """The template's text for `msgs` (from `mark_messages`), with the markers above still in it
  (see `clean`).

  Raises TemplateRefused when the template raises (its `raise_exception`, an undefined
  variable, ...); `what` names the conversation in the message ("messages[:2]").
  """
  try:
    return compile_template(tok.chat_template).render(
        messages=msgs, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
        **tok.template_variables)
  except Exception as e:  # the template is foreign code: anything it raises refuses the record
    where = f" ({what})" if what else ""
    raise TemplateRefused(f"the chat template of {tok.path} refused this conversation{where}: "
                          f"{type(e).__name__}: {e}") from None


def clean(marked: str) -> str:
  """Rendered text without the markers: what transformers' template would have written."""
  return _MARK.sub("", marked)


def _parse(marked: str, marked_control: re.Pattern):
  """(pieces [(text, literal)], generation spans [(start, end)] in clean-text chars).

  Pieces are cut at control markers: a marked control token is one literal piece, a lone marker
  (a template string method split a marked token) is dropped but still ends a piece, so the text
  on its two sides cannot join into a control token.
  """
  spans, opened, pos = [], [], 0
  for part in _MARK_SPLIT.split(marked):
    if part == _GEN_OPEN:
      opened.append(pos)
    elif part == _GEN_CLOSE:
      if opened:
        spans.append((opened.pop(), pos))
    elif part not in (_CONTROL_OPEN, _CONTROL_CLOSE):
      pos += len(part)
  text = marked.replace(_GEN_OPEN, "").replace(_GEN_CLOSE, "")
  split = marked_control.split(text)  # [text, token or None, text, ...]
  pieces = [(p, i % 2 == 1) for i, p in enumerate(split) if p is not None]
  return pieces, sorted(spans)


def _encode_pieces(tok, pieces) -> tuple[list[int], list[tuple[int, int]]]:
  """Ids and clean-text char offsets of the pieces, as transformers' sanitized encoding cuts
  them: the first piece alone, every later one after a "\\n" that is then removed (so a
  SentencePiece model adds no word-start space mid-text), literal pieces with no added token."""
  ids, offsets, start = [], [], 0
  newline, _ = tok.encode_rendered("\n")
  for k, (text, literal) in enumerate(pieces):
    if not text:
      continue
    if k == 0:
      piece_ids, piece_offsets = tok.encode_rendered(text, literal)
    else:
      piece_ids, piece_offsets = tok.encode_rendered("\n" + text, literal)
      if piece_ids[:len(newline)] == newline:
        piece_ids = piece_ids[len(newline):]
        piece_offsets = [(max(a - 1, 0), max(b - 1, 0)) for a, b in piece_offsets[len(newline):]]
      else:
        piece_ids, piece_offsets = tok.encode_rendered(text, literal)
    if literal:
      own = tok.template_token_id(text)
      if own is not None and own in piece_ids:
        raise TemplateRefused(f"{tok.path}: a message contains {text!r}, which this tokenizer "
                              f"also makes from plain text, so it cannot be kept as text")
    ids.extend(piece_ids)
    offsets.extend((a + start, b + start) for a, b in piece_offsets)
    start += len(text)
  return ids, offsets


def _span_mask(ids, offsets, spans, end_ids=None) -> list[int]:
  """1 on every token overlapping a span (a token cut by a span's edge counts, as in
  transformers); with `end_ids`, a span's tokens after its last end-of-turn id are dropped."""
  mask = [0] * len(ids)
  for s, e in spans:
    inside = [t for t, (a, b) in enumerate(offsets) if a < e and b > s]
    if end_ids is not None:
      ends = [t for t in inside if ids[t] in end_ids]
      if ends:
        inside = [t for t in inside if t <= ends[-1]]
    for t in inside:
      mask[t] = 1
  return mask


def _prefix_spans(tok, messages, whole: str) -> list[tuple[int, int]]:
  """Clean-text spans of the assistant messages (marked), by rendering prefixes (module doc)."""
  spans = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    before = render(tok, messages[:i], True, f"messages[:{i}] with the generation prompt")
    after = render(tok, messages[:i + 1], False, f"messages[:{i + 1}]")
    for prefix, what in ((before, f"messages[:{i}] with the generation prompt"),
                         (after, f"messages[:{i + 1}]")):
      if not whole.startswith(prefix):
        k = next((j for j, (a, b) in enumerate(zip(prefix, whole)) if a != b),
                 min(len(prefix), len(whole)))
        raise NotPrefixStable(
            f"the chat template of {tok.path} is not prefix-stable: it renders {what} "
            f"differently from the start of the whole conversation (from character {k}: "
            f"{clean(prefix[k:k + 40])!r} vs {clean(whole[k:k + 40])!r}), so the tokens of "
            f"assistant message {i} cannot be found. A template that rewrites earlier turns "
            f"(Qwen3's drops their reasoning) needs one record per assistant turn, or "
            f"{{% generation %}} blocks")
    start, end = len(clean(before)), len(clean(after))
    if end < start:  # both prefixes of the whole, but the header outgrows the turn itself
      raise NotPrefixStable(
          f"the chat template of {tok.path} is not prefix-stable: its generation prompt after "
          f"messages[:{i}] is longer than what assistant message {i} adds, so that message's "
          f"tokens cannot be found")
    spans.append((start, end))
  return spans


def encode(tok, messages: Sequence[dict], *, add_generation_prompt: bool = False,
           with_mask: bool = True, mask_from: str = "auto") -> tuple[list[int], list[int]]:
  """A conversation through the tokenizer's own template.

  Args:
    tok: an HFTokenizer with a `chat_template`.
    messages: [{"role", "content"}, ...], already validated.
    add_generation_prompt: end with the assistant's header (a prompt for sampling).
    with_mask: compute the loss mask (False: zeros, for prompts).
    mask_from: "generation" ({% generation %} blocks), "prefixes", or "auto" (blocks when the
      template has them).

  Returns:
    (ids, loss_mask), equal-length lists; loss_mask[t] = 1 on assistant tokens (module doc).
  """
  controls = control_tokens(tok)
  _, marked_control = _patterns(controls)
  messages = mark_messages(tok, messages)
  whole = render(tok, messages, add_generation_prompt)
  pieces, generation = _parse(whole, marked_control)
  ids, offsets = _encode_pieces(tok, pieces)
  if not with_mask:
    return ids, [0] * len(ids)
  if mask_from == "auto":
    mask_from = "generation" if has_generation_blocks(tok.chat_template) else "prefixes"
  if mask_from == "generation":
    return ids, _span_mask(ids, offsets, generation)
  if mask_from != "prefixes":
    raise ValueError(f"mask_from={mask_from!r}; expected 'auto', 'generation' or 'prefixes'")
  ends = {i for i in map(tok.template_token_id, controls) if i is not None}
  return ids, _span_mask(ids, offsets, _prefix_spans(tok, messages, whole), ends)
