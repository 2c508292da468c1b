"""Chat templates: how a conversation becomes tokens, and which of them are trained on.

"markers" (the default) uses the tokenizer's role-marker tokens, `<eos>` closing each assistant turn:

  <bos> [<|system|> text] <|user|> text <|assistant|> text <eos> <|user|> text <|assistant|> text <eos>

"plain" writes the roles as text, for tokenizers (e.g. an imported model's) without role markers:

  <bos> [System: text\n] User: text\n Assistant: text <eos> \n User: ...

Either way the loss mask is 1 on the tokens of every assistant turn's text and its `<eos>`, 0 on
everything a user or system wrote and on the role markers. A prompt for generation ends with the
assistant's opening (`<|assistant|>` or "Assistant: ") so the model writes the next turn.

"model" renders with the Jinja template of a Hugging Face tokenizer's own directory, as
transformers' `apply_chat_template` does, BOS included only where the template writes it; the
mask is on the assistant's text and the end-of-turn token(s) after it
(`alignax.data.model_template`).

"auto" (`data.chat_template`'s default) is "model" for a tokenizer with a template of its own
(an imported checkpoint's), else "markers": the byte and SentencePiece tokenizers (the world
tasks) are never rendered any other way than before (`resolve_template`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from alignax.data import model_template
from alignax.data.model_template import NotPrefixStable, TemplateRefused  # noqa: F401 (re-export)
from alignax.data.tokenizer import Tokenizer
from alignax.errors import ConfigError, DataError

Message = Mapping[str, str]


def validate_messages(messages: Sequence[Message]) -> None:
  """Raises ValueError naming the problem when `messages` is not a valid conversation."""
  if not messages:
    raise ValueError("conversation has no messages")
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
      raise ValueError(f"message {i} must be an object with 'role' and 'content'")
    if m["role"] not in ("system", "user", "assistant"):
      raise ValueError(f"message {i} has role {m['role']!r}; expected system, user or assistant")
    if not isinstance(m["content"], str):
      raise ValueError(f"message {i} content must be a string")
    if m["role"] == "system" and i != 0:
      raise ValueError(f"message {i}: a system message may only come first")


TEMPLATES = ("markers", "plain")  # alignax's own, built from tokens (`ChatTemplate`)
NAMES = ("auto", "model") + TEMPLATES  # what `data.chat_template` may say


def resolve_template(tok: Tokenizer, name: str) -> str:
  """The template `name` means for `tok`: "auto" -> "model" when the tokenizer carries its own
  Jinja template (`tok.chat_template`), else "markers"; the others as they are.

  Raises ConfigError naming `data.chat_template` for "model" with a tokenizer without a
  template (or with one that does not compile), ValueError for an unknown name.
  """
  if name not in NAMES:
    raise ValueError(f"unknown chat template {name!r}; templates: {', '.join(NAMES)}")
  source = getattr(tok, "chat_template", None)
  if name == "auto":
    return "model" if source else "markers"
  if name == "model":
    if not source:
      names = getattr(tok, "chat_template_names", ())
      why = (f"its tokenizer_config.json names templates {', '.join(names)} but none 'default'"
             if names else "no chat_template in tokenizer_config.json and no chat_template.jinja")
      raise ConfigError(f"data.chat_template: 'model' renders with the tokenizer's own Jinja "
                        f"template, but {getattr(tok, 'path', type(tok).__name__)} has none "
                        f"({why}); use 'markers' or 'plain'")
    try:
      model_template.check_template(tok)
    except DataError as e:
      raise ConfigError(f"data.chat_template: {e}") from None
  return name


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """Token sequences that open and close each role's turn."""

  name: str = "markers"

  def __post_init__(self):
    if self.name not in TEMPLATES:
      raise ValueError(f"unknown chat template {self.name!r}; templates: {', '.join(TEMPLATES)}")

  def opening(self, tok: Tokenizer, role: str) -> list[int]:
    if self.name == "markers":
      return [tok.role_ids[role]]
    return tok.encode(f"{role.capitalize()}: ")

  def closing(self, tok: Tokenizer, role: str) -> tuple[list[int], list[int]]:
    """(trained, untrained) tokens after a turn's text: an assistant's `<eos>` is a target."""
    if role == "assistant":
      return [tok.eos_id], ([] if self.name == "markers" else tok.encode("\n"))
    return [], ([] if self.name == "markers" else tok.encode("\n"))


def as_template(template: "ChatTemplate | str") -> ChatTemplate:
  return template if isinstance(template, ChatTemplate) else ChatTemplate(template)


def encode_chat(tok: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False,
                template: "ChatTemplate | str" = "markers") -> tuple[list[int], list[int]]:
  """Tokenizes a conversation with a chat template.

  Args:
    tok: any tokenizer with `bos_id`, `eos_id` (and `role_ids` for the "markers" template; an
      HFTokenizer with a `chat_template` for "model").
    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
    add_generation_prompt: append the assistant's opening so a sampler continues as the assistant.
    template: "auto", "model", "markers", "plain", or a ChatTemplate.

  Returns:
    (ids, loss_mask), equal-length lists. loss_mask[t] = 1 where token t is assistant text
    or the `<eos>` (the model template's end-of-turn tokens) that ends an assistant turn.
    "model" raises TemplateRefused (a DataError) for a conversation its template refuses.
  """
  validate_messages(messages)
  if isinstance(template, str):
    template = resolve_template(tok, template)
    if template == "model":
      return model_template.encode(tok, messages, add_generation_prompt=add_generation_prompt)
  template = as_template(template)
  ids, mask = [tok.bos_id], [0]
  for m in messages:
    opening = template.opening(tok, m["role"])
    ids.extend(opening)
    mask.extend([0] * len(opening))
    body = tok.encode(m["content"])
    trained, untrained = template.closing(tok, m["role"])
    learn = 1 if m["role"] == "assistant" else 0
    ids.extend(body + trained + untrained)
    mask.extend([learn] * (len(body) + len(trained)) + [0] * len(untrained))
  if add_generation_prompt:
    opening = template.opening(tok, "assistant")
    ids.extend(opening)
    mask.extend([0] * len(opening))
  return ids, mask


def _as_messages(prompt: str | Sequence[Message]) -> list:
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def encode_prompt(tok: Tokenizer, prompt: str | Sequence[Message],
                  template: "ChatTemplate | str" = "markers") -> list[int]:
  """Ids of a prompt ready for generation: a user turn (or a conversation) then the assistant's
  opening (what `encode_chat(..., add_generation_prompt=True)` gives, without its mask)."""
  messages = _as_messages(prompt)
  if isinstance(template, str) and resolve_template(tok, template) == "model":
    validate_messages(messages)  # (encode_chat validates the other templates' messages)
    ids, _ = model_template.encode(tok, messages, add_generation_prompt=True, with_mask=False)
    return ids
  ids, _ = encode_chat(tok, messages, add_generation_prompt=True, template=template)
  return ids


def special_ids(tok: Tokenizer) -> frozenset[int]:
  """The ids no text produces: a tokenizer's `special_ids`, else bos/eos/pad and the markers."""
  ids = getattr(tok, "special_ids", None)
  if ids is not None:
    return frozenset(ids)
  return frozenset({tok.bos_id, tok.eos_id, tok.pad_id, *getattr(tok, "role_ids", {}).values()})


def drop_turn_end(tok: Tokenizer, ids: Sequence[int], mask: Sequence[float]):
  """(ids, mask) of a conversation whose last assistant turn was cut off before it ended: cut
  after its last trained non-special token, so neither the `<eos>` (markers, plain) nor the
  template's end-of-turn tokens and what follows them (model) are trained or seen."""
  specials = special_ids(tok)
  trained = [t for t in range(len(ids)) if mask[t]]
  text = [t for t in trained if ids[t] not in specials]
  # A turn with no text (nothing trained but its end) ends before its first trained token.
  end = text[-1] + 1 if text else (trained[0] if trained else len(ids))
  return list(ids[:end]), list(mask[:end])
