"""What a synthesis method works with: its teacher, the journal, a seed per item, and a way to run many items
concurrently where each ends accepted or rejected with a reason (never lost, never run twice)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from llmtune.journal import Journal
from llmtune.synth.records import Record, Rejected, Usage, item_seed, rejected
from llmtune.synth.teachers import Completion, Messages, Teacher, TeacherFailure


class Call:
    """One item's conversation with teachers: records each raw output and the tokens used."""

    def __init__(self, context: Context, item_id: str) -> None:
        self.context, self.item_id = context, item_id
        self.seed = item_seed(context.run_seed, item_id)
        self.usage = Usage()
        self.raw: dict[str, str] = {}

    async def ask(self, teacher: Teacher, step: str, user: str, *, seed_offset: int = 0,
                  temperature: float | None = None) -> str:
        return await self.chat(teacher, step, [{"role": "user", "content": user}], seed_offset=seed_offset,
                               temperature=temperature)

    async def chat(self, teacher: Teacher, step: str, messages: Messages, *, seed_offset: int = 0,
                   temperature: float | None = None) -> str:
        completion: Completion = await teacher.complete(
            messages, seed=self.seed + seed_offset, item_id=f"{self.item_id}#{step}", temperature=temperature
        )
        self.usage.add(completion)
        self.raw[step] = completion.text
        return completion.text


Make = Callable[[Call], Awaitable[Record]]


@dataclass
class Task:
    id: str
    method: str
    provenance: dict[str, Any]
    make: Make


@dataclass
class Context:
    run_seed: int
    journal: Journal
    teacher: Teacher | None
    on_start: Callable[[str, int], None] | None = None  # (method, items) for a progress display
    advance: Callable[[int], None] = lambda n: None

    async def run(self, tasks: list[Task]) -> list[Record]:
        """Records for `tasks`, in order: from the journal when an earlier run finished them, else made now."""
        import asyncio

        if self.on_start is not None and tasks:
            self.on_start(tasks[0].method, len(tasks))
        done = sum(task.id in self.journal for task in tasks)
        if done:
            self.advance(done)
        todo = [task for task in tasks if task.id not in self.journal]
        await asyncio.gather(*(self._one(task) for task in todo))
        return [self.journal.records[task.id] for task in tasks]

    async def _one(self, task: Task) -> None:
        call = Call(self, task.id)
        try:
            record = await task.make(call)
        except Rejected as err:
            record = rejected(task.id, task.method, "validation", err.reason, task.provenance,
                              {**call.raw, **err.raw}, call.usage.as_dict())
        except TeacherFailure as err:
            record = rejected(task.id, task.method, "teacher", str(err), task.provenance, call.raw,
                              call.usage.as_dict())
        self.journal.append(record)
        self.advance(1)
