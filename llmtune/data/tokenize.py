"""Turn canonical examples into `input_ids` + `labels`, with the loss mask we promise, cached on disk.

Labels are -100 on every prompt/system token and on padding; every assistant token including its end-of-turn
token is trained (`loss_on: assistant`, the default). An example left with no trainable token is reported (or
refused), never silently trained. The cache key covers the data bytes, the data section, the tokenizer and
the chat template, so re-running does not re-tokenize and any change to those does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from llmtune.atomic import atomic_folder
from llmtune.builtin_models import cache_dir
from llmtune.config import Recipe
from llmtune.data.formats import RowError
from llmtune.data.loading import DataError, Example, LoadReport, load_splits, source_fingerprint

# Bump when tokenization output changes for the same inputs, so old caches are not reused.
TOKENIZATION_VERSION = 2


@dataclass
class PreparedData:
    train: Dataset
    validation: Dataset | None
    report: dict[str, Any]
    sources: list[dict[str, Any]]
    cache_path: Path
    from_cache: bool


def truncation_window(max_length: int | None, truncation: str) -> slice:
    """The tokens a row keeps: its first `max_length` (keep_start) or its last (keep_end); all without a limit."""
    if max_length is None:
        return slice(None)
    return slice(None, max_length) if truncation == "keep_start" else slice(-max_length, None)


def longest_row(*datasets) -> int:
    """Tokens in the longest tokenized row (what the attention and memory choices depend on)."""
    return max((max(map(len, ds["input_ids"]), default=0) for ds in datasets if ds is not None), default=0)


def tokenize_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    template: str | None,
    loss_on: str,
    max_length: int | None,
    truncation: str = "keep_start",
) -> tuple[list[int], list[int], bool]:
    """Token ids, labels, and whether it was truncated; raises RowError if nothing would be trained."""
    encoded = tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=loss_on == "assistant",
    )
    ids = list(encoded["input_ids"])
    if loss_on == "assistant":
        labels = [t if keep else -100 for t, keep in zip(ids, encoded["assistant_masks"], strict=True)]
    else:
        labels = list(ids)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        window = truncation_window(max_length, truncation)
        ids, labels = ids[window], labels[window]
    if all(label == -100 for label in labels):
        why = f"after truncation to max_length={max_length}" if truncated else "the template marked no assistant token"
        raise RowError(f"no trainable tokens ({why})")
    return ids, labels, truncated


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, template: str | None) -> PreparedData:
    """Load, validate, split and tokenize the recipe's data, reusing the on-disk cache when inputs match."""
    data = recipe.data
    sources = [source_fingerprint(s) for s in [*data.train, *data.validation]]
    key = _cache_key(recipe, tokenizer, template, sources)
    path = cache_dir() / "tokenized" / key
    if (path / "report.json").is_file():
        return _load_cached(path, sources)

    loaded = load_splits(recipe)
    report: dict[str, Any] = {"loaded": {k: v.as_dict() for k, v in loaded.loaded.items()}}
    tokenized: dict[str, Dataset] = {}
    for name, examples in (("train", loaded.train), ("validation", loaded.validation)):
        if examples:
            tokenized[name], report[name] = _tokenize_split(name, examples, tokenizer, template, recipe)
    train_ds, val_ds = tokenized["train"], tokenized.get("validation")
    _save_atomically(path, train_ds, val_ds, report)
    return PreparedData(train_ds, val_ds, report, sources, path, from_cache=False)


def _tokenize_split(
    name: str,
    examples: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    template: str | None,
    recipe: Recipe,
) -> tuple[Dataset, dict[str, Any]]:
    data = recipe.data
    skipped = LoadReport()
    columns: dict[str, list[Any]] = {"input_ids": [], "labels": [], "source": [], "row": []}
    truncated = 0
    for example in tqdm(examples, desc=f"Tokenizing {name}", unit="row", leave=False):
        try:
            ids, labels, was_truncated = tokenize_messages(
                tokenizer, example.value, template, data.loss_on, data.max_length, data.truncation
            )
        except RowError as err:
            where = f"{example.source}: row {example.row}"
            if data.on_bad_row == "error":
                raise DataError(f"{where}: {err} (set `data.on_bad_row: skip` to skip such rows)") from None
            skipped.skip(where, str(err))
            continue
        truncated += was_truncated
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        columns["source"].append(Path(example.source).name)
        columns["row"].append(example.row)
    if not columns["input_ids"]:
        raise DataError(f"{name}: every row was skipped; first reasons: {skipped.first_skipped[:3]}")
    stats = {
        "rows": len(columns["input_ids"]),
        "rows_skipped": sum(skipped.skipped.values()),
        "skipped_by_reason": dict(skipped.skipped),
        "first_skipped": skipped.first_skipped,
        "rows_truncated": truncated,
        "tokens": sum(len(ids) for ids in columns["input_ids"]),
        "trainable_tokens": sum(sum(1 for t in labels if t != -100) for labels in columns["labels"]),
    }
    return Dataset.from_dict(columns), stats


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase, template: str | None) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    payload = json.dumps([vocab, template, tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token])
    return hashlib.sha256(payload.encode()).hexdigest()


def _cache_key(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, template: str | None, sources: list) -> str:
    data = recipe.data.model_dump(mode="json", exclude={"train", "validation", "packing"})
    payload = {
        "version": TOKENIZATION_VERSION,
        "data": data,
        "sources": sources,
        "seed": recipe.seed if recipe.data.validation_fraction else None,
        "tokenizer": tokenizer_fingerprint(tokenizer, template),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _save_atomically(path: Path, train: Dataset, validation: Dataset | None, report: dict[str, Any]) -> None:
    with atomic_folder(path, replace=False) as staging:  # another rank may have finished first
        train.save_to_disk(str(staging / "train"))
        if validation is not None:
            validation.save_to_disk(str(staging / "validation"))
        (staging / "report.json").write_text(json.dumps(report, indent=2))


def _load_cached(path: Path, sources: list[dict[str, Any]]) -> PreparedData:
    report = json.loads((path / "report.json").read_text())
    train = load_from_disk(str(path / "train"))
    validation = load_from_disk(str(path / "validation")) if (path / "validation").exists() else None
    return PreparedData(train, validation, report, sources, path, from_cache=True)
