"""`task: classification`: a new head over a pretrained body predicts one of `classification.labels` per row.

The base loads as transformers' AutoModelForSequenceClassification; its new head is initialised as the recipe
states (logged). With an adapter the body gets LoRA and PEFT (task_type SEQ_CLS) puts the head in
`modules_to_save`: it trains fully and is saved in adapter_model.safetensors. Without one, the whole model
trains. transformers' Trainer trains; llmtune/train/runner.py adds what every method shares (atomic
checkpoints, exact resume, guards, manifest, outputs). Validation reports accuracy and macro F1
(`eval_accuracy`, `eval_f1`), which early stopping and `keep_best` can select on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from sklearn.metrics import accuracy_score, f1_score
from transformers import DataCollatorWithPadding, EvalPrediction, Trainer, TrainingArguments

from llmtune.config import Recipe
from llmtune.data.classification import prepare_classification_data
from llmtune.errors import LlmtuneError
from llmtune.models import classifier_config, load_tokenizer
from llmtune.train import freezing, runner
from llmtune.train.adapter_speed import StreamlinedAdapter
from llmtune.train.adapters import lora_config
from llmtune.train.arguments import common_args
from llmtune.train.checkpoints import AtomicCheckpoints
from llmtune.train.resume import ResumeMode, run_fingerprint
from llmtune.train.sampling import ReproducibleLengthGrouping
from llmtune.train.speed import load_training_model

log = logging.getLogger("llmtune.classification")

# The names transformers gives a sequence classifier's new head (Llama-like: score; BERT-like: classifier);
# PEFT's SEQ_CLS adds the same two to `modules_to_save`.
HEAD_NAMES = ("score", "classifier")


class ClassificationError(LlmtuneError, ValueError):
    pass


class LlmtuneClassificationTrainer(
    AtomicCheckpoints, freezing.GradualUnfreezingOptimizer, ReproducibleLengthGrouping, StreamlinedAdapter, Trainer
):
    """transformers' Trainer for a sequence classifier, with atomic, hash-listed checkpoints, the CPU fast paths
    and gradual unfreezing (the head trains in every phase: llmtune/train/freezing.py)."""


def classification_head(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """(name, module) of the classifier's head on the transformers model (not its PEFT wrapper)."""
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Module):
            return name, head
    raise ClassificationError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def init_head(model: torch.nn.Module, scheme: str) -> str:
    """Initialise the new head as the recipe says; returns the line to log. normal: N(0, initializer_range²)
    with zero biases, as transformers does, but drawn here so the scheme is ours, not a library default;
    zeros: the output layer starts at zero, so every class starts equally likely."""
    name, head = classification_head(model)
    layers = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(0.0, std)
            if layer.bias is not None:
                layer.bias.zero_()
        if scheme == "zeros":
            layers[-1].weight.zero_()
    out = layers[-1]
    how = "to zeros" if scheme == "zeros" else f"N(0, {std:g}²)"
    return f"{name} head {out.out_features}x{out.in_features} initialised {how}"


def keep_head_in_float32(model: torch.nn.Module) -> bool:
    """A bf16 base (bf16 autocast with an adapter, llmtune/train/speed.py) would give the new head bf16 weights:
    PEFT upcasts LoRA weights to fp32, not `modules_to_save`, and bf16 (8-bit mantissa) drops small updates.
    The head is kept in fp32, and its input cast to fp32 so that it also runs outside autocast."""
    _, head = classification_head(model)
    if all(p.dtype == torch.float32 for p in head.parameters()):
        return False
    head.float()
    head.register_forward_pre_hook(_inputs_to_float32)  # PEFT's copy of the head keeps the hook
    return True


def _inputs_to_float32(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def classification_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro F1 (over the labels present in the gold or predicted labels), as eval_accuracy and
    eval_f1 in the validation logs."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted, gold = np.asarray(logits).argmax(-1), np.asarray(prediction.label_ids)
    return {"accuracy": float(accuracy_score(gold, predicted)),
            "f1": float(f1_score(gold, predicted, average="macro", zero_division=0))}


def build_model(recipe: Recipe, source, pad_token_id: int | None, longest: int) -> tuple[torch.nn.Module, bool]:
    """The classifier to train (head initialised, LoRA on the body when there is an adapter) and whether to
    checkpoint activations."""
    section = recipe.classification
    assert section is not None  # Recipe._check_task
    model, checkpointing = load_training_model(recipe, source, longest,
                                               **classifier_config(section.labels, pad_token_id))
    log.info(init_head(model, section.head_init))
    if recipe.quantization is not None:  # as TRL does for QLoRA: norms and head in fp32, input grads on
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif keep_head_in_float32(model):
        log.info("classification head kept in fp32 on the bf16 base")
    if recipe.adapter is not None:
        model = get_peft_model(model, lora_config(recipe.adapter, model, task_type="SEQ_CLS"))
    return model, checkpointing


def build_trainer(recipe: Recipe) -> runner.Session:
    source = runner.start(recipe)
    tokenizer = load_tokenizer(recipe.model, source)
    data = prepare_classification_data(recipe, tokenizer)
    log.info("data: %d train rows %s, %s validation rows", len(data.train), data.report["train"]["label_counts"],
             len(data.validation) if data.validation is not None else 0)
    model, checkpointing = build_model(recipe, source, tokenizer.pad_token_id, data.longest)
    guards = runner.Guards.create()
    has_validation = data.validation is not None
    trainer = LlmtuneClassificationTrainer(
        model=model,
        args=TrainingArguments(**common_args(recipe, Path(recipe.output_dir), has_validation, checkpointing)),
        train_dataset=data.train,
        eval_dataset=data.validation,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
        callbacks=guards.callbacks(),
        run_info=run_fingerprint(recipe, data.sources),
    )
    freezing.attach(recipe, trainer)  # `freeze:`: which blocks train (the head always does)
    return runner.Session(trainer, tokenizer, None, data.report, data.sources, guards)


def main(
    recipe: Recipe, overwrite: bool = False, resume: ResumeMode = "auto", force_resume: bool = False
) -> Path | None:
    # Looked up at call time so that tests can wrap `build_trainer`.
    return runner.run(recipe, lambda r: build_trainer(r), overwrite, resume, force_resume)
