"""Training that survives kills, preemption, NaNs and bad input (tiny model, CPU).

The reference is one uninterrupted run; every interrupted-then-resumed run must end with adapter tensors
`torch.equal` to it and the same per-step losses after the resume point. The recipe uses gradient
accumulation, dropout (so RNG state matters) and three shuffled epochs.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmtune.config import ModelSection, load_recipe
from llmtune.models import ModelLoadError, load_model
from llmtune.train import sft
from llmtune.train.checkpoints import CHECKPOINT_MANIFEST, STAGING, complete_checkpoints
from llmtune.train.guards import TrainingDivergedError
from tests.helpers import REPO, run_cli, write_recipe

STEPS_PER_EPOCH = 6  # 24 rows, batch 2 x grad_accum 2


def _recipe(folder: Path, chat_file: Path, **train) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(
        folder,
        chat_file,
        adapter={"r": 8, "alpha": 16, "dropout": 0.1},
        train={"epochs": 3, "batch_size": 2, "grad_accum": 2, "learning_rate": 5e-3, "logging_steps": 1,
               "save_steps": 2, "save_total_limit": 2, **train},
    )


def _fault(recipe: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.fault_driver", str(recipe), *flags],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )


def _losses_by_step(run: Path) -> dict[int, float]:
    log = json.loads((run / "manifest.json").read_text())["train"]["log"]
    return {r["step"]: r["loss"] for r in log if "loss" in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted run; returns (chat data file, output folder)."""
    folder = tmp_path_factory.mktemp("reference")
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(24)
    ]
    chat_file = folder / "chat.jsonl"
    chat_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = run_cli("train", str(_recipe(folder, chat_file)))
    assert result.returncode == 0, result.stderr[-3000:]
    return chat_file, folder / "run"


def _assert_same_as_reference(run: Path, reference_run: Path, resumed_after: int) -> None:
    expected, got = load_file(reference_run / "adapter_model.safetensors"), load_file(run / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    unequal = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not unequal, f"{len(unequal)} adapter tensors differ, e.g. {unequal[0]}"
    ref_losses, losses = _losses_by_step(reference_run), _losses_by_step(run)
    assert max(ref_losses) == 3 * STEPS_PER_EPOCH
    after = {s: v for s, v in ref_losses.items() if s > resumed_after}
    assert after and {s: losses[s] for s in after} == after


@pytest.mark.parametrize(
    ("flags", "resume_step"),
    [
        (["--sigkill-at-step", "9"], 8),  # mid-epoch, between checkpoints
        (["--sigkill-at-epoch-end", "1"], 6),  # right after the epoch-1 boundary checkpoint
        (["--sigkill-during-save", "10"], 8),  # inside the checkpoint-10 write
    ],
    ids=["mid-epoch", "epoch-boundary", "during-checkpoint-write"],
)
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference, flags, resume_step):
    chat_file, reference_run = reference
    recipe = _recipe(tmp_path, chat_file)
    killed = _fault(recipe, *flags)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = tmp_path / "run"
    assert not (run / "manifest.json").exists()
    assert checkpoint_steps(run) == [resume_step - 2, resume_step]  # retention 2, newest complete one last
    if "--sigkill-during-save" in flags:
        assert (run / STAGING / "checkpoint-10").is_dir()  # the partial write is there ...
        assert not (run / "checkpoint-10").exists()  # ... and never under a checkpoint name

    resumed = run_cli("train", str(recipe))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / f'checkpoint-{resume_step}'}" in resumed.stderr
    assert not (run / STAGING).exists()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["train"]["resumed_from"].endswith(f"checkpoint-{resume_step}")
    _assert_same_as_reference(run, reference_run, resume_step)


def checkpoint_steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in complete_checkpoints(run)]


def test_retention_one_keeps_a_valid_checkpoint_through_a_killed_write(tmp_path, reference):
    chat_file, reference_run = reference
    recipe = _recipe(tmp_path, chat_file, save_total_limit=1)
    killed = _fault(recipe, "--sigkill-during-save", "10")
    assert killed.returncode == -9
    run = tmp_path / "run"
    assert checkpoint_steps(run) == [8]
    assert (run / "checkpoint-8" / CHECKPOINT_MANIFEST).is_file()
    resumed = run_cli("train", str(recipe))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert checkpoint_steps(run) == [18]
    _assert_same_as_reference(run, reference_run, 8)


def test_sigterm_saves_at_the_step_boundary_and_resume_is_exact(tmp_path, reference):
    chat_file, reference_run = reference
    recipe = _recipe(tmp_path, chat_file, save_steps=None)  # no scheduled checkpoints: only the SIGTERM one
    stopped = _fault(recipe, "--sigterm-at-step", "7")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped" in stopped.stdout and "SIGTERM received" in " ".join(stopped.stderr.split())
    run = tmp_path / "run"
    [step] = checkpoint_steps(run)
    assert step in (7, 8)  # the step during which the signal arrived, finished, then saved
    assert not (run / "manifest.json").exists()

    resumed = run_cli("train", str(recipe))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_as_reference(run, reference_run, step)


def test_nan_stops_before_a_poisoned_checkpoint(tmp_path, chat_file, monkeypatch):
    recipe = load_recipe(_recipe(tmp_path, chat_file, epochs=1))
    build = sft.build_trainer

    def poisoned_at_step_5(recipe):
        session = build(recipe)
        trainer = session.trainer
        compute_loss = trainer.compute_loss

        def loss_with_nan(*args, **kwargs):
            out = compute_loss(*args, **kwargs)
            if trainer.state.global_step + 1 == 5:  # the step being computed
                return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
            return out

        trainer.compute_loss = loss_with_nan
        return session

    monkeypatch.setattr(sft, "build_trainer", poisoned_at_step_5)
    with pytest.raises(TrainingDivergedError, match="training diverged at step 5"):
        sft.main(recipe)
    run = tmp_path / "run"
    assert checkpoint_steps(run) == [2, 4]  # nothing after step k-1
    assert not (run / "manifest.json").exists() and not (run / "adapter_model.safetensors").exists()
    for checkpoint in complete_checkpoints(run):
        for name, tensor in load_file(checkpoint / "adapter_model.safetensors").items():
            assert torch.isfinite(tensor).all(), f"{checkpoint.name}/{name}"


def _stopped_run(tmp_path: Path, chat_file: Path) -> Path:
    recipe = _recipe(tmp_path, chat_file, save_steps=None)
    assert _fault(recipe, "--sigterm-at-step", "3").returncode == 0
    return recipe


def test_resume_with_changed_recipe_or_data_is_refused_with_the_difference(tmp_path, chat_file):
    recipe = _stopped_run(tmp_path, chat_file)
    changed_lr = run_cli("train", str(recipe), "--set", "train.learning_rate=1e-3")
    assert changed_lr.returncode == 2
    message = " ".join(changed_lr.stderr.split())
    assert "refusing to resume" in message and "recipe.train.learning_rate: 0.005 -> 0.001" in message

    original = chat_file.read_text()
    chat_file.write_text(original.replace("Item 3 ", "Item three "))
    changed_data = run_cli("train", str(recipe))
    assert changed_data.returncode == 2
    assert "sources[0].sha256" in " ".join(changed_data.stderr.split())
    chat_file.write_text(original)

    more_steps = run_cli("train", str(recipe), "--set", "train.logging_steps=2")  # an allowed change
    assert more_steps.returncode == 0, more_steps.stderr[-2000:]


def test_force_resume_accepts_a_changed_recipe(tmp_path, chat_file):
    recipe = _stopped_run(tmp_path, chat_file)
    forced = run_cli("train", str(recipe), "--set", "train.learning_rate=1e-3", "--force-resume")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (tmp_path / "run" / "manifest.json").is_file()


class _Payload:
    """Unpickling this creates the canary file: proof that a pickle was executed."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def test_planted_pickle_in_a_checkpoint_is_refused_unexecuted(tmp_path, chat_file):
    recipe = _stopped_run(tmp_path, chat_file)
    [checkpoint] = complete_checkpoints(tmp_path / "run")
    canary = tmp_path / "canary"
    (checkpoint / "optimizer.pt").write_bytes(pickle.dumps(_Payload(canary)))
    swapped = run_cli("train", str(recipe))
    assert swapped.returncode == 2 and "optimizer.pt changed since llmtune wrote it" in " ".join(swapped.stderr.split())
    assert not canary.exists()

    (checkpoint / "optimizer.pt").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(canary)))
    planted = run_cli("train", str(recipe))
    assert planted.returncode == 2 and "files llmtune did not write: pytorch_model.bin" in planted.stderr
    assert not canary.exists()


def test_pickle_weights_from_elsewhere_are_never_loaded(tmp_path, tiny_model_dir):
    folder = tmp_path / "downloaded-model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    canary = tmp_path / "canary"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(canary)))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(ModelSection(name_or_path=str(folder)))
    assert not canary.exists()


def test_secrets_never_reach_outputs_or_logs(tmp_path, chat_file):
    # Built at run time so that no token-shaped literal sits in the repository.
    canaries = {"HF_TOKEN": "hf_" + "CANARY" * 6, "OPENAI_API_KEY": "sk-" + "CANARY" * 6}
    recipe = _recipe(tmp_path, chat_file, epochs=1, report_to=["tensorboard"])
    env = {**canaries, "HF_HUB_TOKEN": canaries["HF_TOKEN"]}
    trained = run_cli("train", str(recipe), env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]

    # A failing HTTP call carrying the token: a hub dataset fetched from an endpoint that refuses connections.
    (tmp_path / "failing").mkdir()
    failing = write_recipe(tmp_path / "failing", chat_file, data={"train": [{"path": "org/private-dataset"}]})
    http_env = {**env, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    failed = run_cli("train", str(failing), env=http_env, timeout=300)
    assert failed.returncode == 2 and "org/private-dataset" in failed.stderr

    texts = [trained.stdout, trained.stderr, failed.stdout, failed.stderr]
    files = [p for folder in (tmp_path / "run", tmp_path / "failing") if folder.exists()
             for p in folder.rglob("*") if p.is_file()]
    assert any(p.name.startswith("events.out.tfevents") for p in files)  # the tracker folder is scanned too
    for secret in canaries.values():
        assert not any(secret in text for text in texts)
        leaked = [p for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, leaked
