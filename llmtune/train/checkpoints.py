"""Atomic, verifiable checkpoints on top of the transformers Trainer.

transformers writes `checkpoint-N` in place and, on resume, trusts whatever folder has the highest number, so
a kill during a write leaves a partial checkpoint that a later run picks up. Here every checkpoint is written
into a staging folder on the same filesystem, fsynced, listed with the SHA-256 of each file in
`llmtune-checkpoint.json`, and renamed into place; older ones are pruned only after that. Resume considers
only folders whose listing is present, and loads nothing (several files are pickles) whose hash differs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmtune.errors import LlmtuneError
from llmtune.hashing import file_sha256

CHECKPOINT_MANIFEST = "llmtune-checkpoint.json"
STAGING = ".checkpoint-staging"
PREFIX = "checkpoint-"
# The Trainer pickles its arguments into every checkpoint; the recipe is kept in our manifest instead.
_DROPPED = ("training_args.bin",)


class CheckpointError(LlmtuneError, RuntimeError):
    pass


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [folder, *[p for p in folder.rglob("*") if p.is_dir()]]:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose manifest exists, oldest first."""
    found = [
        p for p in output_dir.glob(f"{PREFIX}*")
        if p.is_dir() and p.name.removeprefix(PREFIX).isdigit() and (p / CHECKPOINT_MANIFEST).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def remove_leftovers(output_dir: Path) -> list[Path]:
    """Delete staging folders and checkpoints a killed write left without a manifest."""
    removed = []
    for path in [output_dir / STAGING, *output_dir.glob(f"{PREFIX}*")]:
        if path.is_dir() and not (path / CHECKPOINT_MANIFEST).is_file():
            shutil.rmtree(path)
            removed.append(path)
    return removed


def latest_checkpoint(output_dir: Path) -> Path | None:
    complete = complete_checkpoints(output_dir)
    return complete[-1] if complete else None


def read_checkpoint_manifest(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / CHECKPOINT_MANIFEST).read_text())


def verify_checkpoint(checkpoint: Path) -> dict[str, Any]:
    """Refuse a checkpoint whose files are not exactly the ones llmtune wrote (e.g. a planted pickle)."""
    manifest = read_checkpoint_manifest(checkpoint)
    listed: dict[str, str] = manifest["files"]
    present = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()} - {CHECKPOINT_MANIFEST}
    unknown = sorted(present - set(listed))
    if unknown:
        raise CheckpointError(f"{checkpoint}: files llmtune did not write: {', '.join(unknown)}; refusing to load")
    for name, digest in listed.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"{checkpoint}: {name} is missing")
        if file_sha256(path) != digest:
            raise CheckpointError(
                f"{checkpoint}: {name} changed since llmtune wrote it (sha256 mismatch); refusing to load it"
            )
    return manifest


def finalize_checkpoint(staged: Path, final: Path, run_info: dict[str, Any]) -> None:
    """Seal a staged checkpoint (drop pickled args, list hashes, fsync) and rename it into place."""
    for name in _DROPPED:
        (staged / name).unlink(missing_ok=True)
    files = {str(p.relative_to(staged)): file_sha256(p) for p in sorted(staged.rglob("*")) if p.is_file()}
    manifest = {"step": checkpoint_step(final), "files": files, **run_info}
    (staged / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=2))
    _fsync_tree(staged)
    if final.exists():  # the same step saved again (e.g. SIGTERM right after a scheduled save)
        shutil.rmtree(final)
    staged.rename(final)
    _fsync_dir(final.parent)


def prune_checkpoints(output_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints, and `protect` (the best one, when keeping the best) whatever its age."""
    for old in complete_checkpoints(output_dir)[:-keep]:
        if protect is None or old.name != protect.name:
            shutil.rmtree(old)


class AtomicCheckpoints:
    """Trainer mixin: `_save_checkpoint` writes into a staging folder and renames when complete."""

    def __init__(self, *args, run_info: dict[str, Any] | None = None, **kwargs):
        self._run_info = run_info or {}
        self._staging_checkpoint = False
        super().__init__(*args, **kwargs)

    def _get_output_dir(self, trial):
        if self._staging_checkpoint:
            return str(Path(self.args.output_dir) / STAGING)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        output_dir = Path(self.args.output_dir)
        name = f"{PREFIX}{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(output_dir / STAGING / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its part (e.g. its RNG state)
        finally:
            self._staging_checkpoint = False
        self.accelerator.wait_for_everyone()
        best = self._best_checkpoint_after_save(output_dir, name)
        if self.args.should_save:
            if best is not None:  # the state file records where the best checkpoint will be, not the staging copy
                self.state.save_to_json(str(output_dir / STAGING / name / "trainer_state.json"))
            finalize_checkpoint(output_dir / STAGING / name, output_dir / name, self._run_info)
            shutil.rmtree(output_dir / STAGING, ignore_errors=True)
            prune_checkpoints(output_dir, keep=self.args.save_total_limit or 1, protect=best)
        self.accelerator.wait_for_everyone()

    def _best_checkpoint_after_save(self, output_dir: Path, name: str) -> Path | None:
        """transformers records the best checkpoint under the folder it wrote to, our staging folder; point it
        at the final folder (the one being sealed now, or an older one that exists)."""
        step = self.state.best_global_step
        if not (self.args.load_best_model_at_end and step):
            return None
        best = output_dir / f"{PREFIX}{step}"
        if best.name != name and not best.is_dir():
            return None
        self.state.best_model_checkpoint = str(best)
        return best
