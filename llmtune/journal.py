"""A journal: one jsonl line per finished item (a synthesized example, an evaluated item), appended and fsynced
as items finish, so a killed run resumes without doing an item twice. A line cut short by the kill is dropped
on reopening."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("llmtune")


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            self._load()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run's appends

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # the write the kill interrupted
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            self.records[record["id"]] = record
            good += len(line)
        if good < len(raw):
            log.warning("%s: dropping an incomplete last line (%d bytes) from an interrupted run",
                        self.path, len(raw) - good)
            with open(self.path, "r+b") as handle:
                handle.truncate(good)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.records

    def append(self, record: dict[str, Any]) -> None:
        if record["id"] in self.records:
            raise RuntimeError(f"item {record['id']} is already in the journal")  # a bug, not bad input
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.records[record["id"]] = record

    def close(self) -> None:
        self._handle.close()
