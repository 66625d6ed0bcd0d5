"""Keeping the best checkpoint and stopping early on a validation metric (`train.keep_best`,
`train.early_stopping`), through transformers' own `load_best_model_at_end` and `EarlyStoppingCallback`.

A checkpoint is saved at every evaluation, so the best one exists when training ends; it is loaded back and
is what the run folder holds. The validation metrics of what was saved go into the manifest (`validation`),
which is what `llmtune sweep` optimises.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import EarlyStoppingCallback, Trainer, TrainerCallback

from llmtune.config import Recipe, TrainSection, metric_key

log = logging.getLogger("llmtune.train")


def selection_args(train: TrainSection, eval_strategy: str) -> dict[str, Any]:
    """TrainingArguments for best-checkpoint selection: one checkpoint per evaluation, the best loaded at end."""
    if not train.selects_best:
        return {}
    stopping = train.early_stopping
    metric = stopping.metric if stopping else "eval_loss"
    greater = stopping.greater_is_better if stopping else False
    return {
        "load_best_model_at_end": True,
        "metric_for_best_model": metric_key(metric),
        "greater_is_better": greater,
        "save_strategy": eval_strategy,
        "save_steps": train.save_steps or train.eval_steps or 500,
    }


def selection_callbacks(recipe: Recipe) -> list[TrainerCallback]:
    stopping = recipe.train.early_stopping
    if stopping is None:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=stopping.patience,
                                  early_stopping_threshold=stopping.min_delta)]


def report_selection(trainer: Trainer) -> dict[str, Any] | None:
    """What best-checkpoint selection did, for the log and the manifest; None when it was off."""
    args, state = trainer.args, trainer.state
    if not args.load_best_model_at_end:
        return None
    planned = state.max_steps
    stopped_early = state.global_step < planned
    best = {"metric": args.metric_for_best_model, "value": state.best_metric, "step": state.best_global_step,
            "stopped_early": stopped_early, "steps_planned": planned}
    log.info("best %s %.6g at step %s of %d%s", best["metric"], state.best_metric or float("nan"),
             state.best_global_step, state.global_step, " (stopped early)" if stopped_early else "")
    return best


def final_validation(trainer: Trainer, history: list[dict[str, float]]) -> dict[str, float] | None:
    """Validation metrics of the model being saved: the logged evaluation at its step, or a fresh one."""
    if trainer.eval_dataset is None:
        return None
    state = trainer.state
    step = state.best_global_step if trainer.args.load_best_model_at_end and state.best_global_step else \
        state.global_step
    logged = [r for r in history if r.get("step") == step and "eval_loss" in r]
    metrics = logged[-1] if logged else trainer.evaluate()
    return {k: float(v) for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, int | float)}
