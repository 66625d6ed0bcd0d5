"""The formats users bring, normalised into one canonical form: a list of chat messages.

- messages:           {"messages": [{"role": ..., "content": ...}, ...]}
- sharegpt:           {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
- alpaca:             {"instruction": ..., "input": ..., "output": ..., "system"?: ...}
- prompt_completion:  {"prompt": str | messages, "completion": str | messages}

Preference pairs (DPO) have their own canonical form, {prompt, chosen, rejected}: see `to_preference`.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RowError(ValueError):
    """One row that cannot be used; the message says why (the caller adds file and row)."""


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise RowError(
        f"cannot tell the format from keys {sorted(row)}: expected `messages`, `conversations` (sharegpt), "
        "`instruction`+`output` (alpaca) or `prompt`+`completion`"
    )


def to_messages(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> list[Message]:
    """Canonical messages for one row, validated; raises RowError."""
    if fmt == "auto":
        fmt = detect_format(row)
    converters = {
        "messages": _from_messages,
        "sharegpt": _from_sharegpt,
        "alpaca": _from_alpaca,
        "prompt_completion": _from_prompt_completion,
    }
    messages = converters[fmt](row)
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    validate_messages(messages)
    return messages


def validate_messages(messages: list[Message], last_role: str = "assistant") -> None:
    if not messages:
        raise RowError("no messages")
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"message {index}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"message {index} ({role}): empty or non-text content")
        if role == "system" and index != 0:
            raise RowError(f"message {index}: a system message may only come first")
    if messages[-1]["role"] != last_role:
        if last_role == "assistant":
            raise RowError("the last message is not from the assistant, so there is nothing to learn at the end")
        raise RowError(f"the prompt must end with a {last_role} message")


def to_preference(row: dict[str, Any], fmt: str, system_prompt: str | None = None) -> dict[str, list[Message]]:
    """A preference pair as {prompt, chosen, rejected} message lists; raises RowError.

    Accepts `prompt` + `chosen` + `rejected` as strings or message lists, or, without `prompt`, two whole
    conversations that differ only in their last (assistant) turn.
    """
    if fmt not in ("auto", "preference"):
        raise RowError(f"format {fmt!r} is not a preference format (use `preference` or `auto`)")
    chosen, rejected = _required(row, "chosen"), _required(row, "rejected")
    prompt = row.get("prompt")
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)) or len(chosen) < 2:
            raise RowError("missing `prompt` (without it, `chosen` and `rejected` must be whole conversations)")
        if chosen[:-1] != rejected[:-1]:
            raise RowError("`chosen` and `rejected` differ before their last turn, so the prompt is ambiguous")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    prompt_messages = _as_messages(prompt, "user", "prompt")
    if system_prompt and prompt_messages[0]["role"] != "system":
        prompt_messages = [{"role": "system", "content": system_prompt}, *prompt_messages]
    validate_messages(prompt_messages, last_role="user")
    pair = {}
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        messages = _as_messages(value, "assistant", key)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise RowError(f"`{key}` must be one assistant answer")
        content = messages[0].get("content")
        if not isinstance(content, str) or not content.strip():
            raise RowError(f"`{key}` is empty")
        pair[key] = messages
    if pair["chosen"][0]["content"].strip() == pair["rejected"][0]["content"].strip():
        raise RowError("`chosen` and `rejected` are identical: the pair carries no preference")
    return {"prompt": prompt_messages, **pair}


def _as_messages(value: Any, role: str, key: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return [{"role": m.get("role"), "content": m.get("content")} for m in value]
    raise RowError(f"`{key}` must be a string or a non-empty list of {{role, content}} messages")


def _required(row: dict[str, Any], key: str) -> Any:
    value = row.get(key)
    if value is None:
        raise RowError(f"missing `{key}`")
    return value


def _from_messages(row: dict[str, Any]) -> list[Message]:
    raw = _required(row, "messages")
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise RowError("`messages` must be a list of {role, content} objects")
    return [{"role": m.get("role"), "content": m.get("content")} for m in raw]


def _from_sharegpt(row: dict[str, Any]) -> list[Message]:
    raw = _required(row, "conversations")
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise RowError("`conversations` must be a list of {from, value} objects")
    messages = []
    for index, turn in enumerate(raw):
        speaker = turn.get("from")
        if speaker not in _SHAREGPT_ROLES:
            raise RowError(f"conversations[{index}]: unknown speaker {speaker!r}")
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return messages


def _from_alpaca(row: dict[str, Any]) -> list[Message]:
    instruction = _required(row, "instruction")
    extra = row.get("input") or ""
    prompt = f"{instruction}\n\n{extra}" if str(extra).strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _required(row, "output")}]
    if row.get("system"):
        messages.insert(0, {"role": "system", "content": row["system"]})
    return messages


def _from_prompt_completion(row: dict[str, Any]) -> list[Message]:
    prompt, completion = _required(row, "prompt"), _required(row, "completion")
    prompt_messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    completion_messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    return _from_messages({"messages": [*prompt_messages, *completion_messages]})
