"""What every training method shares once its trainer is built: resume, guards, timing, outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Trainer, set_seed

from llmtune.config import Recipe
from llmtune.distributed import finish, process_state, release_wrapped_model
from llmtune.models import ModelSource, resolve_source
from llmtune.train import freezing
from llmtune.train.guards import DivergenceGuard, PreemptionGuard, ThroughputMeter
from llmtune.train.outputs import RunStats, build_manifest, check_output_dir, write_run_outputs
from llmtune.train.resume import ResumeMode, choose_checkpoint, prepare_output_dir
from llmtune.train.selection import final_validation, report_selection, selection_callbacks

log = logging.getLogger("llmtune.train")


@dataclass
class Guards:
    """The callbacks every llmtune trainer carries."""

    preemption: PreemptionGuard
    throughput: ThroughputMeter

    @classmethod
    def create(cls) -> Guards:
        return cls(PreemptionGuard(), ThroughputMeter())

    def callbacks(self) -> list:
        return [DivergenceGuard(), self.preemption, self.throughput]


@dataclass
class Session:
    """A built trainer and what the run needs to report and resume; tests drive `trainer` directly."""

    trainer: Trainer
    tokenizer: Any
    template: str | None
    data_report: dict[str, Any]
    sources: list[dict[str, Any]]
    guards: Guards

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.trainer._run_info


def start(recipe: Recipe) -> ModelSource:
    """Seed, join the process group, and make sure the base model is on disk (rank 0 builds builtins)."""
    state = process_state()
    set_seed(recipe.seed)
    with state.main_process_first():
        return resolve_source(recipe.model)


def run(
    recipe: Recipe,
    build: Callable[[Recipe], Session],
    overwrite: bool = False,
    resume: ResumeMode = "auto",
    force_resume: bool = False,
) -> Path | None:
    """Train; returns the output folder, or None when stopped by a signal (a checkpoint was saved)."""
    started = time.perf_counter()
    state = process_state()
    output_dir = Path(recipe.output_dir)
    check_output_dir(output_dir, overwrite)
    session = build(recipe)
    trainer = session.trainer
    for callback in selection_callbacks(recipe):
        trainer.add_callback(callback)
    if state.is_main_process:
        prepare_output_dir(output_dir, fresh=overwrite)
    state.wait_for_everyone()
    checkpoint = choose_checkpoint(output_dir, "never" if overwrite else resume, session.fingerprint, force_resume)

    trainable, total = _parameter_counts(trainer.model)
    log.info("training %d of %d parameters (%.3f%%)", trainable, total, 100 * trainable / total)
    preemption = session.guards.preemption
    preemption.install()
    train_started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        preemption.uninstall()
    train_seconds = time.perf_counter() - train_started

    if preemption.stopped_at is not None:
        log.warning(
            "stopped by %s at step %d; checkpoint saved in %s. Run the same command to resume "
            "from the newest complete checkpoint.",
            preemption.requested,
            preemption.stopped_at,
            output_dir,
        )
        release_wrapped_model(trainer)
        finish(state)
        return None

    history = trainer.state.log_history  # restored on resume, so it covers the whole run
    selection = report_selection(trainer)
    validation = final_validation(trainer, history)
    stats = RunStats(
        wall_seconds=time.perf_counter() - started,
        train_seconds=train_seconds,
        steps=result.global_step,
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        final_loss=_last(history, "loss"),
        losses=history,
        trainable_parameters=trainable,
        total_parameters=total,
        resumed_from=str(checkpoint) if checkpoint else None,
        tokens_this_process=int(trainer.state.num_input_tokens_seen) - session.guards.throughput.tokens_at_start,
    )
    if state.is_main_process:
        manifest = build_manifest(recipe, session.data_report, session.sources, stats, state.num_processes)
        manifest["validation"] = validation  # of the saved model: the best checkpoint when keeping the best
        manifest["train"]["best_checkpoint"] = selection
        manifest["train"]["freeze_phases"] = freezing.phase_record(trainer)  # who trained when (gradual)
        write_run_outputs(trainer, session.tokenizer, session.template, recipe, manifest)
        log.info(
            "saved %s  (%.0f tokens/s, peak RSS %.0f MB)",
            output_dir,
            manifest["train"]["tokens_per_second"] or 0,
            manifest["memory"]["peak_rss_mb"],
        )
    release_wrapped_model(trainer)
    finish(state)
    return output_dir


def _parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _last(records: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None
