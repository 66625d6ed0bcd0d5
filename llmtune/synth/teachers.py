"""Teachers: the models that write synthetic data. The same prompts go to either kind.

- `OpenAITeacher`: any OpenAI-compatible endpoint (vLLM, TGI, Ollama, llama.cpp server, OpenAI, `llmtune serve`)
  through the official `openai` client, whose retry loop already does what a well-behaved client must:
  408/409/429/5xx, timeouts and dropped connections are retried `max_retries` times with exponential backoff
  (0.5 s doubling, capped at 8 s, minus up to 25% jitter), and a server's Retry-After is honoured. We bound the
  requests in flight with a semaphore.
- `LocalTeacher`: a transformers model (or a trained run with its adapter) in this process, on a worker thread.
  A sampled request runs alone, seeded per request, so an item's text does not depend on what ran before it;
  greedy requests (temperature 0) need no seed, so those waiting together share forward passes (up to 16).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from llmtune.errors import LlmtuneError
from llmtune.synth.recipe import TeacherSection

if TYPE_CHECKING:
    from llmtune.inference.loading import Loaded

Messages = list[dict[str, str]]


class TeacherError(LlmtuneError, RuntimeError):
    """A teacher that cannot be used at all (no key, unreachable model); stops the run."""


class TeacherFailure(Exception):
    """One request that failed after its retries; the item is rejected with this reason."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class Teacher(Protocol):
    name: str
    max_concurrency: int

    async def complete(self, messages: Messages, *, seed: int, item_id: str,
                       temperature: float | None = None) -> Completion: ...

    async def close(self) -> None: ...


class OpenAITeacher:
    def __init__(self, section: TeacherSection) -> None:
        from openai import AsyncOpenAI

        key = "unused"  # local servers ignore it; the client insists on one
        if section.api_key_env:
            key = os.environ.get(section.api_key_env, "")
            if not key:
                raise TeacherError(f"teacher.api_key_env: the environment variable {section.api_key_env} is empty")
        self.section = section
        self.name = f"openai:{section.model}@{section.base_url}"
        self.max_concurrency = section.max_concurrency
        self.client = AsyncOpenAI(base_url=section.base_url, api_key=key, timeout=section.timeout_s,
                                  max_retries=section.max_retries)
        self.slots = asyncio.Semaphore(section.max_concurrency)

    async def complete(self, messages: Messages, *, seed: int, item_id: str,
                       temperature: float | None = None) -> Completion:
        import openai

        async with self.slots:
            try:
                response = await self.client.chat.completions.create(
                    model=self.section.model,
                    messages=messages,
                    temperature=self.section.temperature if temperature is None else temperature,
                    top_p=self.section.top_p,
                    max_tokens=self.section.max_tokens,
                    seed=seed,
                    extra_headers={"X-Llmtune-Item": item_id},  # lets a server's log tie requests to items
                )
            except openai.AuthenticationError as err:
                raise TeacherError(f"teacher {self.name}: authentication failed ({err.status_code})") from None
            except openai.APIStatusError as err:
                raise TeacherFailure(f"teacher HTTP {err.status_code} after retries: {_short(err.message)}") from None
            except openai.APITimeoutError:
                raise TeacherFailure(f"teacher timed out ({self.section.timeout_s:g} s) after retries") from None
            except openai.APIConnectionError as err:
                raise TeacherFailure(f"teacher unreachable after retries: {_short(str(err))}") from None
            except ValueError as err:  # a 200 whose body is not JSON
                raise TeacherFailure(f"malformed teacher response: {_short(str(err))}") from None
        try:
            choice = response.choices[0]
            text = choice.message.content
            usage = response.usage
            if not isinstance(text, str):
                raise TypeError("no message content")
            return Completion(text, int(getattr(usage, "prompt_tokens", 0) or 0),
                              int(getattr(usage, "completion_tokens", 0) or 0), str(choice.finish_reason))
        except (AttributeError, IndexError, TypeError, ValueError) as err:
            raise TeacherFailure(f"malformed teacher response: {_short(str(err))}") from None

    async def close(self) -> None:
        await self.client.close()


class LocalTeacher:
    batch_size = 16  # greedy requests generated together

    def __init__(self, section: TeacherSection, loaded: Loaded | None = None) -> None:
        """`loaded`: a model already in memory whose base is the teacher (its adapters are switched off)."""
        from llmtune.inference.loading import load_for_inference

        self.section = section
        self.name = f"local:{section.path}"
        self.max_concurrency = 1
        if loaded is not None:
            self.loaded, self.adapter = loaded, loaded.adapter_for(loaded.base_name)
        else:
            self.loaded = load_for_inference(section.path)
            self.adapter = next(iter(self.loaded.adapters), None) or self.loaded.adapter_for(self.loaded.base_name)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtune-teacher")
        self.waiting: list[tuple[object, asyncio.Future]] = []
        self.flushing = False
        self.flusher: asyncio.Future | None = None

    async def complete(self, messages: Messages, *, seed: int, item_id: str,
                       temperature: float | None = None) -> Completion:
        from llmtune.inference.generation import GenerationRequest, Sampling

        sampling = Sampling(self.section.temperature if temperature is None else temperature, self.section.top_p,
                            seed)
        if sampling.greedy:  # the seed changes nothing, and requests that share sampling can share a batch
            sampling = Sampling(0.0, 1.0, None)
        request = GenerationRequest(adapter=self.adapter, messages=messages, max_new_tokens=self.section.max_tokens,
                                    sampling=sampling)
        if sampling.greedy:
            result = await self._batched(request)
        else:
            [result] = await self._generate([request])
        return Completion(result.text, result.prompt_tokens, result.completion_tokens, result.finish_reason)

    async def _batched(self, request) -> object:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((request, future))
        if not self.flushing:  # starts on the next loop turn: requests made in this one join its first batch
            self.flushing = True
            self.flusher = asyncio.ensure_future(self._flush())
        return await future

    async def _flush(self) -> None:
        """Generate what is waiting, a batch at a time; requests arriving meanwhile join the next batch."""
        try:
            while self.waiting:
                batch, self.waiting = self.waiting[: self.batch_size], self.waiting[self.batch_size :]
                try:
                    results = await self._generate([request for request, _ in batch])
                except TeacherFailure:
                    if len(batch) == 1:
                        raise
                    results = [await self._generate_or_error([request]) for request, _ in batch]  # find the bad one
                for (_, future), result in zip(batch, results, strict=True):
                    if isinstance(result, TeacherFailure):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
        except TeacherFailure as failure:
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
        finally:
            self.flushing = False  # the loop saw `waiting` empty with no await since: nothing is left behind

    async def _generate_or_error(self, requests: list) -> object:
        try:
            [result] = await self._generate(requests)
            return result
        except TeacherFailure as failure:
            return failure

    async def _generate(self, requests: list) -> list:
        from llmtune.inference.generation import generate

        try:
            results = await asyncio.get_running_loop().run_in_executor(self.worker, generate, self.loaded, requests)
        except (RuntimeError, ValueError) as err:  # e.g. a prompt longer than the model's context
            raise TeacherFailure(f"local generation failed: {_short(str(err))}") from None
        return [choices[0] for choices in results]

    async def close(self) -> None:
        self.worker.shutdown(wait=True)


def make_teacher(section: TeacherSection, in_memory: Loaded | None = None) -> Teacher:
    """`in_memory`: a loaded model that a local teacher reuses when it is the teacher's model (an eval judges its
    model's answers with the same base: one copy, not a reload per evaluated model)."""
    if section.kind == "openai":
        return OpenAITeacher(section)
    from llmtune.inference.loading import serves_base_of

    reuse = in_memory is not None and section.path is not None and serves_base_of(in_memory, section.path)
    return LocalTeacher(section, in_memory if reuse else None)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
