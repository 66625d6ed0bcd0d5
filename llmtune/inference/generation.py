"""Generation for one batch of requests: chat or plain prompts, several adapters in one forward pass (peft's
mixed-adapter batches), per-request length limits and stop strings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import PeftModel
from transformers.generation.streamers import BaseStreamer

from llmtune.inference.loading import Loaded


@dataclass(frozen=True)
class Sampling:
    """Requests can share a forward pass only when these agree."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class GenerationRequest:
    adapter: str  # peft adapter name, or loading.BASE
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    n: int = 1
    sampling: Sampling = Sampling()


@dataclass
class Generated:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


def encode(loaded: Loaded, request: GenerationRequest) -> list[int]:
    tokenizer = loaded.tokenizer
    if request.messages is not None:
        encoded = tokenizer.apply_chat_template(
            request.messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])
    return list(tokenizer(request.prompt, add_special_tokens=True)["input_ids"])


@torch.no_grad()
def generate(
    loaded: Loaded, requests: list[GenerationRequest], streamer: BaseStreamer | None = None
) -> list[list[Generated]]:
    """One forward-pass batch; every request must share `sampling`. Returns `n` choices per request."""
    sampling = requests[0].sampling
    if any(r.sampling != sampling for r in requests):
        raise ValueError("a batch must share its sampling parameters")
    tokenizer, model = loaded.tokenizer, loaded.model
    prompts = [encode(loaded, r) for r in requests]
    rows = [(index, ids) for index, (r, ids) in enumerate(zip(requests, prompts, strict=True)) for _ in range(r.n)]
    width = max(len(ids) for _, ids in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for _, ids in rows])
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, ids in rows])
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=max(r.max_new_tokens for r in requests),
        do_sample=not sampling.greedy,
        pad_token_id=pad,
        streamer=streamer,
    )
    if not sampling.greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if isinstance(model, PeftModel):
        kwargs["adapter_names"] = [requests[index].adapter for index, _ in rows]
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    output = model.generate(**kwargs)[:, width:]

    stop_ids = _stop_token_ids(loaded)
    results: list[list[Generated]] = [[] for _ in requests]
    for (index, ids), new_tokens in zip(rows, output.tolist(), strict=True):
        results[index].append(_finish(loaded, requests[index], len(ids), new_tokens, stop_ids))
    return results


def _finish(
    loaded: Loaded, request: GenerationRequest, prompt_tokens: int, new_tokens: list[int], stop_ids: set[int]
) -> Generated:
    tokenizer = loaded.tokenizer
    tokens = new_tokens[: request.max_new_tokens]
    finish: Literal["stop", "length"] = "length"
    for position, token in enumerate(tokens):
        if token in stop_ids:
            tokens, finish = tokens[:position], "stop"
            break
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    cut = min((text.find(s) for s in request.stop if s and s in text), default=-1)
    if cut >= 0:
        text, finish = text[:cut], "stop"
    return Generated(text, prompt_tokens, len(tokens), finish)


def _stop_token_ids(loaded: Loaded) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    ids.add(loaded.tokenizer.eos_token_id)
    ids.add(loaded.tokenizer.pad_token_id)
    return {i for i in ids if i is not None}


class CallbackStreamer(BaseStreamer):
    """Hands decoded text to `emit` as tokens arrive (prompt skipped, special tokens dropped)."""

    def __init__(self, loaded: Loaded, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = loaded.tokenizer, emit
        self.stop_ids = _stop_token_ids(loaded)
        self.tokens: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for token in value.flatten().tolist():
            if self.stopped or token in self.stop_ids:
                self.stopped = True
                return
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if len(text) > self.sent:
            self.emit(text[self.sent :])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > self.sent:
            self.emit(text[self.sent :])
            self.sent = len(text)
