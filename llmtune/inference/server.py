"""An OpenAI-compatible HTTP server (the subset clients use) on FastAPI: /v1/models, /v1/chat/completions
(streaming as server-sent events), /v1/completions. One base model, several adapters chosen by `model`."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmtune.inference.batcher import Batcher, QueueFull
from llmtune.inference.generation import GenerationRequest, Sampling, encode
from llmtune.inference.loading import Loaded


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _Request(BaseModel):
    # Clients send fields we do not use (user, logit_bias, stream_options, ...): accept and ignore them.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str


def create_app(
    loaded: Loaded,
    api_key: str | None = None,
    max_batch_size: int = 16,
    max_queue: int = 64,
    max_model_len: int | None = None,
    default_max_tokens: int = 256,
) -> FastAPI:
    context = max_model_len or int(getattr(loaded.model.config, "max_position_embeddings", 2048))
    batcher = Batcher(loaded, max_batch_size=max_batch_size, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="llmtune serve", lifespan=lifespan)
    app.state.batcher = batcher

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not secrets.compare_digest(given.encode(), api_key.encode()):
                error = ApiError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")
                return error.response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = "the body is not valid JSON" if first["type"] == "json_invalid" else f"{where}: {first['msg']}"
        return ApiError(400, message, param=where or None).response()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": now, "owned_by": "llmtune"} for name in loaded.names
        ]}

    def to_generation(body: _Request, messages=None, prompt=None) -> GenerationRequest:
        try:
            adapter = loaded.adapter_for(body.model)
        except KeyError:
            raise ApiError(404, f"the model `{body.model}` does not exist; see /v1/models", param="model",
                           code="model_not_found") from None
        request = GenerationRequest(
            adapter=adapter,
            messages=messages,
            prompt=prompt,
            max_new_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            n=body.n,
            sampling=Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed),
        )
        prompt_tokens = len(encode(loaded, request))
        if prompt_tokens + request.max_new_tokens > context:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {prompt_tokens} and "
                           f"max_tokens asks for {request.max_new_tokens}", param="messages",
                           code="context_length_exceeded")
        if body.stream and body.n != 1:
            raise ApiError(400, "stream with n > 1 is not supported", param="n")
        return request

    async def run(request: GenerationRequest):
        try:
            return await batcher.submit(request)
        except QueueFull as err:
            raise ApiError(503, str(err), "server_error", code="queue_full") from None

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        request = to_generation(body, messages=[m.model_dump(include={"role", "content"}) for m in body.messages])
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return _sse(_chat_chunks(batcher, request, ident, created, body.model))
        choices = await run(request)
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": body.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
            "usage": _usage(choices),
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        request = to_generation(body, prompt=body.prompt)
        if body.stream:
            raise ApiError(400, "stream is supported on /v1/chat/completions only", param="stream")
        choices = await run(request)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, c in enumerate(choices)],
            "usage": _usage(choices),
        }

    return app


def _usage(choices) -> dict[str, int]:
    prompt = choices[0].prompt_tokens
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def _chat_chunks(batcher: Batcher, request: GenerationRequest, ident: str, created: int, model: str):
    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    text, finish = "", "length"
    async for piece in batcher.stream(request):
        text += piece
        cut = min((text.find(s) for s in request.stop if s and s in text), default=-1)
        if cut >= 0:  # a stop string completed: send what precedes it and end
            piece = piece[: max(0, len(piece) - (len(text) - cut))]
            if piece:
                yield chunk({"content": piece})
            finish = "stop"
            break
        yield chunk({"content": piece})
    else:
        tokens = len(batcher.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
        finish = "length" if tokens >= request.max_new_tokens else "stop"
    yield chunk({}, finish)
