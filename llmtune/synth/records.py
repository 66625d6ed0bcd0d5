"""One synthesized item as it is journaled and written: accepted (with messages or a pair) or rejected with
its reason, always with provenance. Plain dicts, because they go to jsonl as they are."""

from __future__ import annotations

import hashlib
from typing import Any

Record = dict[str, Any]


class Rejected(Exception):
    """Teacher output that does not pass validation; the item is kept in the rejects file with this reason."""

    def __init__(self, reason: str, raw: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason, self.raw = reason, raw or {}


def item_seed(run_seed: int, item_id: str) -> int:
    """A seed per item: the same id gives the same seed on every run and resume, whatever ran before it."""
    return int.from_bytes(hashlib.sha256(f"{run_seed}/{item_id}".encode()).digest()[:4], "big")


def accepted(item_id: str, method: str, provenance: dict[str, Any], *, messages: list[dict[str, str]] | None = None,
             pair: dict[str, Any] | None = None, scores: dict[str, float] | None = None,
             usage: dict[str, int] | None = None) -> Record:
    record: Record = {"id": item_id, "method": method, "status": "ok"}
    if messages is not None:
        record["messages"] = messages
    if pair is not None:
        record.update(pair)
    record.update(scores=scores or {}, provenance=provenance, usage=usage or {})
    return record


def rejected(item_id: str, method: str, stage: str, reason: str, provenance: dict[str, Any],
             raw: dict[str, str] | None = None, usage: dict[str, int] | None = None) -> Record:
    return {"id": item_id, "method": method, "status": "rejected", "stage": stage, "reason": reason,
            "raw": raw or {}, "provenance": provenance, "usage": usage or {}}


def as_rejected(record: Record, stage: str, reason: str) -> Record:
    """An accepted record removed later (filter, decontamination), keeping what it was."""
    kept = {k: v for k, v in record.items() if k not in ("status", "stage", "reason")}
    return {**kept, "status": "rejected", "stage": stage, "reason": reason}


def prompt_text(record: Record) -> str:
    """The user's side of an item: its user turns (SFT) or its prompt (preference pair)."""
    messages = record.get("messages") or record.get("prompt") or []
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def response_text(record: Record) -> str:
    if "messages" in record:
        return "\n".join(m["content"] for m in record["messages"] if m["role"] == "assistant")
    return "\n".join(m["content"] for m in record.get("chosen", []))


class Usage:
    """Tokens a teacher used for one item (summed over its requests)."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests = 0

    def add(self, completion: Any) -> None:
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens
        self.requests += 1

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "requests": self.requests}
