"""`llmtune eval`: every model on every task, the same items; per-item results journaled (a killed evaluation
resumes), then metrics with bootstrap CIs, paired tests against the baseline, per-category breakdowns, and
the report (report.json, report.md, report.html with plots).

output_dir/
  items/<task>/<model>.jsonl   per-item results (journal)
  items/<task>/<model>.json    what they were computed from (model and task fingerprints)
  report.json / report.md / report.html, plots/*.png
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmtune.eval.items import read_classification, read_generative, read_mcq
from llmtune.eval.recipe import EvalModel, EvalSection, EvalTask
from llmtune.hashing import file_sha256
from llmtune.journal import Journal

log = logging.getLogger("llmtune.eval")

METRICS = {"mcq": ("acc", "acc_norm"), "generative": ("exact_match", "f1", "rouge_l"),
           "judge": ("judge_score", "judge_pass"), "classification": ("acc",), "rules": ("rule_pass",)}
# Right/wrong metrics are compared with McNemar's exact test; scores with a paired bootstrap.
BINARY = {"acc", "acc_norm", "exact_match", "judge_pass", "rule_pass"}


def evaluate(section: EvalSection, progress: Any = None, harness_tasks: list[str] | None = None,
             harness_include: Path | None = None) -> dict[str, Any]:
    """Our tasks on every model; with `harness_tasks`, lm-eval's too (through its API), in the same report."""
    from llmtune.eval.report import build_report, write_report

    items = {task.name: _read_items(task) for task in section.tasks}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {task.name: {} for task in section.tasks}
    task_prints = {task.name: task_fingerprint(task) for task in section.tasks}
    for model in section.models:
        weights = model_fingerprint(model)  # hashes the weight files: once per model
        expected = {t.name: {"model": weights, "task": task_prints[t.name]} for t in section.tasks}
        models = _Models(model)  # loads only what a task with unscored items needs
        for task in section.tasks:
            results[task.name][model.name] = _task_results(section, model, task, items[task.name], models, progress,
                                                           expected[task.name])
        del models
        gc.collect()
    harness = None
    if harness_tasks:
        from llmtune.eval.harness import run_harness

        harness = run_harness(section, harness_tasks, include_path=harness_include)
    report = build_report(section, items, results, harness)
    write_report(section.output_dir, report, section)
    return report


def _read_items(task: EvalTask) -> list[Any]:
    if task.kind == "mcq":
        return read_mcq(task.path, task.max_items)
    if task.kind == "classification":
        return read_classification(task.path, task.max_items)
    items = read_generative(task.path, task.max_items, references_required=task.kind == "generative")
    if task.kind == "rules":  # a row whose behaviour the rules do not know fails before any model loads
        from llmtune.eval.rules import check_expected, load_behaviour_rules

        assert task.rules is not None
        check_expected(items, load_behaviour_rules(task.rules), task.path, task.rules)
    return items


def _load(model: EvalModel):
    from llmtune.inference.loading import load_for_inference

    log.info("loading %s (%s)", model.name, model.path)
    return load_for_inference(model.path)


def _load_classifier(model: EvalModel):
    from llmtune.inference.classifier import load_classifier

    log.info("loading classifier %s (%s)", model.name, model.path)
    return load_classifier(model.path)


class _Models:
    """One eval model, loaded on first use as a generator (mcq, generative, judge) or as a classifier: a
    classification run has a head instead of an LM head, so it serves only classification tasks."""

    def __init__(self, model: EvalModel) -> None:
        self.model = model
        self._loaded: dict[bool, Any] = {}

    def for_task(self, task: EvalTask):
        classifier = task.kind == "classification"
        if classifier not in self._loaded:
            self._loaded[classifier] = (_load_classifier if classifier else _load)(self.model)
        return self._loaded[classifier]


def model_fingerprint(model: EvalModel) -> str:
    """What the model's answers depend on: its weights (adapter or full) as files, or its name."""
    path = Path(model.path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.is_file() else []
    digest = hashlib.sha256(model.path.encode())
    for file in files:
        digest.update(file.name.encode() + file_sha256(file).encode())
    return digest.hexdigest()


def task_fingerprint(task: EvalTask) -> str:
    described = task.model_dump(mode="json", exclude={"name", "path", "rules"}) | {"data": file_sha256(task.path)}
    if task.rules is not None:  # new phrases regrade every answer
        described["rules"] = file_sha256(task.rules)
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _paths(section: EvalSection, model: EvalModel, task: EvalTask) -> tuple[Path, Path]:
    folder = section.output_dir / "items" / task.name
    return folder / f"{model.name}.jsonl", folder / f"{model.name}.json"


def _task_results(section: EvalSection, model: EvalModel, task: EvalTask, items: list[Any], models: _Models,
                  progress: Any, expected: dict[str, str]) -> list[dict[str, Any]]:
    journal_path, meta_path = _paths(section, model, task)
    if meta_path.is_file() and json.loads(meta_path.read_text()) != expected:
        log.info("%s / %s: model or task changed since the saved results; evaluating again", task.name, model.name)
        journal_path.unlink(missing_ok=True)
    journal_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps(expected) + "\n")
    journal = Journal(journal_path)
    try:
        todo = [item for item in items if item.id not in journal]
        advance = _advance(progress, f"{task.name} · {model.name}", len(items), len(items) - len(todo))
        if todo:
            for result in _score(models, section, task, todo, advance):
                journal.append(result)
        return [journal.records[item.id] for item in items]
    finally:
        journal.close()


def _score(models: _Models, section: EvalSection, task: EvalTask, items: list[Any],
           advance: Callable[[int], None]) -> Iterator[dict[str, Any]]:
    from llmtune.eval.generative import score_generative
    from llmtune.eval.judge import score_judged
    from llmtune.eval.mcq import mcq_length, score_mcq

    loaded = models.for_task(task)
    if task.kind == "classification":
        from llmtune.eval.classification import score_classification

        yield from score_classification(loaded, items, task.path, section.batch_size, advance)
        return
    adapter = next(iter(loaded.adapters), None) or loaded.adapter_for(loaded.base_name)
    batch_size = section.batch_size
    if task.kind == "judge":
        assert section.judge is not None
        yield from score_judged(loaded, adapter, items, task.system_prompt, task.max_new_tokens, batch_size,
                                section.judge, task.judge_prompt, section.seed, advance)
        return
    if task.kind == "rules":
        from llmtune.eval.rules import load_behaviour_rules, score_rules

        assert task.rules is not None
        yield from score_rules(loaded, adapter, items, task.system_prompt, task.max_new_tokens, batch_size,
                               load_behaviour_rules(task.rules), advance)
        return
    if task.kind == "mcq":  # batches of similar length pad less (results are journaled by id, order-free)
        items = sorted(items, key=mcq_length)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        if task.kind == "mcq":
            yield from score_mcq(loaded, chunk, task.prompt, task.system_prompt, batch_size, advance,
                                 task.choices_format)
        else:
            yield from score_generative(loaded, adapter, chunk, task.system_prompt, task.max_new_tokens,
                                        batch_size, advance)


def _advance(progress: Any, label: str, total: int, done: int) -> Callable[[int], None]:
    if progress is None:
        return lambda n: None
    return progress.track(label, total, done)
