"""Preference pairs: sample k answers per prompt from a policy (e.g. the SFT adapter, in-process or behind
`llmtune serve`), score each with a judge, keep the best as chosen and the worst as rejected when the judge
separates them by at least `min_margin`.

`chosen: reference` makes the reference answer the chosen side and the policy's worst sample the rejected one
(Chen et al., 2024, "Self-Play Fine-Tuning", SPIN): pairs exist even when no sample is right, and a sample as
good as the reference leaves no pair.

Judges: `reference` scores agreement with the prompt's reference answer (ROUGE-L F1, via rouge-score);
`rubric` asks the teacher to grade with prompts/judge_rubric.jinja ("Score: N", scaled to 0..1).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from llmtune.config import RecipeError
from llmtune.synth import parsing
from llmtune.synth.context import Call, Context, Task
from llmtune.synth.prompts import Prompt, load_prompt
from llmtune.synth.recipe import PreferencesMethod
from llmtune.synth.records import Record, Rejected, accepted
from llmtune.synth.teachers import Messages, Teacher

Source = tuple[str, Messages, str]  # prompt id, prompt messages (ending with the user), reference answer


def sources_from_records(records: list[Record]) -> list[Source]:
    return [(r["id"], r["messages"][:-1], r["messages"][-1]["content"]) for r in records]


def sources_from_file(path: Path) -> list[Source]:
    from llmtune.data.formats import RowError, to_messages
    from llmtune.data.loading import read_jsonl

    sources = []
    for number, row in read_jsonl(path, objects=True):
        try:
            messages = to_messages(row, "auto")
        except RowError as err:
            raise RecipeError(f"{path}: row {number}: {err}") from None
        sources.append((f"{path.stem}-{number}", messages[:-1], messages[-1]["content"]))
    return sources


async def preference_pairs(method: PreferencesMethod, context: Context, policy: Teacher, judge: Teacher | None,
                           sources: list[Source]) -> list[Record]:
    rubric = load_prompt(method.judge_prompt) if method.judge == "rubric" else None
    return await context.run([_task(method, policy, judge, rubric, source)
                              for source in sample_prompts(sources, method.max_prompts, context.run_seed)])


def sample_prompts(sources: list[Source], limit: int | None, seed: int) -> list[Source]:
    """`limit` prompts drawn evenly from all of them (seeded; in their original order), not the first `limit`:
    sources come grouped (a fact table's rows in order), and the pairs should cover all of it."""
    if not limit or limit >= len(sources):
        return sources
    picked = sorted(random.Random(f"{seed}/preferences").sample(range(len(sources)), limit))
    return [sources[i] for i in picked]


def _task(method: PreferencesMethod, policy: Teacher, judge: Teacher | None, rubric: Prompt | None,
          source: Source) -> Task:
    prompt_id, prompt, reference = source
    item_id = f"preferences:{prompt_id}"
    provenance: dict[str, Any] = {"method": "preferences", "policy": policy.name, "judge": method.judge,
                                  "source": prompt_id, "samples": method.samples}
    if rubric is not None and judge is not None:
        provenance.update(judge_teacher=judge.name, **rubric.provenance)
    question = prompt[-1]["content"]

    async def make(call: Call) -> Record:
        answers = []
        for i in range(method.samples):
            text = await call.chat(policy, f"sample{i}", prompt, seed_offset=i)
            try:
                answers.append(parsing.answer(text, question))
            except Rejected:
                answers.append("")  # an empty or broken sample can still be the rejected one
        scores = [await _score(call, i, answer, question, reference, method, judge, rubric)
                  for i, answer in enumerate(answers)]
        if method.chosen == "reference":  # the reference is chosen, as in SPIN: `samples` scores one above all
            answers.append(reference)
            scores.append(1.0)
        best = max(range(len(answers)), key=lambda i: (scores[i], -i))
        worst = min(range(len(answers)), key=lambda i: (scores[i], i))
        if not answers[best]:
            raise Rejected("every sample was empty or invalid")
        if scores[best] - scores[worst] < method.min_margin or answers[best].strip() == answers[worst].strip():
            raise Rejected(f"no preference: best {scores[best]:.3f} vs worst {scores[worst]:.3f} "
                           f"(min margin {method.min_margin:g})")
        if not answers[worst]:
            answers[worst] = "I don't know."  # the pair needs text; an empty sample is the clearest loser
        pair = {"prompt": prompt, "chosen": [{"role": "assistant", "content": answers[best]}],
                "rejected": [{"role": "assistant", "content": answers[worst]}]}
        record_scores = {"chosen": round(scores[best], 4), "rejected": round(scores[worst], 4),
                         "samples": [round(s, 4) for s in scores]}
        return accepted(item_id, "preferences", {**provenance, "reference": reference}, pair=pair,
                        scores=record_scores, usage=call.usage.as_dict())

    return Task(item_id, "preferences", provenance, make)


async def _score(call: Call, index: int, answer: str, question: str, reference: str, method: PreferencesMethod,
                 judge: Teacher | None, rubric: Prompt | None) -> float:
    if not answer:
        return 0.0
    if method.judge == "reference":
        return reference_agreement(answer, reference)
    assert judge is not None and rubric is not None
    reply = await call.ask(judge, f"judge{index}", rubric.render(question=question, answer=answer,
                                                                 reference=reference), temperature=0.0)
    return parsing.score(reply)


def reference_agreement(answer: str, reference: str) -> float:
    from llmtune.eval.generative import rouge_l

    return rouge_l(answer, reference)
