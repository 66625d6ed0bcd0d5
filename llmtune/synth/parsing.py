"""Validation of teacher output: each parser returns clean text or raises Rejected with the reason."""

from __future__ import annotations

import re
import unicodedata

from llmtune.synth.records import Rejected

_LABEL = re.compile(r"^\s*(?:(?:new\s+)?task\s*\d*|question|q|instruction|answer|a|rewritten task)\s*[:.)-]\s*",
                    re.IGNORECASE)
_NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+")
_TEMPLATE_LEAK = re.compile(r"\{\{|\}\}|\{%|<\|[a-z_]+\|>|<\/?s>", re.IGNORECASE)
_SCORE = re.compile(r"score\s*[:=]?\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?", re.IGNORECASE)
# A question inside a longer line: from a capitalised word to the first question mark.
_QUESTION = re.compile(r"\b([A-Z][^.!?:\"]*\?)")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def one_line(text: str, what: str, *, min_words: int = 3, max_words: int = 80, question: bool = False) -> str:
    """A single task or question: the first non-empty line, labels and numbering removed."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise Rejected(f"empty {what}")
    line = _NUMBERING.sub("", _LABEL.sub("", lines[0])).strip().strip('"').strip()
    if question and (asked := _QUESTION.findall(line)):
        line = asked[0]  # `The patient could ask: "How ...?"` -> the question itself
    _check_text(line, what)
    words = len(line.split())
    if words < min_words:
        raise Rejected(f"{what} too short ({words} words, min {min_words})")
    if words > max_words:
        raise Rejected(f"{what} too long ({words} words, max {max_words})")
    if line.endswith(":"):
        raise Rejected(f"{what} is a heading, not a {what} (ends with ':')")
    if question and not line.endswith("?"):
        raise Rejected(f"{what} is not a question (no '?')")
    return line


def answer(text: str, prompt: str) -> str:
    """A free-text answer: not empty, not an echo of the prompt, no chat-template debris."""
    cleaned = _LABEL.sub("", text.strip()).strip()
    if not cleaned:
        raise Rejected("empty answer")
    _check_text(cleaned, "answer")
    if cleaned.lower() == prompt.strip().lower():
        raise Rejected("answer repeats the prompt")
    return cleaned


def score(text: str, low: float = 1, high: float = 10) -> float:
    """A judge's `Score: N`, scaled to 0..1."""
    match = _SCORE.search(text)
    if match is None:
        raise Rejected("judge reply has no 'Score: N'")
    value = float(match.group(1))
    if not low <= value <= high:
        raise Rejected(f"judge score {value:g} outside {low:g}..{high:g}")
    return (value - low) / (high - low)


def _check_text(text: str, what: str) -> None:
    # U+FFFD comes from decoding a cut byte sequence; control characters never belong in an instruction or answer.
    if any(ch == "\ufffd" or (unicodedata.category(ch) == "Cc" and ch not in "\n\t") for ch in text):
        raise Rejected(f"{what} contains broken or control characters")
    if _TEMPLATE_LEAK.search(text):
        raise Rejected(f"{what} contains template or special-token text")
    letters = sum(len(w) for w in _WORD.findall(text))
    if letters < 0.5 * len(text.replace(" ", "")):
        raise Rejected(f"{what} is mostly not words")
