"""`llmtune sweep`: trials one after another in this process, each an ordinary training run in
`output_dir/trials/trial-NNNN` (its resolved recipe, manifest, adapter), scored on the objective.

A validation-metric objective is reported to Optuna at every evaluation during training, so the pruner can
stop a trial that is far behind; an eval-task objective is scored once the trial has trained.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from transformers import TrainerCallback

from llmtune.errors import LlmtuneError
from llmtune.sweep.recipe import SweepRecipe
from llmtune.sweep.study import (
    finished_trials,
    mark_running,
    open_study,
    planned_trials,
    requeue_interrupted,
    storage_url,
)
from llmtune.train.guards import TrainingDivergedError

log = logging.getLogger("llmtune.sweep")


class SweepInterrupted(LlmtuneError):
    """A trial was stopped by a signal (its checkpoint saved); rerunning the sweep resumes it."""


class PruningReporter(TrainerCallback):
    """Report the objective's validation metric at each evaluation; stop training when Optuna prunes."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned_at: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None:
            return
        self.trial.report(float(value), state.global_step)
        if self.trial.should_prune():
            self.pruned_at = state.global_step
            control.should_training_stop = True


def run_sweep(sweep: SweepRecipe, overwrite: bool = False, trials: int | None = None) -> optuna.Study:
    """Run trials until `trials` (default: the section's) have finished, counting those already in the study;
    here, or on Ray workers. Writes the report."""
    section = sweep.section
    if overwrite:
        shutil.rmtree(section.output_dir, ignore_errors=True)
    study = open_study(sweep)
    for number in requeue_interrupted(study):  # once, here: parallel workers would each queue it again
        log.warning("trial %d was interrupted; queued again (it resumes from its newest checkpoint)", number)
    target = trials or section.trials
    if section.strategy == "grid":
        target = min(target, planned_trials(section))
    done = len(finished_trials(study))
    if done:
        log.info("%s: %d of %d trials already finished", storage_url(section), done, target)
    if section.backend == "ray":
        from llmtune.sweep.ray_backend import run_on_ray

        run_on_ray(sweep, target)
        study = open_study(sweep)  # the workers' trials, read back from the storage
    else:
        work(sweep, target, study)
    from llmtune.sweep.report import write_sweep_report

    write_sweep_report(sweep, study)
    return study


def work(sweep: SweepRecipe, target: int, study: optuna.Study | None = None, worker: int = 0) -> int:
    """The trial loop one worker runs: trials until the study has `target` finished ones; returns how many
    this worker ran. Several workers (terminals, Ray tasks) can run it on one study."""
    section = sweep.section
    study = study or open_study(sweep, worker)
    ran = 0
    while len(finished_trials(study)) < target:
        # A diverged trial (non-finite gradients) fails and the sweep goes on; any other error stops it.
        study.optimize(lambda trial: _objective(sweep, trial, target), n_trials=1,
                       catch=(TrainingDivergedError,), gc_after_trial=True)
        ran += 1
        failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        if failed > target:
            raise LlmtuneError(f"{section.output_dir}: {failed} trials failed (diverged); narrow the search space")
        if section.strategy == "grid" and _grid_exhausted(study, section):
            break
    return ran


def _grid_exhausted(study: optuna.Study, section) -> bool:
    visited = {tuple(sorted(t.params.items())) for t in finished_trials(study)}
    return len(visited) >= planned_trials(section)


def _objective(sweep: SweepRecipe, trial: optuna.Trial, target: int) -> float:
    section = sweep.section
    values = {key: _suggest(trial, key, spec) for key, spec in section.space.items()}
    run_dir = Path(trial.user_attrs.get("run_dir") or section.output_dir / "trials" / f"trial-{trial.number:04d}")
    mark_running(trial)
    trial.set_user_attr("run_dir", str(run_dir))
    recipe = sweep.trial_recipe(values, run_dir)
    shown = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                      for key, value in values.items())
    log.info("trial %d (%d finished of %d): %s", trial.number, len(finished_trials(trial.study)), target, shown)
    started = time.perf_counter()
    reporter = PruningReporter(trial, section.objective.trainer_metric) if section.objective.trainer_metric else None
    out = _train(recipe, reporter, retry="retry_of" in trial.user_attrs)
    trial.set_user_attr("train_seconds", round(time.perf_counter() - started, 1))
    if out is None:
        trial.set_user_attr("interrupted", True)
        raise SweepInterrupted(f"trial {trial.number} stopped by a signal; run the sweep again to resume it")
    if reporter is not None and reporter.pruned_at is not None:
        trial.set_user_attr("pruned_at_step", reporter.pruned_at)
        log.info("trial %d pruned at step %d", trial.number, reporter.pruned_at)
        raise optuna.TrialPruned()
    value = objective_value(sweep, out)
    log.info("trial %d: %s = %.6g", trial.number, section.objective.metric, value)
    return value


def _suggest(trial: optuna.Trial, key: str, spec) -> Any:
    if spec.choices is not None:
        return trial.suggest_categorical(key, spec.choices)
    if spec.is_int:
        return trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
    return trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)


def _train(recipe, reporter: TrainerCallback | None, retry: bool) -> Path | None:
    """One training run. A retried trial resumes from its newest checkpoint (or keeps its finished run); a new
    trial never reuses a folder it finds (left by an earlier study in the same place)."""
    from llmtune.train import runner

    out = Path(recipe.output_dir)
    if retry and (out / "manifest.json").is_file():
        return out
    method = _training_module(recipe)

    def build(r):
        session = method.build_trainer(r)
        if reporter is not None:
            session.trainer.add_callback(reporter)
        return session

    try:
        return runner.run(recipe, build, overwrite=not retry)
    finally:
        gc.collect()


def _training_module(recipe):
    if recipe.method != "sft":
        from llmtune.train import preference

        return preference
    if recipe.task == "classification":
        from llmtune.train import classification

        return classification
    from llmtune.train import sft

    return sft


def objective_value(sweep: SweepRecipe, run_dir: Path) -> float:
    """The objective of a finished run: its saved validation metrics, or an eval of its adapter on the task."""
    objective = sweep.section.objective
    if objective.task is None:
        validation = json.loads((run_dir / "manifest.json").read_text()).get("validation") or {}
        key = objective.trainer_metric
        if key not in validation:
            raise LlmtuneError(f"{run_dir}: the validation pass reported no {key} "
                               f"(it reported: {', '.join(sorted(validation)) or 'nothing'})")
        return float(validation[key])
    from llmtune.eval.recipe import EvalModel, EvalSection
    from llmtune.eval.run import evaluate

    task = objective.task
    section = EvalSection(output_dir=run_dir / "eval", models=[EvalModel(name="trial", path=str(run_dir))],
                          tasks=[task], bootstrap=100, seed=sweep.section.seed)
    metrics = evaluate(section)["results"][task.name]["trial"]["metrics"]
    if objective.metric not in metrics:
        raise LlmtuneError(f"sweep.objective.metric: {objective.metric!r} is not a metric of task {task.name} "
                           f"({', '.join(metrics)})")
    return float(metrics[objective.metric]["mean"])

