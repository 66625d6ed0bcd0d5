"""Dynamic batching: concurrent requests wait a few milliseconds in a bounded queue and share forward passes.

All model work runs on one worker thread (a model is not safe to drive from two threads at once); the event
loop only queues, groups and answers. Requests group when their sampling parameters agree; a seeded request
runs alone so that its seed means what it says. Streaming requests run one at a time on the same thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from llmtune.inference.generation import CallbackStreamer, Generated, GenerationRequest, generate
from llmtune.inference.loading import Loaded

log = logging.getLogger("llmtune.serve")


class QueueFull(RuntimeError):
    pass


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future


class Batcher:
    def __init__(self, loaded: Loaded, max_batch_size: int = 16, max_queue: int = 64, window_ms: float = 5.0):
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.window = window_ms / 1000
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_queue)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtune-model")
        self.batches_run = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self.worker.shutdown(wait=False, cancel_futures=True)

    async def submit(self, request: GenerationRequest) -> list[Generated]:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Pending(request, future))
        except asyncio.QueueFull:
            raise QueueFull(f"the request queue is full ({self.queue.maxsize}); retry later") from None
        return await future

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str]:
        """Text pieces as they are generated (n = 1), on the model thread between batches."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        streamer = CallbackStreamer(self.loaded, lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text))

        def work() -> None:
            try:
                generate(self.loaded, [request], streamer=streamer)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        job = loop.run_in_executor(self.worker, work)
        while (piece := await pieces.get()) is not None:
            yield piece
        await job  # re-raise a generation error

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            await asyncio.sleep(self.window)  # let concurrent requests arrive
            pending = [first]
            while not self.queue.empty() and len(pending) < self.max_batch_size * 4:
                pending.append(self.queue.get_nowait())
            for group in _groups(pending, self.max_batch_size):
                try:
                    results = await loop.run_in_executor(
                        self.worker, generate, self.loaded, [p.request for p in group]
                    )
                except Exception as err:  # answer every waiting client, keep serving
                    log.exception("generation failed")
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(err)
                    continue
                self.batches_run += 1
                for item, result in zip(group, results, strict=True):
                    if not item.future.done():
                        item.future.set_result(result)


def _groups(pending: list[_Pending], max_batch_size: int) -> list[list[_Pending]]:
    by_sampling: dict[object, list[list[_Pending]]] = {}
    for item in pending:
        sampling = item.request.sampling
        key = (sampling, id(item)) if sampling.seed is not None else sampling
        batches = by_sampling.setdefault(key, [[]])
        if sum(p.request.n for p in batches[-1]) + item.request.n > max_batch_size and batches[-1]:
            batches.append([])
        batches[-1].append(item)
    return [batch for batches in by_sampling.values() for batch in batches]
