"""The bridge to lm-evaluation-harness, the field's reference scorer.

- `export_tasks`: our eval sets as lm-eval task YAML (one per task, data copied next to it), so that
  `lm_eval --include_path DIR --tasks llmtune_NAME` scores them with lm-eval itself. MCQ tasks use lm-eval's
  `multiple_choice` (the same context/continuation split and acc/acc_norm as `llmtune eval`); a chat-style
  task needs `--apply_chat_template` (and `--system_instruction` for its system prompt).
- `run_harness`: lm-eval's own tasks (and exported ones) through its Python API on each model of the eval
  section: a base as `pretrained=`, a trained run as its base plus `peft=`.

lm-eval is an optional extra (`pip install llmtune[harness]`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from llmtune.errors import LlmtuneError
from llmtune.eval.items import LETTERS
from llmtune.eval.recipe import EvalModel, EvalSection, EvalTask


class HarnessError(LlmtuneError, RuntimeError):
    pass


def harness_task_name(task: EvalTask) -> str:
    return "llmtune_" + "".join(ch if ch.isalnum() else "_" for ch in task.name)


def export_tasks(tasks: list[EvalTask], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for task in tasks:
        if task.kind in ("judge", "rules", "classification"):
            continue  # lm-eval has no rubric-judge or phrase-rule task type, and scores LM heads, not classifiers
        data = out / f"{harness_task_name(task)}.jsonl"
        shutil.copyfile(task.path, data)
        spec: dict[str, Any] = {
            "task": harness_task_name(task),
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test",
        }
        if task.kind == "mcq":
            question = "{{question}}"
            if task.choices_format == "letters":  # as llmtune.eval.mcq.letters_question
                question += "".join(f"\n{LETTERS[i]}. {{{{choices[{i}]}}}}" for i in range(_choice_count(task)))
            spec.update(
                output_type="multiple_choice",
                doc_to_text=question if task.prompt == "chat" else f"Question: {question}\nAnswer:",
                doc_to_choice=list(LETTERS[: _choice_count(task)]) if task.choices_format == "letters" else "choices",
                doc_to_target="answer",
                metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                             for m in ("acc", "acc_norm")],
            )
            if task.prompt == "chat":
                spec["target_delimiter"] = ""  # the chat template's generation prompt ends the context
        else:
            spec.update(
                output_type="generate_until",
                doc_to_text="{{question}}" if task.prompt == "chat" else "Question: {{question}}\nAnswer:",
                doc_to_target="answer",
                generation_kwargs={"until": ["\n\n"], "do_sample": False, "max_gen_toks": task.max_new_tokens},
                metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                              "ignore_case": True, "ignore_punctuation": True}],
            )
        path = out / f"{harness_task_name(task)}.yaml"
        path.write_text(f"# Exported by llmtune from {task.path}\n" + yaml.safe_dump(spec, sort_keys=False))
        written.append(path)
    return written


def _choice_count(task: EvalTask) -> int:
    from llmtune.eval.items import read_mcq

    counts = {len(item.choices) for item in read_mcq(task.path)}
    if len(counts) != 1:
        raise HarnessError(f"{task.path}: the letters format exports only when every item has the same number "
                           f"of choices (found {sorted(counts)})")
    return counts.pop()


def model_args(model: EvalModel) -> str:
    """lm-eval's `model_args` for one of our models: a base folder, or a trained run as base + peft."""
    from llmtune.builtin_models import ensure_builtin
    from llmtune.config import BUILTIN_PREFIX
    from llmtune.inference.loading import _base_section, is_run_folder

    base = _base_section(model.path).name_or_path
    if base.startswith(BUILTIN_PREFIX):
        base = str(ensure_builtin(base.removeprefix(BUILTIN_PREFIX)))
    args = f"pretrained={base},dtype=float32"
    if is_run_folder(model.path):
        args += f",peft={model.path},tokenizer={model.path}"
    return args


def run_harness(section: EvalSection, tasks: list[str], include_path: Path | None = None, limit: int | None = None,
                apply_chat_template: bool = False, log_samples: bool = False) -> dict[str, Any]:
    """lm-eval results per model: {model: {task: {metric: value}}} (and samples when asked)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HarnessError("lm-eval is not installed: pip install 'llmtune[harness]'") from None
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    results: dict[str, Any] = {}
    for model in section.models:
        output = lm_eval.simple_evaluate(
            model="hf", model_args=model_args(model), tasks=tasks, task_manager=manager, limit=limit,
            batch_size=section.batch_size, device="cpu", log_samples=log_samples,
            apply_chat_template=apply_chat_template, random_seed=section.seed, numpy_random_seed=section.seed,
            torch_random_seed=section.seed, fewshot_random_seed=section.seed,
        )
        results[model.name] = {
            "results": {task: {k: v for k, v in metrics.items() if isinstance(v, int | float)}
                        for task, metrics in output["results"].items()},
            **({"samples": output["samples"]} if log_samples else {}),
        }
    return results
