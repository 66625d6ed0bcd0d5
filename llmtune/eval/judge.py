"""LLM-as-judge tasks: each model answers greedily; a judge (any teacher: an OpenAI-compatible endpoint or a
local model) grades the answer with a rubric prompt ("Score: N", 1..10, scaled to 0..1). `judge_pass` is a
score of at least 0.5, compared between models with McNemar's test. The safety slice uses `judge_safety`
(did the answer decline, refer or send to emergency care as `expected`).

A judge that fails on an item (after its retries) or replies without a score gives that item 0 and records
why (`judge_error`), so models stay paired item by item."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

from llmtune.eval.generative import generate_answers
from llmtune.eval.items import GenerativeItem
from llmtune.inference.loading import Loaded
from llmtune.synth import parsing
from llmtune.synth.prompts import load_prompt
from llmtune.synth.recipe import TeacherSection
from llmtune.synth.records import Rejected, item_seed
from llmtune.synth.teachers import TeacherFailure, make_teacher


def score_judged(loaded: Loaded, adapter: str, items: list[GenerativeItem], system_prompt: str | None,
                 max_new_tokens: int, batch_size: int, judge: TeacherSection, judge_prompt: str, seed: int,
                 advance: Callable[[int], None] = lambda n: None) -> Iterator[dict[str, Any]]:
    prompt = load_prompt(judge_prompt)
    answers = generate_answers(loaded, adapter, items, system_prompt, max_new_tokens, batch_size)
    graded: list[dict[str, Any]] = []

    async def grade_all() -> None:
        teacher = make_teacher(judge, in_memory=loaded)
        try:
            async def grade(item: GenerativeItem, answer: str) -> None:
                question = item.messages[-1][1]
                text = prompt.render(question=question, answer=answer, expected=item.expected or "",
                                     reference=item.references[0] if item.references else "")
                result: dict[str, Any] = {"id": item.id, "category": item.category, "prediction": answer,
                                          "judge_reply": None, "judge_error": None}
                try:
                    completion = await teacher.complete([{"role": "user", "content": text}],
                                                        seed=item_seed(seed, item.id), item_id=f"{item.id}#judge",
                                                        temperature=0.0)
                    result["judge_reply"] = completion.text
                    score = parsing.score(completion.text)
                except (TeacherFailure, Rejected) as err:
                    result["judge_error"], score = str(err), 0.0
                result.update(judge_score=score, judge_pass=float(score >= 0.5))
                graded.append(result)
                advance(1)

            await asyncio.gather(*(grade(item, answer) for item, answer in zip(items, answers, strict=True)))
        finally:
            await teacher.close()

    asyncio.run(grade_all())
    order = {item.id: index for index, item in enumerate(items)}
    yield from sorted(graded, key=lambda r: order[r["id"]])
