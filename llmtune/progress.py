"""Progress of long work (synthesis, evaluation): a live bar per part on a terminal, a log line every 10%
otherwise (files and CI logs)."""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

log = logging.getLogger("llmtune")


class WorkProgress:
    def __init__(self, console: Console) -> None:
        self.live = console.is_terminal
        self.bar = Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=console, disable=not self.live)
        self.tasks: dict[str, Any] = {}
        self.method = ""
        self.done: dict[str, int] = {}
        self.total: dict[str, int] = {}

    def __enter__(self) -> WorkProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)

    def track(self, part: str, total: int, done: int = 0):
        """A function that advances `part` (of `total` items, `done` already) by n."""
        self.start(part, total)
        if done:
            self.advance(done)

        def advance(items: int) -> None:
            self.method = part
            self.advance(items)

        return advance

    def start(self, method: str, items: int) -> None:
        """`items` more items of `method` are about to run (self-instruct announces each round)."""
        self.method = method
        self.total[method] = self.total.get(method, 0) + items
        self.done.setdefault(method, 0)
        if method not in self.tasks:
            self.tasks[method] = self.bar.add_task(method, total=self.total[method])
        self.bar.update(self.tasks[method], total=self.total[method])

    def advance(self, items: int) -> None:
        method = self.method
        before = self.done[method]
        self.done[method] = before + items
        self.bar.advance(self.tasks[method], items)
        step = max(1, self.total[method] // 10)
        if not self.live and (self.done[method] // step > before // step or self.done[method] == self.total[method]):
            log.info("%s: %d/%d items", method, self.done[method], self.total[method])
