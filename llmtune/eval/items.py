"""Eval items read from jsonl, validated row by row (errors name the file and row)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.data.loading import DataError, read_jsonl

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class McqItem:
    id: str
    category: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index of the correct choice


@dataclass(frozen=True)
class GenerativeItem:
    id: str
    category: str
    messages: tuple[tuple[str, str], ...]  # (role, content), ending with the user
    references: tuple[str, ...]
    expected: str | None = None  # judge tasks: the behaviour the rubric checks for (e.g. "refer")


@dataclass(frozen=True)
class ClassificationItem:
    id: str
    category: str
    text: str
    label: str


def read_mcq(path: Path, max_items: int | None = None) -> list[McqItem]:
    items = []
    for number, row in read_jsonl(path, objects=True):
        where = f"{path}: row {number}"
        question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: `question` must be non-empty text")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: `choices` must be a list of at least two non-empty strings")
        if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[: len(choices)]:
            answer = LETTERS.index(answer.upper())
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: `answer` must be a choice index 0..{len(choices) - 1} or its letter")
        items.append(McqItem(str(row.get("id", number)), str(row.get("category", "all")), question.strip(),
                             tuple(choices), answer))
    return _unique(items, path)[:max_items]


def read_generative(path: Path, max_items: int | None = None, references_required: bool = True
                    ) -> list[GenerativeItem]:
    items = []
    for number, row in read_jsonl(path, objects=True):
        where = f"{path}: row {number}"
        messages = _prompt(row, where)
        references = row.get("answer", row.get("reference", row.get("references")))
        references = [references] if isinstance(references, str) else references
        if references is None and not references_required:
            references = []
        elif not isinstance(references, list) or not references or not all(isinstance(r, str) for r in references):
            raise DataError(f"{where}: `answer` (or `references`) must be text or a list of texts")
        expected = row.get("expected")
        if expected is not None and not isinstance(expected, str):
            raise DataError(f"{where}: `expected` must be text")
        items.append(GenerativeItem(str(row.get("id", number)), str(row.get("category", "all")), messages,
                                    tuple(references), expected))
    return _unique(items, path)[:max_items]


def read_classification(path: Path, max_items: int | None = None) -> list[ClassificationItem]:
    """Rows {text, label} (and optional id, category); the labels are checked against the model's when scored."""
    items = []
    for number, row in read_jsonl(path, objects=True):
        where = f"{path}: row {number}"
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: `text` must be non-empty text")
        if not isinstance(label, str) or not label:
            raise DataError(f"{where}: `label` must be the name of a label")
        items.append(ClassificationItem(str(row.get("id", number)), str(row.get("category", "all")), text, label))
    return _unique(items, path)[:max_items]


def _prompt(row: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(row.get("messages"), list):
        messages = [(m.get("role"), m.get("content")) for m in row["messages"] if isinstance(m, dict)]
        if messages and messages[-1][0] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1][0] != "user" or not all(isinstance(c, str) for _, c in messages):
            raise DataError(f"{where}: `messages` must end with a user message (an assistant answer may follow)")
        return tuple(messages)
    text = row.get("question", row.get("prompt"))
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: needs `question`, `prompt` or `messages`")
    return (("user", text.strip()),)


def _unique(items: list, path: Path) -> list:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{path}: duplicate id {item.id!r}")
        seen.add(item.id)
    return items
