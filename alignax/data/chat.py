"""Chat templates: how a conversation becomes tokens, and which of them are trained on.

"markers" (the default) uses the tokenizer's role-marker tokens, `<eos>` closing each assistant turn:

  <bos> [<|system|> text] <|user|> text <|assistant|> text <eos> <|user|> text <|assistant|> text <eos>

"plain" writes the roles as text, for tokenizers (e.g. an imported model's) without role markers:

  <bos> [System: text\n] User: text\n Assistant: text <eos> \n User: ...

Either way the loss mask is 1 on the tokens of every assistant turn's text and its `<eos>`, 0 on
everything a user or system wrote and on the role markers. A prompt for generation ends with the
assistant's opening (`<|assistant|>` or "Assistant: ") so the model writes the next turn.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from alignax.data.tokenizer import Tokenizer

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


TEMPLATES = ("markers", "plain")


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
    tok: any tokenizer with `bos_id`, `eos_id` (and `role_ids` for the "markers" template).
    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
    add_generation_prompt: append the assistant's opening so a sampler continues as the assistant.
    template: "markers", "plain", or a ChatTemplate.

  Returns:
    (ids, loss_mask), equal-length lists. loss_mask[t] = 1 where token t is assistant text
    or the `<eos>` that ends an assistant turn.
  """
  validate_messages(messages)
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
  opening."""
  ids, _ = encode_chat(tok, _as_messages(prompt), add_generation_prompt=True, template=template)
  return ids
