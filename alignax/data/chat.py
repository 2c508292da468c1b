"""The chat template: role markers from the tokenizer, `<eos>` closing each assistant turn.

A conversation [system?, user, assistant, user, assistant, ...] becomes

  <bos> [<|system|> text] <|user|> text <|assistant|> text <eos> <|user|> text <|assistant|> text <eos>

and the loss mask is 1 on the tokens of every assistant turn's text and its `<eos>`, 0 on
everything a user or system wrote and on the role markers. A prompt for generation ends
with `<|assistant|>` so the model writes the next assistant turn.
"""

from __future__ import annotations

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


def encode_chat(tok: Tokenizer, messages: Sequence[Message], *,
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """Tokenizes a conversation with the role-marker template.

  Args:
    tok: any tokenizer with `bos_id`, `eos_id` and `role_ids`.
    messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
    add_generation_prompt: append `<|assistant|>` so a sampler continues as the assistant.

  Returns:
    (ids, loss_mask), equal-length lists. loss_mask[t] = 1 where token t is assistant text
    or the `<eos>` that ends an assistant turn.
  """
  validate_messages(messages)
  ids, mask = [tok.bos_id], [0]
  for m in messages:
    ids.append(tok.role_ids[m["role"]])
    mask.append(0)
    body = tok.encode(m["content"])
    ids.extend(body)
    if m["role"] == "assistant":
      ids.append(tok.eos_id)
      mask.extend([1] * (len(body) + 1))
    else:
      mask.extend([0] * len(body))
  if add_generation_prompt:
    ids.append(tok.role_ids["assistant"])
    mask.append(0)
  return ids, mask


def encode_prompt(tok: Tokenizer, prompt: str | Sequence[Message]) -> list[int]:
  """Ids of a prompt ready for generation: a user turn (or a conversation) then `<|assistant|>`."""
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
  ids, _ = encode_chat(tok, messages, add_generation_prompt=True)
  return ids


def encode_prompt_response(tok: Tokenizer, prompt: str | Sequence[Message],
                           response: str) -> tuple[list[int], list[int]]:
  """Ids and loss mask of prompt + one assistant response (with its `<eos>`), mask on the response."""
  messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
  return encode_chat(tok, messages + [{"role": "assistant", "content": response}])
