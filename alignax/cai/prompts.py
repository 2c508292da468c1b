"""The three AI-feedback prompts of Constitutional AI, as user messages, and the choice texts.

Each is one user turn that quotes the conversation being judged, so any chat model reads it
through its own chat template (the world's markers, or an imported model's Jinja template):

  comparison  "<principle.comparison>\\nQuestion: <prompt>\\n(A) <a>\\n(B) <b>"  -> "(A)" or "(B)"
  critique    "Question: <prompt>\\nResponse: <response>\\n<principle.critique_request>" -> critique
  revision    "Question: <prompt>\\nResponse: <response>\\nCritique: <critique>\\n
               <principle.revision_request>"                                    -> revised response

The world's demonstrations (`alignax.tasks.feedback`) and the `label` / `revise` commands
build their prompts here, so a judge trained on the former reads exactly what the latter ask.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from alignax.cai.constitution import Principle

CHOICES = ("(A)", "(B)")  # the judge's answer to a comparison: the first or the second response


def conversation_text(prompt) -> str:
  """A prompt (a string, or a message list) as the text quoted in a feedback prompt: a string
  as it is; a conversation as "User: ...\\nAssistant: ..." lines."""
  if isinstance(prompt, str):
    return prompt
  if isinstance(prompt, Sequence) and len(prompt) == 1 and isinstance(prompt[0], Mapping):
    return str(prompt[0]["content"])
  return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def response_text(response) -> str:
  """A response (a string, or a message list whose last message is the reply) as plain text."""
  if isinstance(response, str):
    return response
  return "\n".join(str(m["content"]) for m in response if m.get("role") == "assistant") or \
      str(response[-1]["content"])


def comparison_prompt(principle: Principle, prompt, first: str, second: str) -> str:
  """The user message asking which of two responses better follows `principle`."""
  return (f"{principle.comparison}\nQuestion: {conversation_text(prompt)}\n"
          f"{CHOICES[0]} {first}\n{CHOICES[1]} {second}")


def critique_prompt(principle: Principle, prompt, response: str) -> str:
  """The user message asking for a critique of `response` against `principle`."""
  return (f"Question: {conversation_text(prompt)}\nResponse: {response}\n"
          f"{principle.critique_request}")


def revision_prompt(principle: Principle, prompt, response: str, critique: str) -> str:
  """The user message asking to rewrite `response` in the light of `critique`."""
  return (f"Question: {conversation_text(prompt)}\nResponse: {response}\nCritique: {critique}\n"
          f"{principle.revision_request}")
