"""Read the recipe's data sources row by row, normalise each row, and account for every row skipped.

Local files are parsed here (not through `datasets.load_dataset`) so that a bad row is reported with its file
and row number; hub datasets go through `datasets` and are only available online or from the local cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.config import DataSection, DataSource, Recipe
from llmtune.data.formats import RowError, to_messages
from llmtune.errors import LlmtuneError
from llmtune.hashing import file_sha256


class DataError(LlmtuneError, ValueError):
    """Unusable data; the message names the file and row."""


@dataclass
class Example:
    value: Any  # chat messages (SFT) or a {prompt, chosen, rejected} pair (preferences)
    source: str
    row: int  # 1-based row (line number for jsonl)


@dataclass
class LoadReport:
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first_skipped: list[str] = field(default_factory=list)

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason.split(":")[0]] += 1
        if len(self.first_skipped) < 10:
            self.first_skipped.append(f"{where}: {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(self.skipped),
            "first_skipped": self.first_skipped,
        }


def folder_sha256(path: str | Path) -> str:
    """One hash over every file of a dataset folder (relative names and contents)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def source_fingerprint(source: DataSource) -> dict[str, Any]:
    """What identifies a source's content: the file hash, or the hub id + split."""
    info: dict[str, Any] = {"path": source.path, "format": source.format, "max_rows": source.max_rows}
    if source.is_local:
        info["sha256"] = file_sha256(source.path)
    elif Path(source.path).is_dir():
        info.update(split=source.split, subset=source.subset, sha256=folder_sha256(source.path))
    else:
        info.update(split=source.split, subset=source.subset)
    return info


def load_examples(
    sources: list[DataSource], data: DataSection, convert: Callable[..., Any] = to_messages
) -> tuple[list[Example], LoadReport]:
    """Every row through `convert(row, format, system_prompt)`; bad rows raise or are counted per reason."""
    report = LoadReport()
    examples: list[Example] = []
    for source in sources:
        for row_number, row in _read_rows(source):
            where = f"{source.path}: row {row_number}"
            report.rows_read += 1
            try:
                if not isinstance(row, dict):
                    raise RowError(f"expected an object, got {type(row).__name__}")
                value = convert(row, source.format, data.system_prompt)
            except RowError as err:
                if data.on_bad_row == "error":
                    raise DataError(f"{where}: {err} (set `data.on_bad_row: skip` to skip such rows)") from None
                report.skip(where, str(err))
                continue
            examples.append(Example(value, source.path, row_number))
            report.rows_kept += 1
    if not examples:
        raise DataError(f"no usable rows in {', '.join(s.path for s in sources)}")
    return examples, report


@dataclass
class Splits:
    """Train and validation examples, and the load report of each file set (`train_files`, `validation_files`)."""

    train: list[Example]
    validation: list[Example]
    loaded: dict[str, LoadReport]


def load_splits(recipe: Recipe, convert: Callable[..., Any] = to_messages) -> Splits:
    """The recipe's train rows and validation rows: its validation files, or a seeded `validation_fraction` of
    the train rows (none otherwise)."""
    data = recipe.data
    train, train_report = load_examples(data.train, data, convert=convert)
    loaded = {"train_files": train_report}
    validation: list[Example] = []
    if data.validation:
        validation, loaded["validation_files"] = load_examples(data.validation, data, convert=convert)
    elif data.validation_fraction:
        train, validation = split_examples(train, data.validation_fraction, recipe.seed)
    return Splits(train, validation, loaded)


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    val_idx = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val_idx], [examples[i] for i in sorted(val_idx)]


def _read_rows(source: DataSource) -> Iterator[tuple[int, Any]]:
    rows = _read_local(source) if source.is_local else _read_hub(source)
    for count, item in enumerate(rows):
        if source.max_rows is not None and count >= source.max_rows:
            return
        yield item


def read_jsonl(path: Path, objects: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, row) for each non-blank line; bad JSON (or, with `objects`, a non-object) names the row."""
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: row {line_number}: invalid JSON: {err.msg}") from None
            if objects and not isinstance(row, dict):
                raise DataError(f"{path}: row {line_number}: expected a JSON object")
            yield line_number, row


def _read_local(source: DataSource) -> Iterator[tuple[int, Any]]:
    path = Path(source.path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from read_jsonl(path)
    elif suffix == ".json":
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        if not isinstance(payload, list):
            raise DataError(f"{path}: expected a JSON array of rows")
        yield from enumerate(payload, start=1)
    else:
        import pandas as pd

        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        for index, record in enumerate(frame.to_dict(orient="records"), start=1):
            yield index, {k: _decode_cell(v) for k, v in record.items()}


def _decode_cell(value: Any) -> Any:
    # CSV cells holding JSON lists (messages, conversations) arrive as strings; parquet arrives as arrays.
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and math.isnan(value):  # an empty CSV cell
        return None
    return value


def _read_hub(source: DataSource) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, source.subset, split=source.split)
    except Exception as err:  # datasets raises many types; the user needs the id and the reason
        kind = "dataset folder" if Path(source.path).is_dir() else "hub dataset"
        raise DataError(f"{source.path}: cannot load {kind} (split {source.split!r}): {err}") from None
    yield from enumerate(dataset, start=1)
