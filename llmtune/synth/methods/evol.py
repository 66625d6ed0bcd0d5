"""Evol-Instruct (Xu et al., 2023), in-depth evolving: rewrite an accepted task to be deeper, more constrained,
more concrete or to need explicit reasoning, then answer the rewritten task."""

from __future__ import annotations

import random

from llmtune.config import RecipeError
from llmtune.synth import parsing
from llmtune.synth.context import Call, Context, Task
from llmtune.synth.methods.self_instruct import read_seed_tasks
from llmtune.synth.prompts import load_prompt
from llmtune.synth.recipe import EvolMethod
from llmtune.synth.records import Record, accepted, prompt_text
from llmtune.synth.teachers import Teacher


async def evol(method: EvolMethod, context: Context, teacher: Teacher, earlier: list[Record],
               default_seeds: list[tuple[str, str]]) -> list[Record]:
    sources: list[tuple[str, str]] = []
    if method.source in ("seeds", "all"):
        sources += read_seed_tasks(method.seeds) if method.seeds else default_seeds
    if method.source in ("self_instruct", "all"):
        sources += [(r["id"], prompt_text(r)) for r in earlier
                    if r["method"] == "self_instruct" and r["status"] == "ok"]
    if not sources:
        raise RecipeError(f"evol (source: {method.source}) has no tasks to rewrite: give `seeds:` or run "
                          "self_instruct before it")
    rewrites = {op: load_prompt(f"evol_{op}") for op in method.operations}
    answer_prompt = load_prompt(method.answer_prompt)
    tasks = []
    for k in range(method.num_items):
        item_id = f"evol:{k:04d}"
        rng = random.Random(f"{context.run_seed}/{item_id}")
        source_id, source_text = rng.choice(sources)
        operation = rng.choice(method.operations)
        tasks.append(_task(item_id, teacher, rewrites[operation], answer_prompt, source_id, source_text, operation))
    return await context.run(tasks)


def _task(item_id: str, teacher: Teacher, rewrite, answer_prompt, source_id: str, source_text: str,
          operation: str) -> Task:
    provenance = {"method": "evol", "teacher": teacher.name, "operation": operation, "source": source_id,
                  **rewrite.provenance, "answer_template": answer_prompt.name}

    async def make(call: Call) -> Record:
        text = await call.ask(teacher, "rewrite", rewrite.render(instruction=source_text))
        instruction = parsing.one_line(text, "rewritten task", max_words=120)
        if instruction.strip().lower() == source_text.strip().lower():
            raise parsing.Rejected("rewritten task is the original")
        reply = await call.ask(teacher, "answer", answer_prompt.render(instruction=instruction), seed_offset=1)
        messages = [{"role": "user", "content": instruction},
                    {"role": "assistant", "content": parsing.answer(reply, instruction)}]
        return accepted(item_id, "evol", provenance, messages=messages, usage=call.usage.as_dict())

    return Task(item_id, "evol", provenance, make)
