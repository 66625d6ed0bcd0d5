"""Two CPU processes (gloo) train the same adapter as one process with the same global batch.

`accelerate launch --cpu --num_processes 2` silently runs ONE process (see shared/ENVIRONMENT.md), so the
manifest's world_size is checked: a launcher that quietly fell back to one process fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import REPO, run_cli, write_recipe


def _recipe(folder: Path, chat_file: Path, batch_size: int) -> Path:
    folder.mkdir()
    # fp32 and random batches: the comparison needs the same rows in each global batch (length grouping is per
    # process) and sums that do not round differently when the batch is split (bf16 does).
    return write_recipe(
        folder, chat_file, train={"batch_size": batch_size, "max_steps": 6, "learning_rate": 5e-3, "logging_steps": 1,
                                  "precision": "fp32", "group_by_length": False}
    )


def _launch(command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "0"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _compare(single: Path, multi: Path) -> None:
    manifest = json.loads((multi / "manifest.json").read_text())
    assert manifest["world_size"] == 2, "the launcher ran a single process"
    one, two = load_file(single / "adapter_model.safetensors"), load_file(multi / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-4, f"2-process adapter differs from 1-process by {worst}"
    losses_one = [r["loss"] for r in json.loads((single / "manifest.json").read_text())["train"]["log"] if "loss" in r]
    losses_two = [r["loss"] for r in manifest["train"]["log"] if "loss" in r]
    assert losses_two == pytest.approx(losses_one, rel=1e-4)


@pytest.fixture
def single_process_run(tmp_path, chat_file) -> Path:
    result = run_cli("train", str(_recipe(tmp_path / "single", chat_file, batch_size=4)))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "single" / "run"


def test_torchrun_two_processes_match_one(tmp_path, chat_file, single_process_run):
    recipe = _recipe(tmp_path / "ddp", chat_file, batch_size=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "llmtune", "train", str(recipe)]
    result = _launch(command)
    assert result.returncode == 0, result.stderr[-4000:]
    _compare(single_process_run, tmp_path / "ddp" / "run")


def test_accelerate_launch_two_processes_match_one(tmp_path, chat_file, single_process_run):
    recipe = _recipe(tmp_path / "accel", chat_file, batch_size=2)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llmtune", "train", str(recipe)]
    result = _launch(command)
    assert result.returncode == 0, result.stderr[-4000:]
    _compare(single_process_run, tmp_path / "accel" / "run")


def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path, chat_file):
    recipe = _recipe(tmp_path / "preempted", chat_file, batch_size=2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env_one_rank = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_ONLY_RANK": "0"}
    stopped = subprocess.run([*torchrun, "-m", "tests.fault_driver", str(recipe), "--sigterm-at-step", "2"],
                             cwd=REPO, env=env_one_rank, capture_output=True, text=True, timeout=600, check=False)
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    assert stopped.stdout.count("stopped") == 2  # both ranks left the loop cleanly
    run = tmp_path / "preempted" / "run"
    [checkpoint] = list(run.glob("checkpoint-*"))
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    resumed = _launch([*torchrun, "-m", "llmtune", "train", str(recipe)])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from {checkpoint}" in resumed.stderr
    assert json.loads((run / "manifest.json").read_text())["train"]["steps"] == 6
