"""Self-Instruct (Wang et al., 2023): new tasks from few-shot samples of seed tasks and of machine tasks accepted
in earlier rounds, then the teacher's answer to each.

Rounds make it reproducible under concurrency and resume: a round's few-shot pool is fixed when the round starts
(seeds + tasks accepted in earlier rounds, in id order), so an item's prompt depends only on its id and seed.
"""

from __future__ import annotations

import random
from pathlib import Path

from llmtune.config import RecipeError
from llmtune.data.loading import read_jsonl
from llmtune.synth import parsing
from llmtune.synth.context import Call, Context, Task
from llmtune.synth.prompts import load_prompt
from llmtune.synth.recipe import SelfInstructMethod
from llmtune.synth.records import Record, accepted, prompt_text
from llmtune.synth.teachers import Teacher


def read_seed_tasks(path: Path) -> list[tuple[str, str]]:
    """(id, instruction) pairs from jsonl rows with `instruction` (alpaca) or `messages` (first user turn)."""
    tasks = []
    for number, row in read_jsonl(path, objects=True):
        if isinstance(row.get("instruction"), str) and row["instruction"].strip():
            text = row["instruction"].strip()
        elif isinstance(row.get("messages"), list):
            text = next((m.get("content", "") for m in row["messages"] if m.get("role") == "user"), "").strip()
        else:
            text = ""
        if not text:
            raise RecipeError(f"{path}: row {number}: a seed task needs `instruction` or a user message")
        tasks.append((str(row.get("id") or f"seed-{number}"), text))
    if not tasks:
        raise RecipeError(f"{path}: no seed tasks")
    return tasks


async def self_instruct(method: SelfInstructMethod, context: Context, teacher: Teacher) -> list[Record]:
    prompt, answer_prompt = load_prompt(method.prompt), load_prompt(method.answer_prompt)
    seeds = read_seed_tasks(method.seeds)
    records: list[Record] = []
    made = 0
    for round_index in range((method.num_items + method.batch_size - 1) // method.batch_size):
        machine = [r for r in records if r["status"] == "ok"]
        size = min(method.batch_size, method.num_items - made)
        tasks = [_task(f"self_instruct:{round_index:03d}-{k:03d}", method, context, teacher, prompt, answer_prompt,
                       seeds, machine) for k in range(size)]
        records += await context.run(tasks)
        made += size
    return records


def _task(item_id: str, method: SelfInstructMethod, context: Context, teacher: Teacher, prompt, answer_prompt,
          seeds: list[tuple[str, str]], machine: list[Record]) -> Task:
    rng = random.Random(f"{context.run_seed}/{item_id}")
    shots = rng.sample(seeds, min(method.seed_examples, len(seeds)))
    shots += [(r["id"], prompt_text(r)) for r in rng.sample(machine, min(method.machine_examples, len(machine)))]
    provenance = {"method": "self_instruct", "teacher": teacher.name, **prompt.provenance,
                  "answer_template": answer_prompt.name, "few_shot": [shot_id for shot_id, _ in shots]}

    async def make(call: Call) -> Record:
        text = await call.ask(teacher, "task", prompt.render(examples=[t for _, t in shots], domain=method.domain))
        instruction = parsing.one_line(text, "task")
        reply = await call.ask(teacher, "answer", answer_prompt.render(instruction=instruction), seed_offset=1)
        messages = [{"role": "user", "content": instruction},
                    {"role": "assistant", "content": parsing.answer(reply, instruction)}]
        return accepted(item_id, "self_instruct", provenance, messages=messages, usage=call.usage.as_dict())

    return Task(item_id, "self_instruct", provenance, make)
