"""The recipe's `eval` section: which models (a base, trained runs, merged models), which tasks, how to compare.

`llmtune eval RECIPE` reads only this section; `llmtune eval --model ... --task ...` builds one from flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from llmtune.config import BUILTIN_PREFIX, RecipeError, Section, load_section
from llmtune.synth.recipe import TeacherSection


class EvalModel(Section):
    name: str
    # A base model (hub id, folder, .gguf, builtin:NAME), a trained run folder (its adapter on its base), or a
    # merged model folder. Local paths are relative to the recipe's folder.
    path: str


class EvalTask(Section):
    name: str
    # mcq: log-likelihood of each option; generative: greedy answer vs references; judge: greedy answer graded
    # by the `judge` model with a rubric prompt (the safety slice: `judge_prompt: judge_safety`); classification:
    # a `task: classification` run labels each text (accuracy per item; macro F1 and confusion matrix per model);
    # rules: greedy answer passes when it shows the row's `expected` behaviour by the phrase rules in `rules`
    # (offline, no judge model: the demo's safety slice).
    kind: Literal["mcq", "generative", "judge", "classification", "rules"]
    # jsonl: mcq rows {question, choices, answer}; generative rows {question|prompt|messages, answer};
    # judge rows {question|prompt|messages, answer (optional reference), expected (optional, for the rubric)};
    # rules rows {question|prompt|messages, expected (a behaviour of the rules file)};
    # classification rows {text, label}
    path: Path
    prompt: Literal["chat", "plain"] = "chat"  # the model's chat template, or "Question: ...\nAnswer:"
    # mcq: `cloze` scores each option's text as the answer; `letters` lists the options as A-D in the prompt and
    # scores the letter (MMLU's format)
    choices_format: Literal["cloze", "letters"] = "cloze"
    system_prompt: str | None = None
    max_items: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(64, gt=0)  # generative, judge, rules
    judge_prompt: str = "judge_rubric"  # judge: a template in prompts/ or a .jinja file
    rules: Path | None = None  # rules: a YAML file of behaviour -> phrases (regular expressions), see eval/rules.py

    @model_validator(mode="after")
    def _rules_file(self) -> EvalTask:
        if (self.kind == "rules") != (self.rules is not None):
            raise ValueError("`rules:` (a YAML file of behaviour phrases) goes with `kind: rules`, and only there")
        return self


class EvalSection(Section):
    output_dir: Path
    models: list[EvalModel] = Field(min_length=1)
    baseline: str | None = None  # the model every other is compared with (default: the first)
    tasks: list[EvalTask] = Field(min_length=1)
    batch_size: int = Field(8, gt=0)  # items per forward pass (all options of an MCQ item go together)
    bootstrap: int = Field(1000, ge=100)  # resamples for confidence intervals and paired tests
    confidence: float = Field(0.95, gt=0.5, lt=1)
    seed: int = 0
    judge: TeacherSection | None = None  # the grader for `kind: judge` tasks (any teacher llmtune synth can use)

    @model_validator(mode="after")
    def _rules(self) -> EvalSection:
        judged = [t.name for t in self.tasks if t.kind == "judge"]
        if judged and self.judge is None:
            raise ValueError(f"judge tasks ({', '.join(judged)}) need a `judge:` section (a teacher endpoint or model)")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {', '.join(names)}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not one of the models ({', '.join(names)})")
        tasks = [t.name for t in self.tasks]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique: {', '.join(tasks)}")
        return self

    @property
    def baseline_name(self) -> str:
        return self.baseline or self.models[0].name


def load_eval_recipe(path: str | Path, overrides: list[str] | None = None) -> EvalSection:
    section = load_section(path, overrides, "eval", EvalSection, "recipes/clinical-qa/eval-tiny.yaml")
    return resolve_eval_paths(section, Path(path).parent, str(path))


def resolve_task_path(task: EvalTask, base: Path) -> EvalTask:
    """The task with its data (and rules) file resolved against the recipe's folder (existence is the caller's
    check)."""
    rules = (base / task.rules).resolve() if task.rules is not None else None
    return task.model_copy(update={"path": (base / task.path).resolve(), "rules": rules})


def resolve_eval_paths(section: EvalSection, base: Path, where: str) -> EvalSection:
    problems: list[str] = []
    tasks = []
    for index, task in enumerate(section.tasks):
        resolved = resolve_task_path(task, base)
        if not resolved.path.is_file():
            problems.append(f"eval.tasks[{index}].path: file not found: {task.path} (looked in {resolved.path})")
        if resolved.rules is not None and not resolved.rules.is_file():
            problems.append(f"eval.tasks[{index}].rules: file not found: {task.rules} (looked in {resolved.rules})")
        tasks.append(resolved)
    models: list[Any] = []
    for model in section.models:
        local = base / model.path
        is_local = not model.path.startswith(BUILTIN_PREFIX) and (local.exists() or model.path.startswith((".", "/")))
        if is_local and not local.exists():
            problems.append(f"eval.models[{model.name}].path: not found: {model.path} (looked in {local.resolve()})")
        models.append(model.model_copy(update={"path": str(local.resolve())}) if is_local else model)
    if problems:
        raise RecipeError(f"{where}: invalid recipe\n" + "\n".join(f"  {p}" for p in problems))
    return section.model_copy(update={"tasks": tasks, "models": models, "output_dir": section.output_dir.resolve()})
