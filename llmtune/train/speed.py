"""Fast training defaults, each decided from the hardware, the model and the data, logged, and switchable.

- `train.precision: auto`: bf16 autocast on GPUs with bf16 and on CPUs with AVX512-BF16 or AMX; fp32 elsewhere.
  (tests/test_speed.py checks a bf16 loss curve against fp32.)
- `model.dtype: auto` with an adapter under bf16 autocast: the frozen base is stored in bf16. Autocast casts it
  to bf16 for every matmul anyway; storing it so halves its memory and drops the per-step casts. Adapter
  weights and optimizer state stay fp32 (PEFT upcasts them).
- `model.attn_implementation: auto` in training: eager attention on a CPU when every row is short (its
  backward is ~2-3x faster than the CPU flash kernel's below ~256 tokens, slower above), sdpa elsewhere.
- `train.gradient_checkpointing: auto`: on only when the memory estimate without it does not fit in 80% of
  the memory available now (GPU free memory, or available RAM).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

from llmtune.config import ModelSection, Recipe
from llmtune.memory import GB

log = logging.getLogger("llmtune.train")

EAGER_ATTENTION_MAX_TOKENS = 256
MEMORY_HEADROOM = 0.8


def cpu_supports_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (private torch probes; False when absent)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(precision: str) -> str:
    """`auto` -> bf16 where the hardware computes in bf16 natively, else fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


@dataclass(frozen=True)
class TrainingModel:
    section: ModelSection  # dtype and attention resolved
    reasons: list[str]


def training_model(recipe: Recipe, longest_row: int) -> TrainingModel:
    """The model section to load for training, with `auto` resolved from the hardware and the data."""
    section, reasons = recipe.model, []
    updates: dict[str, str] = {}
    precision = resolve_precision(recipe.train.precision)
    if section.dtype == "auto" and recipe.quantization is None and _has_adapter(recipe) and precision == "bf16":
        updates["dtype"] = "bfloat16"
        reasons.append("frozen base in bf16 (bf16 autocast, adapter in fp32)")
    if section.attn_implementation == "auto":
        on_cpu = not torch.cuda.is_available()
        short = longest_row <= EAGER_ATTENTION_MAX_TOKENS
        updates["attn_implementation"] = "eager" if on_cpu and short else "sdpa"
        if on_cpu and short:
            reasons.append(f"eager attention (CPU, rows of at most {longest_row} tokens)")
    return TrainingModel(section.model_copy(update=updates), reasons)


def _has_adapter(recipe: Recipe) -> bool:
    return recipe.adapter is not None or recipe.preference.from_run is not None


def decide_gradient_checkpointing(recipe: Recipe, model: torch.nn.Module, longest_row: int) -> bool:
    """`auto`: checkpointing only when training without it would not fit; the decision is logged."""
    setting = recipe.train.gradient_checkpointing
    if setting != "auto":
        return bool(setting)
    from llmtune.memory import estimate, model_shape

    rank, targets = _adapter_shape(recipe)
    shape = model_shape(model.config, rank, targets)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    needed = estimate(shape, dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "bfloat16",
                      load_in=recipe.quantization.load_in if recipe.quantization else None,
                      batch_size=recipe.train.batch_size, max_length=longest_row, gradient_checkpointing=False,
                      optimizer=recipe.train.optimizer,
                      sequences_per_row=1 if recipe.method == "sft" else 2).total_gb
    available = available_memory_gb()
    on = needed > MEMORY_HEADROOM * available
    log.info("gradient checkpointing %s: ~%.1f GB estimated without it, %.1f GB available",
             "on" if on else "off", needed, available)
    return on


def _adapter_shape(recipe: Recipe) -> tuple[int | None, str | list[str]]:
    """LoRA rank and targets: the recipe's adapter, or the one `preference.from_run` continues."""
    if recipe.adapter is not None:
        return recipe.adapter.r, recipe.adapter.target_modules
    if recipe.preference.from_run is not None:
        config = json.loads((recipe.preference.from_run / "adapter_config.json").read_text())
        return config["r"], config["target_modules"]
    return None, "all-linear"  # full fine-tuning


def available_memory_gb() -> float:
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free / GB
    import psutil

    return psutil.virtual_memory().available / GB


def load_training_model(recipe: Recipe, source, longest_row: int, **load_kwargs) -> tuple[torch.nn.Module, bool]:
    """The base model as training should load it, and whether to checkpoint activations; both logged.
    `load_kwargs` go to models.load_model (e.g. a sequence classifier's class and labels)."""
    from llmtune.models import load_model

    chosen = training_model(recipe, longest_row)
    precision = resolve_precision(recipe.train.precision)
    log.info("precision %s%s", precision, "".join(f"; {reason}" for reason in chosen.reasons))
    model = load_model(chosen.section, recipe.quantization, source, **load_kwargs)
    return model, decide_gradient_checkpointing(recipe, model, longest_row)
