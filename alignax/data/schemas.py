"""Record schemas: one validator per kind of record, each returning a normalized record.

Accepted inputs and what they normalize to (keys starting with "_" are metadata, e.g.
"_source": "data/sft.jsonl:17", and are carried through untouched):

  text        {"text": str}                                   -> {"text"}
  sft         {"prompt": str | messages, "response": str}
              or TRL's {"prompt": str | messages, "completion": str | messages}
              or {"messages": [{"role", "content"}, ...]}      -> {"messages"}
  preference  {"prompt": str, "chosen": str, "rejected": str}
              or conversational: "prompt" a message list or absent, "chosen"/"rejected"
              message lists ending with an assistant turn     -> {"prompt", "chosen", "rejected"},
              all three message lists; chosen/rejected hold only the continuation after the
              shared prompt (an absent prompt is the longest shared leading run of messages)
  unpaired    {"prompt": str | messages, "completion": str | messages, "label": bool}
                                                              -> {"prompt", "completion", "label"}
  prompts     {"prompt": str | messages, ...extra}            -> the same, extras kept

Every validator accepts its own output, so normalizing twice is harmless (the pipelines
validate every record they read, whatever the source).

Two kinds of problems are kept apart:
  * a record that does not fit its schema (missing field, wrong type): the validator raises
    `DataError` with a message naming the field;
  * a record that fits but is useless for training (`record_issue`): chosen and rejected
    identical, an empty response, an empty text. The pipelines find these in a validation pass
    over the whole source before the first batch and, by the `bad_records` policy ("error" or
    "skip"), stop with a message or skip them (counted once per record). "Prompt longer than
    the max length" needs a tokenizer and is decided in the pipelines.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from alignax.data import chat
from alignax.errors import DataError  # noqa: F401  (raised here; importable from here)

SCHEMAS = ("text", "sft", "preference", "unpaired", "prompts")
BAD_RECORD_POLICIES = ("error", "skip")

# Short names of the usable-but-bad cases, used as counter keys ("skipped/<reason>").
IDENTICAL_PAIR = "identical_pair"
EMPTY_RESPONSE = "empty_response"
PROMPT_TOO_LONG = "prompt_too_long"
PAIR_TOO_LONG = "pair_too_long"  # a preference pair longer than data.pair_len in one row
EMPTY_TEXT = "empty_text"
INVALID = "invalid"

_ISSUE_MESSAGES = {
    IDENTICAL_PAIR: "chosen and rejected are identical",
    EMPTY_RESPONSE: "a response is empty",
    EMPTY_TEXT: "the text is empty",
}




def check_policy(bad_records: str) -> str:
  """Returns `bad_records` if it is a known policy, else raises DataError."""
  if bad_records not in BAD_RECORD_POLICIES:
    raise DataError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got {bad_records!r}")
  return bad_records


def check_schema(schema: str) -> str:
  if schema not in SCHEMAS:
    raise DataError(f"unknown schema {schema!r}; expected one of {SCHEMAS}")
  return schema


# ----------------------------------------------------------------------------- field helpers


def _require(record: Mapping[str, Any], key: str) -> Any:
  if key not in record:
    raise DataError(f"missing field {key!r}")
  value = record[key]
  if value is None:
    raise DataError(f"field {key!r} is null")
  return value


def _string(record: Mapping[str, Any], key: str) -> str:
  value = _require(record, key)
  if not isinstance(value, str):
    raise DataError(f"field {key!r} must be a string, got {type(value).__name__}")
  return value


def _messages(value: Any, key: str) -> list[dict[str, str]]:
  """A validated copy of a message list (only 'role' and 'content' kept)."""
  if not isinstance(value, (list, tuple)):
    raise DataError(f"field {key!r} must be a string or a list of messages, "
                    f"got {type(value).__name__}")
  try:
    chat.validate_messages(value)
  except ValueError as e:
    raise DataError(f"field {key!r}: {e}") from None
  return [{"role": m["role"], "content": m["content"]} for m in value]


def _as_prompt(value: Any, key: str = "prompt") -> list[dict[str, str]]:
  """A prompt: a string is one user turn; a list is a conversation so far."""
  if isinstance(value, str):
    return [{"role": "user", "content": value}]
  return _messages(value, key)


def _as_response(value: Any, key: str) -> list[dict[str, str]]:
  """A response: a string is one assistant turn; a list must end with an assistant turn."""
  if isinstance(value, str):
    return [{"role": "assistant", "content": value}]
  msgs = _messages(value, key)
  if msgs[-1]["role"] != "assistant":
    raise DataError(f"field {key!r} must end with an assistant message, "
                    f"ends with {msgs[-1]['role']!r}")
  return msgs


def _check_conversation(msgs: list[dict[str, str]], what: str) -> None:
  try:
    chat.validate_messages(msgs)
  except ValueError as e:
    raise DataError(f"{what}: {e}") from None


def _meta(record: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in record.items() if isinstance(k, str) and k.startswith("_")}


def _mapping(record: Any) -> Mapping[str, Any]:
  if not isinstance(record, Mapping):
    raise DataError(f"a record must be a JSON object, got {type(record).__name__}")
  return record


# ----------------------------------------------------------------------------- validators


def validate_text(record: Any) -> dict[str, Any]:
  """{"text": str} -> {"text"}; other non-metadata fields are dropped."""
  record = _mapping(record)
  return {"text": _string(record, "text"), **_meta(record)}


def validate_sft(record: Any) -> dict[str, Any]:
  """{"prompt", "response"} or {"messages"} -> {"messages"} with at least one assistant turn."""
  record = _mapping(record)
  if "messages" in record:
    msgs = _messages(_require(record, "messages"), "messages")
  elif "completion" in record:  # TRL's prompt-completion form, plain or conversational
    if "label" in record:
      raise DataError("a record with 'completion' and 'label' is unpaired (KTO) data, not SFT "
                      "demonstrations: training on it would imitate the bad completions too")
    prompt = _as_prompt(_require(record, "prompt"))
    msgs = prompt + _as_response(record["completion"], "completion")
    _check_conversation(msgs, "prompt + completion")
  elif "prompt" in record or "response" in record:
    prompt = _as_prompt(_require(record, "prompt"))
    msgs = prompt + [{"role": "assistant", "content": _string(record, "response")}]
    _check_conversation(msgs, "prompt + response")
  else:
    raise DataError("missing field 'messages' (or 'prompt' and 'response' / 'completion')")
  if not any(m["role"] == "assistant" for m in msgs):
    raise DataError("conversation has no assistant message to learn from")
  return {"messages": msgs, **_meta(record)}


def _split_shared_prefix(chosen: list, rejected: list) -> tuple[list, list, list]:
  """(prompt, chosen_rest, rejected_rest): the longest shared leading run of messages is the
  prompt. Identical lists keep their last message as the response so the pair stays a pair
  (and `record_issue` reports it as identical)."""
  n = 0
  while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
    n += 1
  if n == len(chosen) and n == len(rejected):
    n -= 1
  return chosen[:n], chosen[n:], rejected[n:]


def validate_preference(record: Any) -> dict[str, Any]:
  """Both forms -> {"prompt", "chosen", "rejected"} message lists, responses after the prompt."""
  record = _mapping(record)
  chosen = _as_response(_require(record, "chosen"), "chosen")
  rejected = _as_response(_require(record, "rejected"), "rejected")
  if "prompt" in record and record["prompt"] is not None:
    prompt = _as_prompt(record["prompt"])
  else:
    prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
    if not prompt:
      raise DataError("missing field 'prompt' (and chosen/rejected share no leading messages "
                      "to use as the prompt)")
    if not chosen or not rejected:
      raise DataError("chosen/rejected have no response after their shared messages")
    for key, rest in (("chosen", chosen), ("rejected", rejected)):
      if rest[-1]["role"] != "assistant":
        raise DataError(f"field {key!r} must end with an assistant message")
  _check_conversation(prompt + chosen, "prompt + chosen")
  _check_conversation(prompt + rejected, "prompt + rejected")
  out = {"prompt": prompt, "chosen": chosen, "rejected": rejected, **_meta(record)}
  out.update(_preference_extras(record))
  return out


# Optional per-pair fields a preference record may carry:
#   chosen_ended / rejected_ended (bool, default true): false when that response was cut off
#     before <eos> (a sampler hit its length limit), so no <eos> is appended to it;
#   margin (number, default 0): the Bradley-Terry margin of this pair;
#   chosen_gold / rejected_gold (number): gold scores, when known, to measure accuracy;
#   chosen_prob (number in [0, 1], default 1): a soft label, the probability that `chosen` is
#     the better response (an AI judge's P(chosen better), as in RLAIF); 1 is the hard label,
#     0.5 says the pair carries no preference. Used by reward.soft_labels / dpo.soft_labels.
PREFERENCE_FLAGS = ("chosen_ended", "rejected_ended")
PREFERENCE_NUMBERS = ("margin", "chosen_gold", "rejected_gold", "chosen_prob")
# Numbers with a bounded range: (low, high), both included.
PREFERENCE_RANGES = {"chosen_prob": (0.0, 1.0)}
_FLOAT32_MAX = 3.4028234663852886e38


def _preference_extras(record: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for key in PREFERENCE_FLAGS:
    if record.get(key) is not None:
      value = record[key]
      if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise DataError(f"field {key!r} must be a boolean, got {value!r}")
      out[key] = bool(value)
  for key in PREFERENCE_NUMBERS:
    if record.get(key) is not None:
      value = record[key]
      if isinstance(value, bool) or not isinstance(value, (int, float)) and \
          type(value).__name__ not in ("float32", "float64", "int32", "int64"):
        raise DataError(f"field {key!r} must be a number, got {value!r}")
      if value != value or abs(float(value)) == float("inf"):
        raise DataError(f"field {key!r} must be finite, got {value!r}")
      if abs(float(value)) > _FLOAT32_MAX:  # it would train as inf
        raise DataError(f"field {key!r} is {value!r}, beyond float32's range (about 3.4e38)")
      if key in PREFERENCE_RANGES:
        low, high = PREFERENCE_RANGES[key]
        if not low <= float(value) <= high:
          raise DataError(f"field {key!r} must be in [{low:g}, {high:g}] (a probability), "
                          f"got {value!r}")
      out[key] = float(value)
  return out


def _as_label(value: Any) -> bool:
  # numpy/arrow may hand over 0/1 ints for a bool column; anything else is ambiguous.
  if isinstance(value, bool):
    return value
  if isinstance(value, int) and value in (0, 1):
    return bool(value)
  if type(value).__name__ == "bool_":  # numpy.bool_ without importing numpy here
    return bool(value)
  raise DataError(f"field 'label' must be a boolean, got {value!r}")


def validate_unpaired(record: Any) -> dict[str, Any]:
  """{"prompt", "completion", "label"} (KTO) -> message lists and a bool label."""
  record = _mapping(record)
  prompt = _as_prompt(_require(record, "prompt"))
  completion = _as_response(_require(record, "completion"), "completion")
  _check_conversation(prompt + completion, "prompt + completion")
  label = _as_label(_require(record, "label"))
  return {"prompt": prompt, "completion": completion, "label": label, **_meta(record)}


def validate_prompts(record: Any) -> dict[str, Any]:
  """{"prompt": str | messages, ...extra} -> the same record with a checked prompt."""
  record = _mapping(record)
  prompt = _require(record, "prompt")
  if isinstance(prompt, str):
    if not prompt.strip():
      raise DataError("field 'prompt' is empty")
  else:
    prompt = _messages(prompt, "prompt")
  out = dict(record)
  out["prompt"] = prompt
  return out


VALIDATORS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "text": validate_text,
    "sft": validate_sft,
    "preference": validate_preference,
    "unpaired": validate_unpaired,
    "prompts": validate_prompts,
}


def validate(schema: str, record: Any) -> dict[str, Any]:
  """Validates and normalizes one record of `schema`; raises DataError naming the problem."""
  return VALIDATORS[check_schema(schema)](record)


# ----------------------------------------------------------------------------- usable-but-bad


def _empty(msgs: Sequence[Mapping[str, str]]) -> bool:
  return any(m["role"] == "assistant" and not m["content"].strip() for m in msgs)


def record_issue(schema: str, record: Mapping[str, Any]) -> str | None:
  """The reason a *normalized* record is useless for training, or None.

  Returns IDENTICAL_PAIR (preference chosen == rejected), EMPTY_RESPONSE (an assistant turn
  of a response is empty or whitespace) or EMPTY_TEXT (a text record that is empty or
  whitespace). Tokenizer-dependent checks live in the pipelines.
  """
  if schema == "text" and not record["text"].strip():
    return EMPTY_TEXT
  if schema == "sft" and _empty(record["messages"]):
    return EMPTY_RESPONSE
  if schema == "preference":
    if record["chosen"] == record["rejected"]:
      return IDENTICAL_PAIR
    if _empty(record["chosen"]) or _empty(record["rejected"]):
      return EMPTY_RESPONSE
  if schema == "unpaired" and _empty(record["completion"]):
    return EMPTY_RESPONSE
  return None


def issue_message(reason: str) -> str:
  return _ISSUE_MESSAGES.get(reason, reason.replace("_", " "))


def where(record: Mapping[str, Any], index: int | None = None) -> str:
  """Where a record came from, for error messages: its "_source" or its index."""
  src = record.get("_source") if isinstance(record, Mapping) else None
  if src:
    return str(src)
  return f"record {index}" if index is not None else "record"
