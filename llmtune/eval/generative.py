"""Generative tasks: greedy answers scored against references by exact match and token F1 (SQuAD's
normalisation: case, punctuation, articles) and ROUGE-L F1 (rouge-score); with several references, the best."""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

from llmtune.eval.items import GenerativeItem
from llmtune.inference.generation import GenerationRequest, Sampling, generate
from llmtune.inference.loading import Loaded

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected:
        return float(predicted == expected)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    return rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure


@functools.cache
def rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def generate_answers(loaded: Loaded, adapter: str, items: list[GenerativeItem], system_prompt: str | None,
                     max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched."""
    answers = []
    for start in range(0, len(items), batch_size):
        requests = []
        for item in items[start : start + batch_size]:
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            messages += [{"role": role, "content": content} for role, content in item.messages]
            requests.append(GenerationRequest(adapter=adapter, messages=messages, max_new_tokens=max_new_tokens,
                                              sampling=Sampling()))
        answers += [choices[0].text.strip() for choices in generate(loaded, requests)]
    return answers


def score_generative(loaded: Loaded, adapter: str, items: list[GenerativeItem], system_prompt: str | None,
                     max_new_tokens: int, batch_size: int,
                     advance: Callable[[int], None] = lambda n: None) -> list[dict[str, Any]]:
    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        for item, text in zip(chunk, generate_answers(loaded, adapter, chunk, system_prompt, max_new_tokens,
                                                      batch_size), strict=True):
            results.append({
                "id": item.id, "category": item.category, "prediction": text,
                "exact_match": max(exact_match(text, r) for r in item.references),
                "f1": max(token_f1(text, r) for r in item.references),
                "rouge_l": max(rouge_l(text, r) for r in item.references),
            })
        advance(len(chunk))
    return results
