"""Document-grounded QA: domain documents are cut into chunks of whole paragraphs; the teacher writes questions
each chunk answers and answers them from the chunk. Each item keeps its source span (file, character offsets)
and a grounding score: the share of the answer's content words that occur in the chunk."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from llmtune.config import RecipeError
from llmtune.synth import parsing
from llmtune.synth.context import Call, Context, Task
from llmtune.synth.prompts import Prompt, load_prompt
from llmtune.synth.recipe import DocQaMethod
from llmtune.synth.records import Record, Rejected, accepted
from llmtune.synth.teachers import Teacher
from llmtune.synth.text import content_words

DOCUMENT_SUFFIXES = (".txt", ".md")
_REFERS_TO_SOURCE = re.compile(r"\b(the|this|that|above) (passage|text|document|excerpt|article)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Chunk:
    document: Path
    index: int
    start: int  # character offsets in the document
    end: int
    text: str
    title: str  # the document's first line


def documents(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        found += sorted(p for p in path.rglob("*") if p.suffix in DOCUMENT_SUFFIXES) if path.is_dir() else [path]
    if not found:
        raise RecipeError(f"doc_qa: no .txt or .md documents in {', '.join(map(str, paths))}")
    return found


def chunk_document(path: Path, max_words: int) -> list[Chunk]:
    """Consecutive paragraphs packed up to `max_words`; a longer paragraph is a chunk of its own."""
    text = path.read_text(encoding="utf-8")
    title = (text.strip().splitlines() or [""])[0].lstrip("# ").strip() or path.stem
    paragraphs = [(m.start(), m.end()) for m in re.finditer(r"\S(?:.*?\S)?(?=\n\s*\n|\s*\Z)", text, re.DOTALL)]
    chunks: list[Chunk] = []
    start = end = None
    words = 0
    for p_start, p_end in paragraphs:
        count = len(text[p_start:p_end].split())
        if start is not None and words + count > max_words:
            chunks.append(Chunk(path, len(chunks), start, end, text[start:end], title))
            start = None
        if start is None:
            start, words = p_start, 0
        end, words = p_end, words + count
    if start is not None:
        chunks.append(Chunk(path, len(chunks), start, end, text[start:end], title))
    return chunks


async def doc_qa(method: DocQaMethod, context: Context, teacher: Teacher) -> list[Record]:
    question_prompt, answer_prompt = load_prompt(method.question_prompt), load_prompt(method.answer_prompt)
    tasks = []
    for document in documents(method.documents):
        for chunk in chunk_document(document, method.chunk_words):
            for k in range(method.questions_per_chunk):
                item_id = f"doc_qa:{document.stem}:{chunk.index:03d}:{k}"
                tasks.append(_task(item_id, method, teacher, question_prompt, answer_prompt, chunk))
    return await context.run(tasks)


def grounding(answer: str, passage: str) -> float:
    words = content_words(answer)
    if not words:
        return 0.0
    source = set(content_words(passage))
    return sum(w in source for w in words) / len(words)


def _check_standalone(question: str, passage: str) -> None:
    """A question must make sense without its passage and be about it."""
    if _REFERS_TO_SOURCE.search(question):
        raise Rejected("question refers to the passage instead of standing alone")
    source = set(content_words(passage))
    if not any(len(word) > 3 and word in source for word in content_words(question)):
        raise Rejected("question names nothing from its passage")


def _task(item_id: str, method: DocQaMethod, teacher: Teacher, question_prompt: Prompt, answer_prompt: Prompt,
          chunk: Chunk) -> Task:
    provenance = {"method": "doc_qa", "teacher": teacher.name, **question_prompt.provenance,
                  "answer_template": answer_prompt.name, "document": chunk.document.name, "chunk": chunk.index,
                  "span": [chunk.start, chunk.end],
                  "chunk_sha256": hashlib.sha256(chunk.text.encode()).hexdigest()[:16]}

    async def make(call: Call) -> Record:
        text = await call.ask(teacher, "question", question_prompt.render(passage=chunk.text, title=chunk.title))
        question = parsing.one_line(text, "question", question=True)
        _check_standalone(question, chunk.text)
        reply = await call.ask(teacher, "answer", answer_prompt.render(passage=chunk.text, question=question),
                               seed_offset=1)
        answer = parsing.answer(reply, question)
        score = grounding(answer, chunk.text)
        if score < method.min_grounding:
            raise Rejected(f"answer not grounded in its chunk (grounding {score:.2f} < {method.min_grounding:g})")
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return accepted(item_id, "doc_qa", provenance, messages=messages, scores={"grounding": round(score, 4)},
                        usage=call.usage.as_dict())

    return Task(item_id, "doc_qa", provenance, make)
