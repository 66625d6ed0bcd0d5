"""`llmtune sweep`: random, TPE and grid searches on Optuna, pruning, resuming a killed sweep, the best recipe."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from llmtune.config import RecipeError
from llmtune.sweep.recipe import load_sweep
from llmtune.sweep.run import run_sweep
from llmtune.sweep.study import STUDY_NAME, storage_url
from tests.helpers import REPO, run_cli, write_recipe

SPACE = {
    "train.learning_rate": {"low": 1e-4, "high": 3e-2, "log": True},
    "adapter.r": {"choices": [8, 16]},
}


def _sweep_recipe(tmp_path: Path, chat_file: Path, **sweep) -> Path:
    settings = {"output_dir": str(tmp_path / "sweep"), "trials": 6, "space": SPACE, "seed": 0, **sweep}
    return write_recipe(
        tmp_path, chat_file,
        data={"train": [{"path": str(chat_file)}], "validation_fraction": 0.25, "max_length": 128},
        train={"epochs": 1, "batch_size": 3, "learning_rate": 1e-3, "lr_scheduler": "constant", "warmup_ratio": 0.0,
               "logging_steps": 2, "eval_steps": 2},
        sweep=settings,
    )


def _study(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{sweep_dir / 'study.db'}")


def _manifest(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "manifest.json").read_text())


@pytest.mark.parametrize("strategy", ["random", "tpe"])
def test_a_six_trial_sweep_writes_the_table_and_a_best_recipe_that_reproduces(tmp_path, chat_file, strategy):
    sweep = load_sweep(_sweep_recipe(tmp_path, chat_file, strategy=strategy, startup_trials=3))
    study = run_sweep(sweep)

    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) == len(study.trials) == 6
    out = sweep.section.output_dir
    table = (out / "trials.csv").read_text().splitlines()
    assert table[0].split(",")[:5] == ["trial", "state", "eval_loss", *sorted(SPACE)] and len(table) == 7
    assert (out / "plots" / "optimization_history.png").stat().st_size > 1000
    assert (out / "plots" / "param_importances.png").stat().st_size > 1000
    # Each trial is an ordinary run folder, whose recipe carries the trial's values.
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        saved = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "recipe.yaml").read_text())
        assert saved["train"]["learning_rate"] == trial.params["train.learning_rate"]
        assert saved["adapter"]["r"] == trial.params["adapter.r"]
        assert _manifest(trial.user_attrs["run_dir"])["validation"]["eval_loss"] == trial.value
    best = study.best_trial
    assert best.value == min(t.value for t in study.get_trials(states=(TrialState.COMPLETE,)))

    assert f"--set sft.adapter.r={best.params['adapter.r']}" in (out / "best-recipe.yaml").read_text()
    # The best recipe trains on its own and reaches the best trial's objective (same seed, same data).
    result = run_cli("train", str(out / "best-recipe.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert _manifest(out / "best-run")["validation"]["eval_loss"] == pytest.approx(best.value, rel=1e-5)


def test_grid_visits_each_point_once_and_stops_at_the_grid_size(tmp_path, chat_file):
    space = {"train.learning_rate": {"choices": [1e-3, 1e-2]}, "adapter.r": {"low": 8, "high": 16, "step": 8}}
    sweep = load_sweep(_sweep_recipe(tmp_path, chat_file, strategy="grid", trials=10, space=space, pruner="none"))
    study = run_sweep(sweep)

    points = sorted(tuple(sorted(t.params.items())) for t in study.trials)
    assert len(points) == 4 and len(set(points)) == 4
    assert {dict(p)["adapter.r"] for p in points} == {8, 16}


def test_a_trial_far_behind_the_others_is_pruned(tmp_path, chat_file):
    good = [{"train.learning_rate": lr, "adapter.r": 8} for lr in (2e-2, 1.5e-2, 2.5e-2)]
    sweep = load_sweep(_sweep_recipe(tmp_path, chat_file, strategy="random", trials=4, startup_trials=3,
                                     initial_trials=[*good, {"train.learning_rate": 1e-9, "adapter.r": 8}]))
    study = run_sweep(sweep)

    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE] * 3 + [TrialState.PRUNED]
    slow = study.trials[3]
    step, value = min(slow.intermediate_values.items())
    at_step = [t.intermediate_values[step] for t in study.trials[:3]]
    assert value > max(at_step), "pruned with a loss no worse than the others'"
    assert slow.user_attrs["pruned_at_step"] == step
    assert "pruned" in (sweep.section.output_dir / "results.md").read_text()


def test_a_killed_sweep_continues_without_repeating_finished_trials(tmp_path, chat_file):
    recipe = _sweep_recipe(tmp_path, chat_file, strategy="random", trials=3, pruner="none")
    # Longer trials with checkpoints, so the kill lands mid-trial and the retry can resume.
    raw = yaml.safe_load(recipe.read_text())
    raw["train"].update({"epochs": 8, "eval_steps": 8, "save_steps": 8})
    recipe.write_text(yaml.safe_dump(raw))
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "llmtune", "sweep", str(recipe)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _has_checkpoint(sweep_dir / "trials" / "trial-0001"), process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = _study(sweep_dir)
    assert [t.state for t in before.trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    finished_at = os.stat(sweep_dir / "trials" / "trial-0000" / "manifest.json").st_mtime_ns

    result = run_cli("sweep", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trial 1 was interrupted; queued again" in result.stderr

    after = _study(sweep_dir)
    states = [t.state for t in after.trials]
    assert states.count(TrialState.COMPLETE) == 3 and states[1] == TrialState.FAIL and len(states) == 4
    retry = next(t for t in after.trials if t.user_attrs.get("retry_of") == 1)
    assert retry.params == after.trials[1].params
    assert retry.user_attrs["run_dir"] == str(sweep_dir / "trials" / "trial-0001")
    assert "resuming from" in result.stderr  # the retry continued from the killed trial's checkpoint
    # The finished trial was not trained again.
    assert os.stat(sweep_dir / "trials" / "trial-0000" / "manifest.json").st_mtime_ns == finished_at


def _has_checkpoint(run_dir: Path) -> bool:
    return any(p.name.startswith("checkpoint-") for p in run_dir.glob("checkpoint-*")) if run_dir.is_dir() else False


def _wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the sweep ended before the condition was met"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_eval_task_can_be_the_objective(tmp_path, chat_file):
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text("\n".join(json.dumps({"question": f"Item {i} is a dose of how many mg?",
                                         "choices": ["0 mg", "1 mg", "2 mg"], "answer": i % 3})
                             for i in range(6)) + "\n")
    objective = {"metric": "acc", "task": {"name": "doses", "kind": "mcq", "path": str(mcq)}}
    sweep = load_sweep(_sweep_recipe(tmp_path, chat_file, strategy="random", trials=2, objective=objective))
    study = run_sweep(sweep)

    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for trial in study.trials:
        report = json.loads((Path(trial.user_attrs["run_dir"]) / "eval" / "report.json").read_text())
        assert trial.value == report["results"]["doses"]["trial"]["metrics"]["acc"]["mean"]
        assert trial.intermediate_values == {}  # scored after training, never pruned on another metric


def test_a_changed_sweep_definition_is_refused_on_reopen(tmp_path, chat_file):
    path = _sweep_recipe(tmp_path, chat_file, strategy="random", trials=1)
    run_sweep(load_sweep(path))
    result = run_cli("sweep", str(path), "--set", "train.batch_size=4")
    assert result.returncode == 2 and "started from a different recipe, space or objective" in result.stderr
    # More trials of the same study is not a change.
    assert len(run_sweep(load_sweep(path, ["sweep.trials=2"])).trials) == 2


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"space": {"train.learnin_rate": {"low": 1e-4, "high": 1e-3}}},
         r"sweep.space.train.learnin_rate: .*did you mean `learning_rate`"),
        ({"space": {"adapter.dropout": {"low": 0.0, "high": 1.5}}}, r"sweep.space.adapter.dropout: the value 1.5"),
        ({"strategy": "grid", "space": {"train.learning_rate": {"low": 1e-4, "high": 1e-3}}},
         "a grid needs choices or a `step` for: train.learning_rate"),
        ({"space": {"adapter.r": {"choices": [8], "low": 1, "high": 2}}}, "either `choices` or a range"),
        ({"initial_trials": [{"adapter.alpha": 8}]}, r"initial_trials\[0\]: adapter.alpha not in `space`"),
    ],
)
def test_bad_sweep_sections_fail_before_any_trial(tmp_path, chat_file, sweep, message):
    path = _sweep_recipe(tmp_path, chat_file, **sweep)
    with pytest.raises(RecipeError, match=message):
        load_sweep(path)
    assert not (tmp_path / "sweep").exists()


def test_training_a_sweep_recipe_trains_its_own_values(tmp_path, chat_file):
    from llmtune.config import load_recipe

    recipe = load_recipe(_sweep_recipe(tmp_path, chat_file))
    assert recipe.train.learning_rate == 1e-3 and recipe.adapter.r == 8
    assert storage_url(load_sweep(_sweep_recipe(tmp_path, chat_file)).section).endswith("sweep/study.db")


@pytest.mark.slow  # starts a Ray instance and two worker processes: ~45 s
def test_ray_workers_run_trials_in_parallel_on_one_study(tmp_path, chat_file):
    pytest.importorskip("ray")
    sweep = load_sweep(_sweep_recipe(tmp_path, chat_file, strategy="random", trials=4, backend="ray", workers=2,
                                     pruner="none"))
    study = run_sweep(sweep)

    finished = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(finished) >= 4
    assert len({t.user_attrs["pid"] for t in finished}) == 2  # two worker processes shared the study
    assert len({tuple(sorted(t.params.items())) for t in finished}) == len(finished)  # no value drawn twice
    assert (sweep.section.output_dir / "best-recipe.yaml").is_file()
    by_start = sorted(finished, key=lambda t: t.datetime_start)  # some trials ran at the same time
    assert any(a.datetime_complete > b.datetime_start for a, b in itertools.pairwise(by_start))


def test_parallel_workers_need_ray(tmp_path, chat_file):
    with pytest.raises(RecipeError, match="set `backend: ray`"):
        load_sweep(_sweep_recipe(tmp_path, chat_file, workers=2))


def test_a_dpo_sweep_searches_the_preference_beta(tmp_path, finished_sft_run):
    raw = yaml.safe_load((REPO / "recipes" / "clinical-qa" / "dpo-tiny.yaml").read_text())
    raw["preference"]["from_run"] = str(finished_sft_run)
    raw["data"]["train"][0]["path"] = str(REPO / "recipes" / "clinical-qa" / "data" / "prefs.jsonl")
    raw["data"].update(validation_fraction=0.25, max_length=128)
    raw["train"].update(max_steps=2, eval_steps=1)
    raw["sweep"] = {"output_dir": str(tmp_path / "sweep"), "strategy": "grid", "trials": 2, "pruner": "none",
                    "space": {"preference.beta": {"choices": [0.05, 0.5]}}}
    path = tmp_path / "dpo-sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    study = run_sweep(load_sweep(path))

    assert sorted(t.params["preference.beta"] for t in study.trials) == [0.05, 0.5]
    for trial in study.trials:
        saved = yaml.safe_load((Path(trial.user_attrs["run_dir"]) / "recipe.yaml").read_text())
        assert saved["method"] == "dpo" and saved["preference"]["beta"] == trial.params["preference.beta"]
        assert trial.value == _manifest(trial.user_attrs["run_dir"])["validation"]["eval_loss"]
