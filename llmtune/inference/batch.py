"""`llmtune generate`: a jsonl of prompts or chats in, a jsonl of outputs out, batched and resumable by id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from llmtune.data.formats import RowError, validate_messages
from llmtune.errors import LlmtuneError
from llmtune.inference.generation import GenerationRequest, Sampling, generate
from llmtune.inference.loading import BASE, Loaded


class GenerateInputError(LlmtuneError, ValueError):
    pass


def read_requests(
    path: Path, max_new_tokens: int, sampling: Sampling, adapter: str = BASE
) -> list[tuple[str, GenerationRequest]]:
    """(id, request) per row; a row has `messages` (a chat ending with a user turn) or `prompt`, and an `id`."""
    items = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}: row {line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise GenerateInputError(f"{where}: invalid JSON: {err.msg}") from None
            ident = str(row.get("id", f"row-{line_number}"))
            if ident in seen:
                raise GenerateInputError(f"{where}: duplicate id {ident!r}")
            seen.add(ident)
            request = GenerationRequest(adapter=adapter, max_new_tokens=max_new_tokens, sampling=sampling)
            if "messages" in row:
                try:
                    validate_messages(row["messages"], last_role="user")
                except RowError as err:
                    raise GenerateInputError(f"{where}: {err}") from None
                request.messages = row["messages"]
            elif isinstance(row.get("prompt"), str):
                request.prompt = row["prompt"]
            else:
                raise GenerateInputError(f"{where}: needs `messages` or a `prompt` string")
            items.append((ident, request))
    return items


def done_ids(output: Path) -> set[str]:
    if not output.exists():
        return set()
    ids = set()
    for line in output.read_text(encoding="utf-8").splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut by a kill: that row is generated again
    return ids


def _drop_cut_line(output: Path) -> None:
    """A kill mid-write leaves a last line without its newline: remove it so appending stays valid jsonl."""
    if not output.exists():
        return
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        output.write_bytes(data[: data.rfind(b"\n") + 1])


def run_generate(loaded: Loaded, items: list[tuple[str, GenerationRequest]], output: Path, batch_size: int) -> int:
    """Generate what `output` does not hold yet, appending one line per row; returns how many were written."""
    _drop_cut_line(output)
    finished = done_ids(output)
    todo = [(i, r) for i, r in items if i not in finished]
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a", encoding="utf-8") as handle, tqdm(total=len(todo), desc="Generating", unit="row") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            results = generate(loaded, [r for _, r in chunk])
            for (ident, _), (choice, *_) in zip(chunk, results, strict=True):
                record: dict[str, Any] = {"id": ident, "output": choice.text, "finish_reason": choice.finish_reason,
                                          "prompt_tokens": choice.prompt_tokens,
                                          "completion_tokens": choice.completion_tokens}
                handle.write(json.dumps(record) + "\n")
            handle.flush()
            bar.update(len(chunk))
    return len(todo)
