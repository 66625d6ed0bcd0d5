"""Supervised fine-tuning: a typed recipe in, an adapter folder out. TRL's SFTTrainer does the training.

Runs the same under `llmtune train RECIPE` and `accelerate launch -m llmtune train RECIPE` (or torchrun).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState
from transformers import TrainerCallback, set_seed
from trl import SFTTrainer

from llmtune.chat_template import stop_token_trained, training_chat_template
from llmtune.config import Recipe
from llmtune.data.tokenize import PreparedData, prepare_data
from llmtune.models import load_model, load_tokenizer, resolve_source
from llmtune.train.adapters import lora_config
from llmtune.train.arguments import sft_config
from llmtune.train.outputs import RunStats, build_manifest, check_output_dir, write_run_outputs

log = logging.getLogger("llmtune.sft")


class LossHistory(TrainerCallback):
    """Keeps every logged training/eval record so the manifest carries the loss curve."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.records.append({"step": state.global_step, **{k: float(v) for k, v in logs.items()}})


@dataclass
class SftSession:
    """Everything `main` needs after set-up; tests drive the trainer directly."""

    trainer: SFTTrainer
    tokenizer: object
    template: str | None
    data: PreparedData
    history: LossHistory


def build_trainer(recipe: Recipe) -> SftSession:
    state = PartialState()
    set_seed(recipe.seed)
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
    history = LossHistory()
    trainer = SFTTrainer(
        model=model,
        args=sft_config(recipe, Path(recipe.output_dir), has_validation=data.validation is not None),
        train_dataset=data.train.select_columns(["input_ids", "labels"]),
        eval_dataset=data.validation.select_columns(["input_ids", "labels"]) if data.validation else None,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.adapter),
        callbacks=[history],
    )
    return SftSession(trainer, tokenizer, template, data, history)


def main(recipe: Recipe, overwrite: bool = False) -> Path:
    started = time.perf_counter()
    output_dir = Path(recipe.output_dir)
    check_output_dir(output_dir, overwrite)
    session = build_trainer(recipe)
    trainer = session.trainer
    trainable, total = _parameter_counts(trainer.model)
    log.info("training %d of %d parameters (%.3f%%)", trainable, total, 100 * trainable / total)

    train_started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - train_started

    stats = RunStats(
        wall_seconds=time.perf_counter() - started,
        train_seconds=train_seconds,
        steps=result.global_step,
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        final_loss=_last(session.history.records, "loss"),
        losses=session.history.records,
        trainable_parameters=trainable,
        total_parameters=total,
    )
    state = PartialState()
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
