"""Early stopping on a validation metric and keeping the best checkpoint (train.early_stopping, train.keep_best)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llmtune.config import RecipeError, load_recipe
from tests.helpers import write_recipe

ADAPTER = "adapter_model.safetensors"


@pytest.fixture
def validation_file(tmp_path) -> Path:
    """Questions unlike the training ones: their loss stops falling once the model fits the training answers."""
    rows = [
        {"messages": [{"role": "user", "content": f"What is thing {i}?"},
                      {"role": "assistant", "content": f"Thing {i} is taken {i % 4} times weekly with food."}]}
        for i in range(8)
    ]
    path = tmp_path / "validation.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _train(tmp_path, chat_file, validation_file, **train) -> tuple[Path, dict]:
    from llmtune.train import sft

    path = write_recipe(
        tmp_path, chat_file,
        data={"train": [{"path": str(chat_file)}], "validation": [{"path": str(validation_file)}], "max_length": 128},
        train={"epochs": 30, "batch_size": 4, "learning_rate": 2e-2, "lr_scheduler": "constant", "logging_steps": 1,
               "warmup_ratio": 0.0, "eval_steps": 3, **train},
    )
    out = sft.main(load_recipe(path))
    return out, json.loads((out / "manifest.json").read_text())


def _evaluations(manifest: dict) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in manifest["train"]["log"] if "eval_loss" in r]


def _same_tensors(a: Path, b: Path) -> bool:
    left, right = load_file(a), load_file(b)
    return left.keys() == right.keys() and all(left[k].equal(right[k]) for k in left)


def test_early_stopping_stops_after_patience_and_saves_the_best_checkpoint(tmp_path, chat_file, validation_file):
    patience = 2
    out, manifest = _train(tmp_path, chat_file, validation_file, early_stopping={"patience": patience})

    evaluations = _evaluations(manifest)
    best_step, best_loss = min(evaluations, key=lambda e: e[1])
    best = manifest["train"]["best_checkpoint"]
    assert best["stopped_early"] and manifest["train"]["steps"] < best["steps_planned"] == 180
    assert (best["step"], best["value"]) == (best_step, best_loss)
    # It stopped at the `patience`-th evaluation without improvement, not before and not after.
    after_best = [loss for step, loss in evaluations if step > best_step]
    assert len(after_best) == patience and all(loss >= best_loss for loss in after_best)
    assert evaluations[-1][0] == manifest["train"]["steps"]
    # The saved adapter is the best checkpoint's, not the last step's, and the manifest scores it.
    assert _same_tensors(out / ADAPTER, out / f"checkpoint-{best_step}" / ADAPTER)
    assert not _same_tensors(out / ADAPTER, out / f"checkpoint-{manifest['train']['steps']}" / ADAPTER)
    assert manifest["validation"]["eval_loss"] == pytest.approx(best_loss, rel=1e-6)


def test_keep_best_protects_the_best_checkpoint_from_rotation(tmp_path, chat_file, validation_file):
    out, manifest = _train(tmp_path, chat_file, validation_file, epochs=6, keep_best=True, save_total_limit=1)

    best_step = min(_evaluations(manifest), key=lambda e: e[1])[0]
    last = manifest["train"]["steps"]
    assert not manifest["train"]["best_checkpoint"]["stopped_early"]
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert f"checkpoint-{best_step}" in kept
    if best_step != last:
        assert _same_tensors(out / ADAPTER, out / f"checkpoint-{best_step}" / ADAPTER)
    # Every checkpoint's state names the best checkpoint by its final folder (a resume finds it), not staging.
    for folder in out.glob("checkpoint-*"):
        state = json.loads((folder / "trainer_state.json").read_text())
        assert Path(state["best_model_checkpoint"]).parent == out


def test_validation_metrics_of_the_saved_model_are_in_the_manifest(tmp_path, chat_file, validation_file):
    _, manifest = _train(tmp_path, chat_file, validation_file, epochs=1)

    assert manifest["train"]["best_checkpoint"] is None
    assert manifest["validation"]["eval_loss"] == pytest.approx(_evaluations(manifest)[-1][1], rel=1e-6)


@pytest.mark.parametrize(
    ("train", "data", "message"),
    [
        ({"early_stopping": {"patience": 2}}, {}, "train.early_stopping` needs validation data"),
        ({"keep_best": True, "eval_steps": 3, "save_steps": 4}, {"validation_fraction": 0.2},
         "must be a multiple of `train.eval_steps`"),
        ({"early_stopping": {"patience": 0}}, {"validation_fraction": 0.2}, "patience"),
    ],
)
def test_selection_settings_are_checked_before_training(tmp_path, chat_file, train, data, message):
    path = write_recipe(tmp_path, chat_file, train=train, data=data)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_early_stopping_direction_follows_the_metric():
    from llmtune.config import EarlyStoppingSection

    assert not EarlyStoppingSection(metric="eval_loss").greater_is_better
    assert EarlyStoppingSection(metric="accuracy").greater_is_better
    assert not EarlyStoppingSection(metric="accuracy", mode="min").greater_is_better
