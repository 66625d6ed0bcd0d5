"""The Optuna study behind a sweep: stored in `output_dir/study.db` (SQLite), so a killed sweep resumes and
several terminals can work on one study; samplers, pruner, and the recovery of interrupted trials.

Interrupted trials are found by process id rather than Optuna's heartbeat: a heartbeat only declares a trial
dead after a grace period, so a sweep restarted right after a kill would leave it hanging. A trial whose
process is gone (same host) is marked failed and queued again with the same values and the same run folder,
where training resumes from its newest checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from llmtune.errors import LlmtuneError
from llmtune.sweep.recipe import SweepRecipe, SweepSection

log = logging.getLogger("llmtune.sweep")

STUDY_NAME = "llmtune-sweep"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SweepChangedError(LlmtuneError, ValueError):
    pass


def storage_url(section: SweepSection) -> str:
    return section.storage or f"sqlite:///{section.output_dir / 'study.db'}"


def open_study(sweep: SweepRecipe, worker: int = 0) -> optuna.Study:
    """Create the study, or reopen it when its definition (base recipe, space, objective) is unchanged.
    `worker` tells parallel workers' samplers apart (they would otherwise draw the same values)."""
    section = sweep.section
    section.output_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # llmtune logs each trial itself
    study = optuna.create_study(
        study_name=STUDY_NAME, storage=storage_url(section), load_if_exists=True,
        direction=section.objective.resolved_direction,
        sampler=make_sampler(section, 0), pruner=make_pruner(section),
    )
    saved = study.user_attrs.get("fingerprint")
    if saved is None:
        study.set_user_attr("fingerprint", sweep.fingerprint)
        for values in section.initial_trials:
            study.enqueue_trial(values)
    elif saved != sweep.fingerprint:
        raise SweepChangedError(
            f"{section.output_dir}: this study was started from a different recipe, space or objective; "
            "choose another sweep.output_dir, or pass --overwrite to start it again"
        )
    # Re-seed with the study's size, so a resumed sweep does not draw the values it drew before.
    study.sampler = make_sampler(section, len(study.trials) + 100_003 * worker)
    return study


def make_sampler(section: SweepSection, offset: int) -> optuna.samplers.BaseSampler:
    seed = section.seed + offset
    if section.strategy == "grid":
        return optuna.samplers.GridSampler(section.grid_space(), seed=seed)
    if section.strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=section.startup_trials)


def make_pruner(section: SweepSection) -> optuna.pruners.BasePruner:
    if section.pruner == "none" or section.objective.trainer_metric is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=section.startup_trials, n_warmup_steps=section.warmup_steps)


def planned_trials(section: SweepSection) -> int:
    if section.strategy != "grid":
        return section.trials
    size = 1
    for values in section.grid_space().values():
        size *= len(values)
    return min(section.trials, size)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def mark_running(trial: optuna.Trial) -> None:
    """Who runs the trial, so a later sweep can tell a live trial from one whose process was killed."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Fail the trials whose process died (this host) and queue each again once; returns their numbers."""
    host = socket.gethostname()
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    requeued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.FAIL)):
        attrs = trial.user_attrs
        if trial.state == TrialState.RUNNING:
            if attrs.get("host") != host or _alive(attrs.get("pid")):
                continue  # another terminal's (or another machine's) live trial
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        elif not attrs.get("interrupted"):
            continue  # a trial that failed on its own is not run again
        if trial.number in retried:
            continue
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, "run_dir": attrs.get("run_dir")})
        requeued.append(trial.number)
    return requeued


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
