"""Helpers shared by tests: write a tiny-model recipe, run the CLI in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_recipe(folder: Path, data_file: Path, **sections) -> Path:
    """A tiny-model recipe in `folder`; keyword sections are merged over the defaults."""
    import yaml

    recipe = {
        "output_dir": str(folder / "run"),
        "seed": 0,
        "model": {"name_or_path": "builtin:tiny"},
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [{"path": str(data_file)}], "max_length": 128},
        "train": {"epochs": 1, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1, "warmup_ratio": 0.0},
    }
    for name, values in sections.items():
        if values is None:
            recipe.pop(name, None)
        elif isinstance(values, dict) and isinstance(recipe.get(name), dict):
            recipe[name] = {**recipe[name], **values}
        else:
            recipe[name] = values
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m llmtune ARGS` in a fresh process; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "llmtune", *args],
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def copy_run_files(run: Path, folder: Path) -> Path:
    """A copy of a run folder's top-level files, to tamper with in a test."""
    folder.mkdir()
    for item in run.iterdir():
        if item.is_file():
            (folder / item.name).write_bytes(item.read_bytes())
    return folder
