"""Decontamination: no evaluation item may reach training, verbatim or lightly reworded.

Three checks between every synthesized item (all its text) and every eval item (its question or prompt):
- exact: the eval text, normalised (case, punctuation, spacing), appears inside the item;
- n-gram: the two share a word n-gram (13 by default, as in GPT-3's contamination study);
- fuzzy: at least `fuzzy_threshold` of the eval item's content words appear in the item in the same order
  (LCS recall via rouge-score), for eval items with enough content words that this cannot happen by chance.
  It catches a reworded copy that breaks every long n-gram.

Written here because no kept library does n-gram decontamination against arbitrary jsonl eval sets in-process
(lm-eval's decontamination tooling works on its own task format and pre-built n-gram files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune.config import RecipeError
from llmtune.data.loading import read_jsonl
from llmtune.synth.recipe import DecontaminationSection
from llmtune.synth.records import Record, as_rejected, prompt_text
from llmtune.synth.text import content_words, normalized, words

_TEXT_KEYS = ("question", "prompt", "instruction", "input", "query", "problem")


@dataclass(frozen=True)
class EvalItem:
    eval_set: str
    id: str
    text: str


def read_eval_items(path: Path) -> list[EvalItem]:
    items = []
    for number, row in read_jsonl(path, objects=True):
        text = eval_text(row)
        if not text:
            raise RecipeError(f"{path}: row {number}: no text to check against (expected one of "
                              f"{', '.join(_TEXT_KEYS)} or user messages)")
        items.append(EvalItem(path.name, str(row.get("id") or number), text))
    return items


def eval_text(row: dict[str, Any]) -> str:
    parts = [str(row[key]) for key in _TEXT_KEYS if isinstance(row.get(key), str) and row[key].strip()]
    for message in row.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "user":
            parts.append(str(message.get("content") or ""))
    return "\n".join(parts).strip()


def record_text(record: Record) -> str:
    conversation = [*(record.get("messages") or []), *(record.get("prompt") or []), *(record.get("chosen") or []),
                    *(record.get("rejected") or [])]
    return "\n".join(m["content"] for m in conversation)


@dataclass
class Decontamination:
    kept: list[Record]
    removed: list[Record]
    matches: list[dict[str, Any]]


class EvalIndex:
    """The eval sets read and indexed once per run; `check` then serves SFT items and preference pairs alike."""

    def __init__(self, section: DecontaminationSection) -> None:
        self.section = section
        items = [item for path in section.eval_sets for item in read_eval_items(path)]
        self.grams: dict[tuple[str, ...], EvalItem] = {}
        for item in items:
            tokens = words(item.text)
            for i in range(len(tokens) - section.ngram + 1):
                self.grams.setdefault(tuple(tokens[i : i + section.ngram]), item)
        # Whole prompts equal to an eval text at any length; eval texts inside longer items from 8 words up,
        # where a shared phrase is no longer a coincidence ("which drug is this").
        self.whole = {normalized(item.text): item for item in items}
        self.exact = [(f" {normalized(item.text)} ", item) for item in items if len(words(item.text)) >= 8]
        fuzzy = [(content_words(item.text), item) for item in items]
        self.fuzzy = [(cw, item) for cw, item in fuzzy if len(cw) >= section.fuzzy_min_words]

    def check(self, records: list[Record]) -> Decontamination:
        from rouge_score import rouge_scorer

        section = self.section
        kept, removed, matches = [], [], []
        for record in records:
            text = record_text(record)
            match = _exact(normalized(prompt_text(record)), self.whole, f" {normalized(text)} ", self.exact)
            match = match or _ngram(words(text), self.grams, section.ngram)
            if match is None and section.fuzzy_threshold is not None:
                match = _fuzzy(content_words(text), self.fuzzy, section.fuzzy_threshold, rouge_scorer._score_lcs)
            if match is None:
                kept.append(record)
                continue
            kind, item, detail = match
            matches.append({"id": record["id"], "method": record["method"], "eval_set": item.eval_set,
                            "eval_id": item.id, "match": kind, "detail": detail})
            removed.append(as_rejected(record, "decontamination",
                                       f"{kind} match with {item.eval_set}:{item.id} ({detail})"))
        return Decontamination(kept, removed, matches)


def decontaminate(records: list[Record], section: DecontaminationSection) -> Decontamination:
    return EvalIndex(section).check(records)


def _exact(prompt: str, whole: dict[str, EvalItem], text: str, exact: list[tuple[str, EvalItem]]):
    if prompt in whole:
        return "exact", whole[prompt], "the prompt is the eval text"
    for needle, item in exact:
        if needle in text:
            return "exact", item, "normalised eval text inside the item"
    return None


def _ngram(tokens: list[str], grams: dict[tuple[str, ...], EvalItem], n: int):
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i : i + n])
        if gram in grams:
            return "ngram", grams[gram], f"shared {n}-gram '{' '.join(gram)}'"
    return None


def _fuzzy(tokens: list[str], fuzzy: list[tuple[list[str], EvalItem]], threshold: float, lcs):
    present = set(tokens)
    for eval_words, item in fuzzy:
        # Cheap bound first: the LCS cannot cover more eval words than the item contains at all.
        if sum(w in present for w in eval_words) < threshold * len(eval_words):
            continue
        recall = lcs(eval_words, tokens).recall
        if recall >= threshold:
            return "fuzzy", item, f"{recall:.2f} of the eval item's content words in order"
    return None
