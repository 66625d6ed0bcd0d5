"""Supervised fine-tuning: a typed recipe in, an adapter folder out. TRL's SFTTrainer does the training.

Runs the same under `llmtune train RECIPE` and `accelerate launch -m llmtune train RECIPE` (or torchrun).
llmtune adds what TRL leaves out (llmtune/train/runner.py): atomic checkpoints and exact resume, a stop on
non-finite gradients, a clean stop on SIGTERM, and a refusal to resume with changed inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trl import SFTTrainer

from llmtune.chat_template import stop_token_trained, training_chat_template
from llmtune.config import Recipe
from llmtune.data.tokenize import longest_row, prepare_data
from llmtune.distributed import process_state
from llmtune.models import load_tokenizer
from llmtune.train import freezing, runner
from llmtune.train.adapter_speed import StreamlinedAdapter
from llmtune.train.adapters import lora_config
from llmtune.train.arguments import row_packing, sft_config
from llmtune.train.checkpoints import AtomicCheckpoints
from llmtune.train.lm_head import LabelOnlyLMHead
from llmtune.train.resume import ResumeMode, run_fingerprint
from llmtune.train.sampling import ReproducibleLengthGrouping
from llmtune.train.speed import load_training_model

log = logging.getLogger("llmtune.sft")


class LlmtuneSFTTrainer(
    AtomicCheckpoints,
    freezing.GradualUnfreezingOptimizer,
    ReproducibleLengthGrouping,
    LabelOnlyLMHead,
    StreamlinedAdapter,
    SFTTrainer,
):
    """TRL's SFTTrainer with atomic, hash-listed checkpoints, the CPU fast paths and gradual unfreezing."""


def build_trainer(recipe: Recipe) -> runner.Session:
    source = runner.start(recipe)
    tokenizer = load_tokenizer(recipe.model, source)
    template = chat_template_for_training(recipe, tokenizer)
    with process_state().main_process_first():  # rank 0 tokenizes and caches; the others read its cache
        data = prepare_data(recipe, tokenizer, template)
    log.info(
        "data: %d train rows, %s validation rows (%s)",
        len(data.train),
        len(data.validation) if data.validation is not None else 0,
        "from cache" if data.from_cache else f"tokenized into {data.cache_path}",
    )
    # Packed rows are as long as `max_length`, whatever the examples in them.
    longest = recipe.data.max_length if recipe.data.packing else longest_row(data.train, data.validation)
    model, checkpointing = load_training_model(recipe, source, longest)
    guards = runner.Guards.create()
    trainer = LlmtuneSFTTrainer(
        model=model,
        args=sft_config(recipe, Path(recipe.output_dir), data.validation is not None, checkpointing),
        train_dataset=data.train.select_columns(["input_ids", "labels"]),
        eval_dataset=data.validation.select_columns(["input_ids", "labels"]) if data.validation else None,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.adapter, model),
        callbacks=guards.callbacks(),
        run_info=run_fingerprint(recipe, data.sources),
        packing=row_packing(recipe),
    )
    freezing.attach(recipe, trainer)  # after TRL has put the adapter on: it decides what is trainable
    return runner.Session(trainer, tokenizer, template, data.report, data.sources, guards)


def main(
    recipe: Recipe, overwrite: bool = False, resume: ResumeMode = "auto", force_resume: bool = False
) -> Path | None:
    # Looked up at call time so that tests can wrap `build_trainer` (e.g. to inject a fault).
    return runner.run(recipe, lambda r: build_trainer(r), overwrite, resume, force_resume)


def chat_template_for_training(recipe: Recipe, tokenizer) -> str | None:
    """The template that tokenizes the data: a marker-carrying variant for assistant-only loss."""
    if recipe.data.loss_on == "all":
        return None
    template = training_chat_template(tokenizer)
    if not stop_token_trained(tokenizer, template):
        log.warning("the chat template leaves the end-of-turn token out of the loss: the model may not learn to stop")
    return template
