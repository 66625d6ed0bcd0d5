"""Recipe train section -> TRL SFTConfig. Every default llmtune changes from TRL's is set here, explicitly."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from trl import DPOConfig, KTOConfig, SFTConfig

from llmtune.config import Recipe
from llmtune.errors import LlmtuneError
from llmtune.train.selection import selection_args
from llmtune.train.shared_prefix import RowPacking
from llmtune.train.speed import resolve_precision

# transformers 5 renamed gradient_checkpointing to activation_checkpointing, but TRL 1.16 still sets the old
# name itself, so the warning fires whatever we pass. Drop this filter when TRL uses the new name.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)


class PrecisionError(LlmtuneError, ValueError):
    pass


def mixed_precision(recipe: Recipe) -> dict[str, bool]:
    """`auto`: bf16 autocast where GPU or CPU computes bf16 natively, fp32 elsewhere (llmtune/train/speed.py)."""
    precision = resolve_precision(recipe.train.precision)
    on_gpu = torch.cuda.is_available()
    if precision == "fp16" and not on_gpu:
        raise PrecisionError("train.precision: fp16 mixed precision needs a GPU; use bf16 or fp32 on CPU")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def group_by_length(recipe: Recipe) -> bool:
    """Unset: on for SFT (rows of mixed lengths pad far less), off for pairs (TRL's KTO needs its own order)."""
    setting = recipe.train.group_by_length
    return setting if setting is not None else recipe.method == "sft"


def row_packing(recipe: Recipe) -> RowPacking:
    """How the label-only head lays out a batch: one row without padding, shared prefixes once."""
    return RowPacking(padding_free=recipe.train.padding_free, share_prefixes=recipe.train.shared_prefix)


def common_args(recipe: Recipe, output_dir: Path, has_validation: bool, gradient_checkpointing: bool) -> dict:
    """TrainingArguments every method shares; each default llmtune changes from TRL's is set here.
    `gradient_checkpointing` is the decision for this model and data (speed.decide_gradient_checkpointing)."""
    train = recipe.train
    eval_strategy = "steps" if train.eval_steps else ("epoch" if has_validation else "no")
    args = dict(
        output_dir=str(output_dir),
        seed=recipe.seed,
        data_seed=recipe.seed,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a ratio of total steps in transformers 5
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optimizer,
        **mixed_precision(recipe),
        use_cpu=not torch.cuda.is_available(),
        # Only when on: each TRL config has its own default (KTO's is "sequential").
        **({"train_sampling_strategy": "group_by_length"} if group_by_length(recipe) else {}),
        # TRL turns checkpointing on by default; it costs ~30% speed and is only needed when memory is short.
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=train.eval_steps,
        # Checkpoints also happen on SIGTERM whatever the strategy (llmtune/train/guards.py).
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=train.save_total_limit,
        report_to=list(train.report_to) or "none",
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=train.dataloader_num_workers,
        ddp_find_unused_parameters=False,
    )
    return args | selection_args(train, eval_strategy)  # checkpoint at each evaluation when keeping the best


def sft_config(recipe: Recipe, output_dir: Path, has_validation: bool, gradient_checkpointing: bool) -> SFTConfig:
    return SFTConfig(
        **common_args(recipe, output_dir, has_validation, gradient_checkpointing),
        # Data arrives tokenized, masked and truncated (llmtune/data/tokenize.py); TRL only packs and collates.
        max_length=recipe.data.max_length if recipe.data.packing else None,
        packing=recipe.data.packing,
        packing_strategy="bfd",
        assistant_only_loss=False,
        completion_only_loss=False,
        dataset_num_proc=None,
    )


def dpo_losses(recipe: Recipe) -> dict:
    """TRL's loss list: the preference loss, plus its "sft" term (chosen-answer NLL) when `sft_weight` is set."""
    section = recipe.preference
    if not section.sft_weight:
        return {"loss_type": [section.loss_type]}
    return {"loss_type": [section.loss_type, "sft"], "loss_weights": [1.0, section.sft_weight]}


def dpo_config(recipe: Recipe, output_dir: Path, has_validation: bool, gradient_checkpointing: bool) -> DPOConfig:
    section = recipe.preference
    return DPOConfig(
        **common_args(recipe, output_dir, has_validation, gradient_checkpointing),
        beta=section.beta,
        **dpo_losses(recipe),
        precompute_ref_log_probs=section.precompute_ref_log_probs,
        max_length=recipe.data.max_length,
        truncation_mode=recipe.data.truncation,
    )


def kto_config(recipe: Recipe, output_dir: Path, has_validation: bool, gradient_checkpointing: bool) -> KTOConfig:
    section = recipe.preference
    return KTOConfig(
        **common_args(recipe, output_dir, has_validation, gradient_checkpointing),
        beta=section.beta,
        precompute_ref_log_probs=section.precompute_ref_log_probs,
        max_length=recipe.data.max_length,
    )


def orpo_config(recipe: Recipe, output_dir: Path, has_validation: bool, gradient_checkpointing: bool):
    from llmtune.train.experimental import ORPOConfig

    return ORPOConfig(
        **common_args(recipe, output_dir, has_validation, gradient_checkpointing),
        beta=recipe.preference.beta,
        max_length=recipe.data.max_length,
    )
