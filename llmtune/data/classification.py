"""Rows for `task: classification`: {text, label} from the recipe's files, checked against the label set,
split, and tokenized (truncated to `data.max_length`) into `input_ids` + an integer `labels` column.

Rows go through the same loader as chat data (llmtune/data/loading.py), so a bad row (no text, a label outside
the set) names its file and row, and `data.on_bad_row: skip` counts it instead of stopping.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from llmtune.config import ClassificationSection, DataSection, Recipe
from llmtune.data.formats import RowError
from llmtune.data.loading import Example, load_splits, source_fingerprint
from llmtune.data.tokenize import longest_row, truncation_window


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str


@dataclass
class ClassificationData:
    train: Dataset  # input_ids, labels (the label's index in `classification.labels`)
    validation: Dataset | None
    report: dict[str, Any]
    sources: list[dict[str, Any]]

    @property
    def longest(self) -> int:
        """Tokens in the longest row (what the attention and memory choices depend on)."""
        return longest_row(self.train, self.validation)


def row_converter(section: ClassificationSection):
    """`load_examples`' converter: a row -> LabelledText, or RowError naming the field or the label set."""
    labels = set(section.labels)

    def convert(row: dict[str, Any], fmt: str, system_prompt: str | None) -> LabelledText:
        text, label = row.get(section.text_field), row.get(section.label_field)
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"`{section.text_field}` must be non-empty text")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)  # a CSV column of numeric labels ("0", "1") arrives as integers
        if label not in labels:
            raise RowError(f"label {label!r} (`{section.label_field}`) is not one of the labels: "
                           f"{', '.join(section.labels)}")
        return LabelledText(text, label)

    return convert


def encode_text(tokenizer, text: str, max_length: int | None, truncation: str = "keep_start") -> list[int]:
    """Token ids of one text as training saw it; training and inference both call this."""
    return truncate(tokenizer(text)["input_ids"], max_length, truncation)


def truncate(ids: list[int], max_length: int | None, truncation: str) -> list[int]:
    return ids[truncation_window(max_length, truncation)]


def prepare_classification_data(recipe: Recipe, tokenizer) -> ClassificationData:
    section, data = recipe.classification, recipe.data
    assert section is not None  # Recipe._check_task
    convert = row_converter(section)
    loaded = load_splits(recipe, convert)
    report: dict[str, Any] = {"loaded": {k: v.as_dict() for k, v in loaded.loaded.items()}}
    splits: dict[str, Dataset] = {}
    for name, examples in (("train", loaded.train), ("validation", loaded.validation)):
        if examples:
            splits[name], report[name] = _tokenize(examples, tokenizer, section, data)
    sources = [source_fingerprint(s) for s in [*data.train, *data.validation]]
    return ClassificationData(splits["train"], splits.get("validation"), report, sources)


def _tokenize(examples: list[Example], tokenizer, section: ClassificationSection,
              data: DataSection) -> tuple[Dataset, dict[str, Any]]:
    index = {label: i for i, label in enumerate(section.labels)}
    full = [tokenizer(e.value.text)["input_ids"] for e in examples]
    ids = [truncate(row, data.max_length, data.truncation) for row in full]
    counts = Counter(e.value.label for e in examples)
    stats = {
        "rows": len(examples),
        "rows_truncated": sum(len(row) > len(kept) for row, kept in zip(full, ids, strict=True)),
        "tokens": sum(map(len, ids)),
        "label_counts": {label: counts[label] for label in section.labels},
    }
    columns = {"input_ids": ids, "labels": [index[e.value.label] for e in examples]}
    return Dataset.from_dict(columns), stats
