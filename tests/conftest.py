"""Shared fixtures: an isolated llmtune cache, offline hubs, the tiny model built once per session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Offline like our users' CI; set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One cache per test session unless the caller shares one (LLMTUNE_TEST_CACHE) to reuse imported models.
os.environ["LLMTUNE_CACHE"] = os.environ.get("LLMTUNE_TEST_CACHE") or tempfile.mkdtemp(prefix="llmtune-cache-")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from llmtune.builtin_models import ensure_builtin

    return ensure_builtin("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def chat_file(tmp_path) -> Path:
    """A small chat dataset the tiny model can overfit: one fixed answer per question."""
    import json

    rows = []
    for i in range(24):
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": f"What is item {i}?"},
                    {"role": "assistant", "content": f"Item {i} is a dose of {i % 3} mg daily."},
                ]
            }
        )
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="session")
def finished_sft_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A real, finished tiny-model SFT run: what preference recipes name in `preference.from_run`."""
    from llmtune.config import load_recipe
    from llmtune.train import sft
    from tests.helpers import REPO

    folder = tmp_path_factory.mktemp("finished-sft")
    recipe = load_recipe(
        REPO / "recipes" / "clinical-qa" / "sft-tiny.yaml",
        [f"output_dir={folder / 'run'}", "train.max_steps=2", "data.validation_fraction=0"],
    )
    return sft.main(recipe)
