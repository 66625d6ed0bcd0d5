"""Text normalisation shared by filters and decontamination."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")
# Function words carry no content: dropping them keeps "what does X do" and "what is X for" from matching.
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "may",
        "might",
        "most",
        "of",
        "on",
        "or",
        "should",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "was",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
    ]
)


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens: punctuation, case and spacing do not matter."""
    return _TOKEN.findall(text.lower())


def normalized(text: str) -> str:
    return " ".join(words(text))


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS]
