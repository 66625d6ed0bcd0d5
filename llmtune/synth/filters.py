"""Filters over accepted items, in order: length bounds, refusals and blocked keywords, near-duplicates.
Each removal becomes a rejected record naming the filter and the reason; nothing is dropped silently."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from llmtune.synth.recipe import FiltersSection, NearDuplicates
from llmtune.synth.records import Record, as_rejected, prompt_text, response_text
from llmtune.synth.text import words

# Answers that refuse, or talk about being a language model, teach the student to do the same.
_REFUSAL = re.compile(
    r"\b(as an ai\b|as a language model|i am an ai|i'm an ai|i cannot (help|assist|provide)|"
    r"i can't (help|assist|provide)|i am unable to|i'm unable to|i'm sorry, but|i apologi[sz]e, but)",
    re.IGNORECASE,
)


@dataclass
class FilterResult:
    kept: list[Record]
    removed: list[Record] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def remove(self, record: Record, name: str, reason: str) -> None:
        self.removed.append(as_rejected(record, f"filter:{name}", reason))
        self.counts[name] += 1


def apply_filters(records: list[Record], section: FiltersSection, seed_prompts: list[str]) -> FilterResult:
    """`seed_prompts`: human-written tasks that machine tasks must not near-duplicate (Self-Instruct)."""
    result = FilterResult(kept=[])
    survivors = []
    for record in records:
        reason = _length_problem(record, section)
        if reason:
            result.remove(record, "length", reason)
            continue
        reason = _content_problem(record, section)
        if reason:
            result.remove(record, "content", reason)
            continue
        survivors.append(record)
    if section.near_duplicates is None:
        result.kept = survivors
        return result
    checker = _near_duplicate_checker(section.near_duplicates, seed_prompts)
    for record in survivors:
        if record["method"] not in section.near_duplicates.methods:
            result.kept.append(record)
            continue
        similarity, reason = checker(record["id"], prompt_text(record))
        if reason:
            result.remove(record, "near_duplicate", reason)
        else:
            result.kept.append({**record, "scores": {**record.get("scores", {}), "near_duplicate": similarity}})
    return result


def _length_problem(record: Record, section: FiltersSection) -> str | None:
    prompt_words, response_words = len(prompt_text(record).split()), len(response_text(record).split())
    if not section.min_prompt_words <= prompt_words <= section.max_prompt_words:
        return f"prompt has {prompt_words} words (allowed {section.min_prompt_words}..{section.max_prompt_words})"
    if not section.min_response_words <= response_words <= section.max_response_words:
        return (f"response has {response_words} words "
                f"(allowed {section.min_response_words}..{section.max_response_words})")
    return None


def _content_problem(record: Record, section: FiltersSection) -> str | None:
    response = response_text(record)
    # A fact table's answers are written by its author: a refusal there (a safety row) is the point, not debris.
    if section.refusals and record["method"] != "fact_templates" and (match := _REFUSAL.search(response)):
        return f"refusal or AI disclaimer: {match.group(0)!r}"
    text = f"{prompt_text(record)}\n{response}".lower()
    for keyword in section.blocked_keywords:
        if keyword.lower() in text:
            return f"blocked keyword {keyword!r}"
    return None


def _near_duplicate_checker(settings: NearDuplicates, seed_prompts: list[str]):
    """A function (id, prompt) -> (highest similarity, reason or None) that remembers every prompt it let through."""
    if settings.method == "rouge_l":
        from rouge_score import rouge_scorer

        # As Self-Instruct's own code does: tokenize once, then score token lists with rouge-score's LCS.
        tokenizer = rouge_scorer.RougeScorer(["rougeL"])._tokenizer
        pool = [("seed", tokenizer.tokenize(text)) for text in seed_prompts]

        def check_rouge(item_id: str, prompt: str) -> tuple[float, str | None]:
            tokens = tokenizer.tokenize(prompt)
            best, best_id = 0.0, None
            for other_id, other in pool:
                score = rouge_scorer._score_lcs(other, tokens).fmeasure
                if score > best:
                    best, best_id = score, other_id
            if best > settings.threshold:
                return best, f"ROUGE-L {best:.2f} > {settings.threshold:g} with {best_id}"
            pool.append((item_id, tokens))
            return round(best, 4), None

        return check_rouge

    from datasketch import MinHash, MinHashLSH

    index = MinHashLSH(threshold=settings.threshold, num_perm=settings.num_perm)

    def signature(text: str) -> MinHash:
        tokens = words(text)
        shingles = {" ".join(tokens[i : i + 3]) for i in range(max(1, len(tokens) - 2))}
        minhash = MinHash(num_perm=settings.num_perm, seed=1)
        minhash.update_batch([s.encode() for s in shingles])
        return minhash

    signatures = {f"seed-{number}": signature(text) for number, text in enumerate(seed_prompts)}
    for key, minhash in signatures.items():
        index.insert(key, minhash)

    def check_minhash(item_id: str, prompt: str) -> tuple[float, str | None]:
        minhash = signature(prompt)
        similar = sorted(index.query(minhash))
        if similar:
            estimate = minhash.jaccard(signatures[similar[0]])
            return estimate, f"MinHash Jaccard {estimate:.2f} (LSH threshold {settings.threshold:g}) with {similar[0]}"
        index.insert(item_id, minhash)
        signatures[item_id] = minhash
        return 0.0, None

    return check_minhash
