"""Preference training on a LoRA/QLoRA adapter through TRL: DPO (sigmoid, IPO, hinge losses), KTO and ORPO.

The reference model (DPO, KTO) is never a second copy of the base: starting from the base, it is the policy
with its adapter disabled; starting from an SFT run (`preference.from_run`), TRL adds a frozen copy of the SFT
adapter named "ref" next to the trainable one, so both share the single base in memory. ORPO needs no
reference at all.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset
from peft import PeftModel
from transformers import AutoTokenizer
from trl import DPOTrainer, KTOTrainer

from llmtune.config import Recipe
from llmtune.data.formats import to_preference
from llmtune.data.loading import load_splits, source_fingerprint
from llmtune.models import load_tokenizer
from llmtune.train import runner
from llmtune.train.adapter_speed import StreamlinedAdapter
from llmtune.train.adapters import lora_config
from llmtune.train.arguments import dpo_config, kto_config, orpo_config, row_packing
from llmtune.train.checkpoints import AtomicCheckpoints
from llmtune.train.lm_head import LabelOnlyLMHead
from llmtune.train.resume import ResumeMode, run_fingerprint
from llmtune.train.sampling import ReproducibleLengthGrouping
from llmtune.train.speed import load_training_model

log = logging.getLogger("llmtune.dpo")
REFERENCE_ADAPTER = "ref"  # the name TRL gives the frozen copy of the starting adapter


class DropReferenceAdapter:
    """Trainer mixin: PEFT saves every adapter; the frozen "ref" copy is rebuilt from `preference.from_run` on
    load and resume, so writing it would only double the artifact."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        shutil.rmtree(Path(output_dir or self.args.output_dir) / REFERENCE_ADAPTER, ignore_errors=True)


class LlmtuneDPOTrainer(
    AtomicCheckpoints, DropReferenceAdapter, ReproducibleLengthGrouping, LabelOnlyLMHead, StreamlinedAdapter, DPOTrainer
):
    """TRL's DPOTrainer with atomic, hash-listed checkpoints."""


class LlmtuneKTOTrainer(AtomicCheckpoints, DropReferenceAdapter, LabelOnlyLMHead, StreamlinedAdapter, KTOTrainer):
    """TRL's KTOTrainer with atomic, hash-listed checkpoints; pairs are unpaired by TRL."""


def _orpo_trainer_class() -> type:
    from llmtune.train.experimental import ORPOTrainer

    class LlmtuneORPOTrainer(AtomicCheckpoints, StreamlinedAdapter, ORPOTrainer):
        """TRL's (experimental) ORPOTrainer with atomic, hash-listed checkpoints; no reference model."""

    return LlmtuneORPOTrainer


def _trainer_for(method: str) -> tuple[type, Callable[..., Any]]:
    if method == "dpo":
        return LlmtuneDPOTrainer, dpo_config
    if method == "kto":
        return LlmtuneKTOTrainer, kto_config
    return _orpo_trainer_class(), orpo_config


def preference_datasets(recipe: Recipe) -> tuple[Dataset, Dataset | None, dict[str, Any], list[dict[str, Any]]]:
    """Validated pairs as conversational datasets TRL tokenizes with the model's chat template."""
    data = recipe.data
    loaded = load_splits(recipe, to_preference)
    train, validation = loaded.train, loaded.validation
    report: dict[str, Any] = {"loaded": {k: v.as_dict() for k, v in loaded.loaded.items()}}
    report["train"] = {"rows": len(train)}
    sources = [source_fingerprint(s) for s in [*data.train, *data.validation]]
    train_ds = Dataset.from_list([e.value for e in train])
    val_ds = None
    if validation:
        report["validation"] = {"rows": len(validation)}
        val_ds = Dataset.from_list([e.value for e in validation])
    return train_ds, val_ds, report, sources


def build_trainer(recipe: Recipe) -> runner.Session:
    source = runner.start(recipe)
    from_run = recipe.preference.from_run
    # From an SFT run, its tokenizer carries the chat template the adapter was trained with.
    tokenizer = AutoTokenizer.from_pretrained(from_run) if from_run else load_tokenizer(recipe.model, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_ds, val_ds, report, sources = preference_datasets(recipe)
    log.info("data: %d preference pairs for training, %d held out", len(train_ds), len(val_ds) if val_ds else 0)

    longest = longest_pair(train_ds, val_ds, tokenizer, recipe.data.max_length)
    model, checkpointing = load_training_model(recipe, source, longest)
    peft_config = lora_config(recipe.adapter, model)
    if from_run:
        model = PeftModel.from_pretrained(model, str(from_run), is_trainable=True)
        peft_config = None
    guards = runner.Guards.create()
    trainer_class, make_args = _trainer_for(recipe.method)
    # DPO and KTO score through the label-only head (which shares prefixes); ORPO keeps its own TRL forward.
    head_options = {} if recipe.method == "orpo" else {"packing": row_packing(recipe)}
    trainer = trainer_class(
        model=model,
        args=make_args(recipe, Path(recipe.output_dir), val_ds is not None, checkpointing),
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=guards.callbacks(),
        run_info=run_fingerprint(recipe, sources),
        **head_options,
    )
    return runner.Session(trainer, tokenizer, None, report, sources, guards)


def longest_pair(train: Dataset, validation: Dataset | None, tokenizer, max_length: int | None) -> int:
    """Tokens in the longest prompt + answer as the chat template renders it (TRL tokenizes the pairs later)."""
    longest = 0
    for dataset in (train, validation):
        for row in dataset if dataset is not None else []:
            for side in ("chosen", "rejected"):
                text = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
                longest = max(longest, len(tokenizer(text, add_special_tokens=False).input_ids))
    return min(longest, max_length) if max_length else longest


def main(
    recipe: Recipe, overwrite: bool = False, resume: ResumeMode = "auto", force_resume: bool = False
) -> Path | None:
    return runner.run(recipe, lambda r: build_trainer(r), overwrite, resume, force_resume)
