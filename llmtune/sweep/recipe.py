"""The `sweep:` section of a training recipe: which fields to search, how, and what to optimise.

    sweep:
      output_dir: runs/sweep
      strategy: tpe            # grid | random | tpe
      trials: 12
      space:
        train.learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}
        adapter.r: {choices: [8, 16, 32]}
      objective: {metric: eval_loss}   # or an llmtune eval task: {task: {...}, metric: acc}

The rest of the file is an ordinary training recipe: every trial is that recipe with the sampled values set.
Each value range is checked against the recipe's own schema when the sweep is loaded, so a typo in a field
name or an impossible range fails before the first trial.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from llmtune.config import (
    Recipe,
    RecipeError,
    Section,
    apply_override,
    metric_key,
    read_raw_recipe,
    recipe_from_mapping,
    validate_section,
)
from llmtune.eval.recipe import EvalTask, resolve_task_path

SWEEP_KEY = "sweep"


class ParamSpec(Section):
    """`choices: [...]`, or a range `low`..`high` (integers when both are; `log` spacing; `step` for a grid)."""

    choices: list[Any] | None = Field(None, min_length=1)
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _rules(self) -> ParamSpec:
        ranged = self.low is not None or self.high is not None
        if (self.choices is None) == (not ranged):
            raise ValueError("give either `choices` or a range (`low` and `high`)")
        if ranged:
            if self.low is None or self.high is None or self.low >= self.high:
                raise ValueError("a range needs `low` < `high`")
            if self.log and (self.low <= 0 or self.step is not None):
                raise ValueError("`log: true` needs `low` > 0 and no `step`")
        return self

    @property
    def is_int(self) -> bool:
        bounds = (self.low, self.high, self.step if self.step is not None else 1)
        return self.choices is None and all(float(b).is_integer() for b in bounds)

    def grid(self) -> list[Any] | None:
        """The values a grid visits: the choices, or the range in `step`s; None for a continuous range."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None and not self.is_int:
            return None
        assert self.low is not None and self.high is not None
        step = self.step or 1
        count = round((self.high - self.low) / step) + 1
        values = [self.low + i * step for i in range(count)]
        return [int(v) for v in values] if self.is_int else values

    def extremes(self) -> list[Any]:
        """Values that bound the space, to check against the recipe schema."""
        if self.choices is not None:
            return list(self.choices)
        assert self.low is not None and self.high is not None
        return [int(self.low), int(self.high)] if self.is_int else [self.low, self.high]


class Objective(Section):
    # A validation metric of the trainer (`eval_loss`, or a metric the task reports), or, with `task`, a
    # metric of that `llmtune eval` task (mcq: acc, acc_norm; generative: exact_match, f1, rouge_l).
    metric: str = "eval_loss"
    direction: Literal["minimize", "maximize"] | None = None  # None: minimize a loss, maximize anything else
    task: EvalTask | None = None

    @property
    def resolved_direction(self) -> str:
        if self.direction:
            return self.direction
        return "minimize" if self.metric.removeprefix("eval_").endswith("loss") else "maximize"

    @property
    def trainer_metric(self) -> str | None:
        """The trainer's name for the metric when it is a validation metric (reported during training)."""
        return None if self.task else metric_key(self.metric)


class SweepSection(Section):
    output_dir: Path
    strategy: Literal["grid", "random", "tpe"] = "tpe"
    trials: int = Field(20, gt=0)  # finished trials (complete or pruned) the study stops at; grid: at most its size
    space: dict[str, ParamSpec] = Field(min_length=1)
    objective: Objective = Objective()
    # median: stop a trial whose intermediate validation metric is worse than the median of earlier trials
    # at the same step (Optuna's MedianPruner); needs a validation metric objective.
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = Field(3, ge=0)  # random trials before TPE models the space, and before any pruning
    warmup_steps: int = Field(0, ge=0)  # no pruning before this training step
    seed: int = 0
    # Run these first (known-good settings, or a baseline): each a mapping of space keys to values.
    initial_trials: list[dict[str, Any]] = Field(default_factory=list)
    # Where trials run: here, one after another; or on a Ray cluster, `workers` at a time (optional extra
    # `llmtune[ray]`). Each Ray worker runs the same trial loop against the one study.
    backend: Literal["local", "ray"] = "local"
    workers: int = Field(1, gt=0)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a Ray instance started on this machine
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(0, ge=0)
    # The Optuna storage: None is `output_dir/study.db` (SQLite, one machine); workers on several machines
    # need a database they all reach, e.g. postgresql://user@host/optuna (password from the environment).
    storage: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> SweepSection:
        if self.strategy == "grid":
            continuous = [key for key, spec in self.space.items() if spec.grid() is None]
            if continuous:
                raise ValueError(f"a grid needs choices or a `step` for: {', '.join(continuous)}")
        if self.workers > 1 and self.backend == "local":
            raise ValueError("`workers` > 1 runs trials in parallel on Ray: set `backend: ray` (or start "
                             "`llmtune sweep` in several terminals: they share the study)")
        for index, trial in enumerate(self.initial_trials):
            unknown = sorted(set(trial) - set(self.space))
            if unknown:
                raise ValueError(f"initial_trials[{index}]: {', '.join(unknown)} not in `space`")
        return self

    def grid_space(self) -> dict[str, list[Any]]:
        return {key: spec.grid() or [] for key, spec in self.space.items()}


class SweepRecipe:
    """A validated sweep: its section, the base training recipe (raw, paths relative to `path`), and a
    fingerprint of everything that defines the study (so a reopened study refuses a changed definition)."""

    def __init__(self, path: Path, section: SweepSection, base: dict[str, Any]) -> None:
        self.path, self.section, self.base = path, section, base

    def trial_recipe(self, values: dict[str, Any], output_dir: Path) -> Recipe:
        raw = copy.deepcopy(self.base)
        raw["output_dir"] = str(output_dir)
        for key, value in values.items():
            apply_override(raw, f"{key}={json.dumps(value)}", self.path)
        return recipe_from_mapping(raw, self.path)

    @property
    def fingerprint(self) -> str:
        base = {k: v for k, v in self.base.items() if k != "output_dir"}
        defining = self.section.model_dump(mode="json", exclude={"trials", "output_dir"})
        return hashlib.sha256(json.dumps([base, defining], sort_keys=True, default=str).encode()).hexdigest()


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepRecipe:
    """Read a recipe with a `sweep:` section; every value range is checked against the recipe schema."""
    path = Path(path)
    raw = read_raw_recipe(path, overrides)
    if SWEEP_KEY not in raw:
        raise RecipeError(f"{path}: no `sweep:` section (see recipes/clinical-qa/sweep-tiny.yaml)")
    section = validate_section(SweepSection, raw.pop(SWEEP_KEY), path, prefix="sweep.")
    section = section.model_copy(update={"output_dir": section.output_dir.resolve()})  # like a run's output_dir
    objective = section.objective
    if objective.task is not None:
        task = resolve_task_path(objective.task, path.parent)
        if not task.path.is_file():
            raise RecipeError(f"{path}: sweep.objective.task.path: file not found: {objective.task.path} "
                              f"(looked in {task.path})")
        section = section.model_copy(update={"objective": objective.model_copy(update={"task": task})})
    sweep = SweepRecipe(path, section, raw)
    base = recipe_from_mapping(copy.deepcopy(raw), path)  # the base itself must be a valid recipe
    if objective.trainer_metric and not (base.data.validation or base.data.validation_fraction):
        raise RecipeError(f"{path}: sweep.objective: {objective.metric} is a validation metric: set "
                          "`data.validation` or `data.validation_fraction`, or give an eval `task`")
    _check_space(sweep)
    return sweep


def _check_space(sweep: SweepRecipe) -> None:
    """Each bound of each searched field must make a valid recipe; the error names the sweep key."""
    for key, spec in sweep.section.space.items():
        for value in spec.extremes():
            try:
                sweep.trial_recipe({key: value}, sweep.section.output_dir / "check")
            except RecipeError as err:
                detail = str(err).split("\n", 1)[-1].strip()
                raise RecipeError(f"{sweep.path}: sweep.space.{key}: the value {value!r} makes an invalid recipe: "
                                  f"{detail}") from None
