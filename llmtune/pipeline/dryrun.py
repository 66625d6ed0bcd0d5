"""`llmtune run RECIPE --dry-run`: everything that can be checked with no network and no accelerator.

The recipe has been loaded (schemas, rules, input files) by then; this adds the accelerate config, parsed by
accelerate itself, and a training-memory estimate per training stage from the architecture's shape.
"""

from __future__ import annotations

from typing import Any

from llmtune.config import Recipe, RecipeError
from llmtune.memory import architecture_config, estimate, model_shape
from llmtune.pipeline import sections
from llmtune.pipeline.recipe import PipelineRecipe, validate_train


def dry_run(recipe: PipelineRecipe) -> list[str]:
    lines = [f"stages: {' -> '.join(recipe.stages)}; output: {recipe.output_dir}"]
    shards, launch = 1, None
    if recipe.accelerate_config is not None:
        shards, launch = _accelerate(recipe)
        lines.append(launch)
    config = architecture_config(recipe.model.name_or_path)
    for stage in recipe.trained():
        train = _train_recipe(recipe, stage)
        if config is None:
            lines.append(f"{stage}: {recipe.model.name_or_path}: architecture unknown offline; memory not estimated")
            continue
        lines.append(_memory_line(recipe, stage, train, config, shards))
    return lines


def _train_recipe(recipe: PipelineRecipe, stage: str) -> Recipe:
    raw = sections.sft_raw(recipe) if stage == "sft" else sections.dpo_raw(recipe)
    return validate_train(recipe, stage, raw)


def _memory_line(recipe: PipelineRecipe, stage: str, train: Recipe, config: Any, shards: int) -> str:
    sft = train if stage == "sft" else _sft_recipe(recipe)  # dpo continues the sft run's adapter and base
    adapter, quantization = sft.adapter, sft.quantization
    shape = model_shape(config, adapter.r if adapter else None, adapter.target_modules if adapter else "all-linear")
    budget = recipe.pipeline.gpu_memory_gb
    checkpointing = train.train.gradient_checkpointing

    def needed(with_checkpointing: bool):
        return estimate(shape, dtype=recipe.model.dtype, load_in=quantization.load_in if quantization else None,
                        batch_size=train.train.batch_size, max_length=train.data.max_length or 1024,
                        gradient_checkpointing=with_checkpointing, optimizer=train.train.optimizer,
                        sequences_per_row=1 if stage == "sft" else 2, shards=shards)

    result = needed(checkpointing is True)
    if checkpointing == "auto" and budget is not None and result.total_gb > budget:
        result = needed(True)  # what `auto` turns on when the run starts and finds too little memory
    params = f"{shape.total_params / 1e9:.2f}B" if shape.total_params >= 1e9 else f"{shape.total_params / 1e6:.1f}M"
    line = (f"{stage}: {recipe.model.name_or_path} ({params} params"
            f"{', ' + quantization.load_in if quantization else ''}, LoRA {shape.lora_params / 1e6:.1f}M trainable): "
            f"~{result.total_gb:.1f} GB per process = weights {result.weights_gb:.1f} + adapter and optimizer "
            f"{result.adapter_gb:.1f} + activations {result.activations_gb:.1f} + logits {result.logits_gb:.1f} + "
            f"overhead {result.overhead_gb:.1f}")
    if budget is not None:
        if result.total_gb > budget:
            raise RecipeError(
                f"{recipe.path}: {stage}: estimated {result.total_gb:.1f} GB per process does not fit "
                f"pipeline.gpu_memory_gb={budget:g}; lower {stage}.train.batch_size or {stage}.data.max_length, "
                "set gradient_checkpointing: true, or quantize (quantization.load_in: 4bit)")
        line += f" (fits {budget:g} GB)"
    return line


def _sft_recipe(recipe: PipelineRecipe) -> Recipe:
    return validate_train(recipe, "sft", sections.sft_raw(recipe))


def _accelerate(recipe: PipelineRecipe) -> tuple[int, str]:
    """Parse the config as `accelerate launch` will; weights and optimizer state shard under FSDP and ZeRO-3."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = recipe.accelerate_config
    try:
        config = load_config_from_file(str(path))
    except Exception as err:  # accelerate raises several types for a bad file
        raise RecipeError(f"{recipe.path}: pipeline.accelerate_config: {path}: {err}") from None
    kind = str(config.distributed_type).rsplit(".", 1)[-1]
    zero3 = kind == "DEEPSPEED" and (config.deepspeed_config or {}).get("zero_stage") == 3
    shards = config.num_processes if kind == "FSDP" or zero3 else 1
    return shards, (f"training stages: accelerate launch --config_file {path} -m llmtune train STAGE-RECIPE "
                    f"({kind}, {config.num_processes} processes)")


