"""What a sweep leaves next to its study: the trials table (trials.csv, results.md), Optuna's plots
(optimization history, parameter importances), and the best trial's recipe, ready for `llmtune train`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from llmtune.atomic import write_atomic
from llmtune.sweep.recipe import SweepRecipe

log = logging.getLogger("llmtune.sweep")

BEST_RECIPE = "best-recipe.yaml"


def trial_rows(sweep: SweepRecipe, study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({
            "trial": trial.number,
            "state": trial.state.name.lower(),
            sweep.section.objective.metric: trial.value,
            **{key: trial.params.get(key) for key in sweep.section.space},
            "pruned_at_step": trial.user_attrs.get("pruned_at_step"),
            "train_seconds": trial.user_attrs.get("train_seconds"),
            "run_dir": trial.user_attrs.get("run_dir"),
        })
    return rows


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    return study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


def write_sweep_report(sweep: SweepRecipe, study: optuna.Study) -> dict[str, Any]:
    """Write the table, plots and best recipe into the sweep's folder; returns a summary."""
    import pandas as pd

    out = sweep.section.output_dir
    rows = trial_rows(sweep, study)
    table = pd.DataFrame(rows)
    write_atomic(out / "trials.csv", table.to_csv(index=False))
    best = best_trial(study)
    write_atomic(out / "results.md", _markdown(sweep, rows, best))
    plots = _plots(study, out / "plots")
    if best is not None:
        write_best_recipe(sweep, best)
    return sweep_summary(sweep, study) | {"plots": plots}


def sweep_summary(sweep: SweepRecipe, study: optuna.Study) -> dict[str, Any]:
    """How many trials, and the best one (values, objective, its recipe file) when one completed."""
    best = best_trial(study)
    summary: dict[str, Any] = {"trials": len(study.get_trials(deepcopy=False)), "best": None}
    if best is not None:
        summary["best"] = {"trial": best.number, "value": best.value, "params": best.params,
                           "recipe": str(sweep.section.output_dir / BEST_RECIPE)}
    return summary


def write_best_recipe(sweep: SweepRecipe, best: FrozenTrial) -> Path:
    """The best trial's resolved recipe (absolute paths), training into `best-run` next to the study."""
    out = sweep.section.output_dir
    recipe = sweep.trial_recipe(best.params, out / "best-run")
    objective = sweep.section.objective
    header = (f"# The best trial of the sweep in {out}: trial {best.number}, "
              f"{objective.metric} = {best.value:.6g} ({objective.resolved_direction}d).\n"
              + "".join(f"#   {key}: {value}\n" for key, value in best.params.items())
              + f"# Train it with: llmtune train {out / BEST_RECIPE}\n"
              + f"# In a pipeline recipe: llmtune run PIPELINE {_pipeline_overrides(recipe.method, best.params)}\n")
    text = header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    write_atomic(out / BEST_RECIPE, text)
    return out / BEST_RECIPE


def _pipeline_overrides(method: str, params: dict[str, Any]) -> str:
    """The same values for the pipeline stage that trains this method (`sft`, or `dpo` for preferences)."""
    stage = "sft" if method == "sft" else "dpo"
    return " ".join(f"--set {stage}.{key}={value}" for key, value in params.items())


def _markdown(sweep: SweepRecipe, rows: list[dict[str, Any]], best: FrozenTrial | None) -> str:
    objective = sweep.section.objective
    columns = ["trial", "state", objective.metric, *sweep.section.space, "pruned_at_step", "train_seconds"]
    lines = [f"# Sweep: {sweep.section.strategy}, {objective.resolved_direction} {objective.metric}", ""]
    if best is not None:
        lines += [f"Best: trial {best.number}, {objective.metric} = {best.value:.6g} "
                  f"(recipe: `{BEST_RECIPE}`)", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column)) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(study: optuna.Study, folder: Path) -> dict[str, str]:
    """Optuna's own matplotlib plots; one that cannot be drawn yet (e.g. importances of one trial) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, draw in (("optimization_history", optuna_plots.plot_optimization_history),
                       ("param_importances", optuna_plots.plot_param_importances)):
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = draw(study)
        except (ValueError, RuntimeError) as err:
            log.info("plot %s skipped: %s", name, err)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes[0].figure
        figure.tight_layout()
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written[name] = str(path)
    return written
