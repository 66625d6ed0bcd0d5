"""Deciding whether and from where to resume, and refusing a resume whose inputs changed."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Literal

from llmtune.config import Recipe
from llmtune.errors import LlmtuneError
from llmtune.train.checkpoints import latest_checkpoint, remove_leftovers, verify_checkpoint
from llmtune.train.outputs import MANIFEST

log = logging.getLogger("llmtune.resume")

ResumeMode = Literal["auto", "require", "never"]
# Fields that may differ between the interrupted run and the resumed one: they extend or observe training
# without changing what was already computed.
ALLOWED_CHANGES = (
    "output_dir",
    "train.max_steps",
    "train.epochs",
    "train.logging_steps",
    "train.eval_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.report_to",
    "train.dataloader_num_workers",
)


class ResumeError(LlmtuneError, RuntimeError):
    pass


def run_fingerprint(recipe: Recipe, sources: list[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint records about the inputs that produced it."""
    return {"recipe": recipe.model_dump(mode="json"), "sources": sources}


def prepare_output_dir(output_dir: Path, fresh: bool) -> None:
    """Remove what a killed checkpoint write left behind; with `fresh`, every checkpoint too."""
    if fresh and output_dir.exists():
        # The old manifest goes first: until the new run finishes, the folder must not claim to be finished.
        (output_dir / MANIFEST).unlink(missing_ok=True)
        for path in output_dir.glob("checkpoint-*"):
            shutil.rmtree(path)
    if output_dir.exists():
        for path in remove_leftovers(output_dir):
            log.warning("removed incomplete checkpoint %s", path)


def choose_checkpoint(
    output_dir: Path, mode: ResumeMode, fingerprint: dict[str, Any], force: bool
) -> Path | None:
    if mode == "never":
        return None
    checkpoint = latest_checkpoint(output_dir) if output_dir.exists() else None
    if checkpoint is None:
        if mode == "require":
            raise ResumeError(f"{output_dir}: no complete checkpoint to resume from")
        return None
    saved = verify_checkpoint(checkpoint)
    changes = describe_changes({k: saved.get(k) for k in fingerprint}, fingerprint)
    if changes and not force:
        raise ResumeError(
            f"{checkpoint} was written with different inputs; refusing to resume:\n"
            + "\n".join(f"  {line}" for line in changes)
            + "\nPass --force-resume to resume anyway, or --overwrite to start again."
        )
    if changes:
        log.warning("resuming despite changed inputs (--force-resume):\n%s", "\n".join(changes))
    log.info("resuming from %s", checkpoint)
    return checkpoint


def describe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    before, after = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(set(before) | set(after)):
        if key.startswith("recipe.") and key.removeprefix("recipe.").startswith(ALLOWED_CHANGES):
            continue
        if before.get(key) != after.get(key):
            lines.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return lines


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = {}
        for index, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}
