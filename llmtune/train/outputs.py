"""What a run leaves behind: adapter (safetensors), tokenizer + chat template, resolved recipe, manifest.

Artifacts are written into a staging folder inside the output folder and moved into place; `manifest.json`
is written last, so its presence marks a complete run.
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from llmtune.config import Recipe, recipe_to_yaml
from llmtune.errors import LlmtuneError

MANIFEST = "manifest.json"
RECIPE = "recipe.yaml"
_LIBRARIES = ("llmtune", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "tokenizers")


class OutputExistsError(LlmtuneError, FileExistsError):
    pass


@dataclass
class RunStats:
    wall_seconds: float
    train_seconds: float
    steps: int
    tokens_seen: int  # non-padding input tokens, as TRL/transformers count them
    final_loss: float | None
    losses: list[dict[str, float]] = field(default_factory=list)
    trainable_parameters: int = 0
    total_parameters: int = 0
    resumed_from: str | None = None
    tokens_this_process: int | None = None  # tokens seen since this process started (after a resume)


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse to mix a new run into a finished one."""
    if (path / MANIFEST).exists() and not overwrite:
        raise OutputExistsError(f"{path} already holds a finished run; pass --overwrite or choose another output_dir")


def library_versions() -> dict[str, str]:
    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def peak_memory() -> dict[str, float]:
    # ru_maxrss is in KiB on Linux: the high-water mark of this process's resident memory.
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        memory["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def build_manifest(
    recipe: Recipe, data_report: dict[str, Any], sources: list[dict[str, Any]], stats: RunStats, world_size: int
) -> dict[str, Any]:
    return {
        "method": recipe.method,
        "seed": recipe.seed,
        "libraries": library_versions(),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "world_size": world_size,
        "data": {"sources": sources, **data_report},
        "train": {
            "steps": stats.steps,
            "final_loss": stats.final_loss,
            "tokens_seen": stats.tokens_seen,
            "tokens_per_second": _rate(stats),
            "resumed_from": stats.resumed_from,
            "train_seconds": round(stats.train_seconds, 3),
            "trainable_parameters": stats.trainable_parameters,
            "total_parameters": stats.total_parameters,
            "log": stats.losses,
        },
        "wall_seconds": round(stats.wall_seconds, 3),
        "memory": peak_memory(),
    }


def _rate(stats: RunStats) -> float | None:
    tokens = stats.tokens_this_process if stats.tokens_this_process is not None else stats.tokens_seen
    return tokens / stats.train_seconds if stats.train_seconds else None


def write_run_outputs(trainer, tokenizer, template: str | None, recipe: Recipe, manifest: dict[str, Any]) -> Path:
    """Save everything into `recipe.output_dir` via a staging folder; returns the output folder."""
    out = Path(recipe.output_dir)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    trainer.save_model(str(staging))  # PEFT adapter (adapter_model.safetensors) or full model, safetensors
    # The Trainer also pickles its arguments; the resolved recipe says the same in a safe, readable format.
    (staging / "training_args.bin").unlink(missing_ok=True)
    if template is not None:
        tokenizer.chat_template = template  # the template the data was tokenized with, markers included
    tokenizer.save_pretrained(str(staging))
    (staging / RECIPE).write_text(recipe_to_yaml(recipe))
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    staging.rmdir()
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
