"""Supervised fine-tuning: a typed recipe in, an adapter folder out. TRL's SFTTrainer does the training.

Runs the same under `llmtune train RECIPE` and `accelerate launch -m llmtune train RECIPE` (or torchrun).
llmtune adds what TRL leaves out: atomic checkpoints and exact resume, a stop on non-finite gradients, a
clean stop on SIGTERM, and a refusal to resume with changed inputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import set_seed
from trl import SFTTrainer

from llmtune.chat_template import stop_token_trained, training_chat_template
from llmtune.config import Recipe
from llmtune.data.tokenize import PreparedData, prepare_data
from llmtune.distributed import process_state
from llmtune.models import load_model, load_tokenizer, resolve_source
from llmtune.train.adapters import lora_config
from llmtune.train.arguments import sft_config
from llmtune.train.checkpoints import AtomicCheckpoints
from llmtune.train.guards import DivergenceGuard, PreemptionGuard, ThroughputMeter
from llmtune.train.outputs import RunStats, build_manifest, check_output_dir, write_run_outputs
from llmtune.train.resume import ResumeMode, choose_checkpoint, prepare_output_dir, run_fingerprint

log = logging.getLogger("llmtune.sft")


class LlmtuneSFTTrainer(AtomicCheckpoints, SFTTrainer):
    """TRL's SFTTrainer with atomic, hash-listed checkpoints."""


@dataclass
class SftSession:
    """Everything `main` needs after set-up; tests drive the trainer directly."""

    trainer: LlmtuneSFTTrainer
    tokenizer: object
    template: str | None
    data: PreparedData
    preemption: PreemptionGuard
    throughput: ThroughputMeter
    fingerprint: dict


def build_trainer(recipe: Recipe) -> SftSession:
    state = process_state()
    set_seed(recipe.seed)
    with state.main_process_first():  # rank 0 builds a builtin model into the cache; the others reuse it
        source = resolve_source(recipe.model)
    tokenizer = load_tokenizer(recipe.model, source)
    template = chat_template_for_training(recipe, tokenizer)
    with state.main_process_first():  # rank 0 tokenizes and caches; the others read its cache
        data = prepare_data(recipe, tokenizer, template)
    log.info(
        "data: %d train rows, %s validation rows (%s)",
        len(data.train),
        len(data.validation) if data.validation is not None else 0,
        "from cache" if data.from_cache else f"tokenized into {data.cache_path}",
    )
    model = load_model(recipe.model, recipe.quantization, source)
    fingerprint = run_fingerprint(recipe, data.sources)
    preemption, throughput = PreemptionGuard(), ThroughputMeter()
    trainer = LlmtuneSFTTrainer(
        model=model,
        args=sft_config(recipe, Path(recipe.output_dir), has_validation=data.validation is not None),
        train_dataset=data.train.select_columns(["input_ids", "labels"]),
        eval_dataset=data.validation.select_columns(["input_ids", "labels"]) if data.validation else None,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.adapter),
        callbacks=[DivergenceGuard(), preemption, throughput],
        run_info=fingerprint,
    )
    return SftSession(trainer, tokenizer, template, data, preemption, throughput, fingerprint)


def main(
    recipe: Recipe, overwrite: bool = False, resume: ResumeMode = "auto", force_resume: bool = False
) -> Path | None:
    """Train; returns the output folder, or None when stopped by a signal (a checkpoint was saved)."""
    started = time.perf_counter()
    state = process_state()
    output_dir = Path(recipe.output_dir)
    check_output_dir(output_dir, overwrite)
    session = build_trainer(recipe)
    trainer = session.trainer
    if state.is_main_process:
        prepare_output_dir(output_dir, fresh=overwrite)
    state.wait_for_everyone()
    checkpoint = choose_checkpoint(output_dir, "never" if overwrite else resume, session.fingerprint, force_resume)

    trainable, total = _parameter_counts(trainer.model)
    log.info("training %d of %d parameters (%.3f%%)", trainable, total, 100 * trainable / total)
    session.preemption.install()
    train_started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        session.preemption.uninstall()
    train_seconds = time.perf_counter() - train_started

    if session.preemption.stopped_at is not None:
        log.warning(
            "stopped by %s at step %d; checkpoint saved in %s. Resume with the same command "
            "(llmtune train RECIPE resumes from the newest complete checkpoint).",
            session.preemption.requested,
            session.preemption.stopped_at,
            output_dir,
        )
        return None

    history = trainer.state.log_history  # restored on resume, so it covers the whole run
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
        tokens_this_process=int(trainer.state.num_input_tokens_seen) - session.throughput.tokens_at_start,
    )
    if state.is_main_process:
        manifest = build_manifest(recipe, session.data.report, session.data.sources, stats, state.num_processes)
        write_run_outputs(trainer, session.tokenizer, session.template, recipe, manifest)
        log.info(
            "saved %s  (%.0f tokens/s, peak RSS %.0f MB)",
            output_dir,
            manifest["train"]["tokens_per_second"] or 0,
            manifest["memory"]["peak_rss_mb"],
        )
    state.wait_for_everyone()
    return output_dir


def chat_template_for_training(recipe: Recipe, tokenizer) -> str | None:
    """The template that tokenizes the data: a marker-carrying variant for assistant-only loss."""
    if recipe.data.loss_on == "all":
        return None
    template = training_chat_template(tokenizer)
    if not stop_token_trained(tokenizer, template):
        log.warning("the chat template leaves the end-of-turn token out of the loss: the model may not learn to stop")
    return template


def _parameter_counts(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def _last(records: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None
