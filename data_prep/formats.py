"""Record formats -> one canonical shape, with a reason for every record that cannot be used.

SFT records become a message list ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``:
  - OpenAI ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}``
  - ShareGPT ``conversations``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``
  - Alpaca: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional)

Preference records become ``Preference(prompt messages, chosen text, rejected text)``:
  - ``prompt`` + ``chosen`` + ``rejected`` as strings (``prompt`` may also be a message list), or
  - ``chosen`` / ``rejected`` as full conversations sharing the prompt (UltraFeedback-binarized).
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


class RecordError(ValueError):
    """One record is unusable; ``reason`` is a stable code for counts, the message says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # malformed lines travel to worker processes as RecordErrors
        return (RecordError, (self.reason, self.detail))


@dataclass(frozen=True)
class Preference:
    prompt: list[dict]  # messages ending with a user turn
    chosen: str
    rejected: str


def detect_format(record) -> str:
    """The format of one record, from the keys it has."""
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise RecordError(
        "unknown_format",
        f"keys [{keys}] match no format (messages | conversations | instruction/output | chosen/rejected)",
    )


def _text(value, where: str) -> str:
    if value is None:
        raise RecordError("missing_field", f"{where} is missing")
    if not isinstance(value, str):
        raise RecordError("non_string_content", f"{where} must be a string, got {type(value).__name__}")
    if value == "":
        raise RecordError("empty_content", f"{where} is empty")
    return value


def _messages(value, where: str, role_key: str = "role", content_key: str = "content", roles=None) -> list[dict]:
    if value is None:
        raise RecordError("missing_field", f"{where} is missing")
    if not isinstance(value, list):
        raise RecordError("invalid_structure", f"{where} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RecordError("invalid_structure", f"{where} is an empty conversation")
    out = []
    for i, message in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(message, dict):
            raise RecordError("invalid_structure", f"{at} must be an object, got {type(message).__name__}")
        if role_key not in message:
            raise RecordError("missing_field", f"{at} has no '{role_key}'")
        if content_key not in message:
            raise RecordError("missing_field", f"{at} has no '{content_key}'")
        role = message[role_key]
        role = roles.get(role) if roles is not None and isinstance(role, str) else role
        if role not in ROLES:
            known = ", ".join(roles if roles is not None else ROLES)
            raise RecordError("unknown_role", f"{at}.{role_key} is {message[role_key]!r} (known: {known})")
        out.append({"role": role, "content": _text(message[content_key], f"{at}.{content_key}")})
    return out


def to_messages(record, fmt: str = "auto") -> list[dict]:
    """The message list of an SFT record (``fmt`` "auto" detects it)."""
    if fmt == "auto":
        fmt = detect_format(record)
    elif not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    if fmt == "messages":
        return _messages(record.get("messages"), "messages")
    if fmt == "sharegpt":
        return _messages(record.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    if fmt == "alpaca":
        instruction = _text(record.get("instruction"), "instruction")
        extra = record.get("input")
        if extra not in (None, "") and not isinstance(extra, str):
            raise RecordError("non_string_content", f"input must be a string, got {type(extra).__name__}")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record.get("output"), "output")}]
        if record.get("system") not in (None, ""):
            messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
        return messages
    if fmt == "preference":
        raise RecordError("unknown_format", "a preference pair (chosen/rejected) in an SFT dataset; use data.kind: dpo")
    raise ValueError(f"unknown format {fmt!r}")


def to_preference(record, fmt: str = "auto") -> Preference:
    """The prompt and the two answers of a preference record."""
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt != "preference":
        raise RecordError("unknown_format", f"a {fmt} record in a preference dataset: it needs chosen and rejected")
    if not isinstance(record, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise RecordError("missing_field", f"{key} is missing")
    chosen_raw, rejected_raw = record["chosen"], record["rejected"]
    prompt_raw = record.get("prompt")
    if isinstance(chosen_raw, list) or isinstance(rejected_raw, list):
        chosen_msgs = _messages(chosen_raw, "chosen")
        rejected_msgs = _messages(rejected_raw, "rejected")
        for key, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
            if msgs[-1]["role"] != "assistant":
                raise RecordError("no_final_answer", f"{key} must end with an assistant message")
        shared = chosen_msgs[:-1]
        if shared != rejected_msgs[:-1]:
            raise RecordError("prompt_mismatch", "chosen and rejected do not share the same prompt messages")
        prompt = shared or _prompt(prompt_raw)
        chosen, rejected = chosen_msgs[-1]["content"], rejected_msgs[-1]["content"]
    else:
        prompt = _prompt(prompt_raw)
        chosen, rejected = _text(chosen_raw, "chosen"), _text(rejected_raw, "rejected")
    if prompt[-1]["role"] != "user":
        raise RecordError("invalid_structure", "the prompt must end with a user message")
    if chosen == rejected:
        raise RecordError("chosen_equals_rejected", "chosen and rejected are the same text")
    return Preference(prompt=prompt, chosen=chosen, rejected=rejected)


def _prompt(value) -> list[dict]:
    if isinstance(value, list):
        return _messages(value, "prompt")
    return [{"role": "user", "content": _text(value, "prompt")}]
