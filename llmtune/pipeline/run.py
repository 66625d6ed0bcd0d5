"""`llmtune run RECIPE`: the stages of a pipeline recipe in order, each skipped when its inputs are unchanged.

Rerun rules: a stage whose fingerprint equals the recorded one (and whose outputs are intact) is skipped; from
the first stage that runs, every later stage runs too. A stage recorded as started with the same fingerprint
(the run was killed) resumes where its own command resumes: training from its newest checkpoint, synthesis
and evaluation from their per-item journals.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.config import RecipeError
from llmtune.pipeline import sections
from llmtune.pipeline.recipe import PipelineRecipe
from llmtune.pipeline.state import UPSTREAM, PipelineState, fingerprint, output_digest

log = logging.getLogger("llmtune.run")


@dataclass
class StageOutcome:
    stage: str
    status: str  # skipped | done | failed
    wall_s: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageRun:
    """How a stage runs: resuming a killed attempt, forced by the user (start from nothing), with what."""

    resume: bool
    forced: bool
    progress: Any = None
    push: bool = False


@dataclass(frozen=True)
class Selection:
    """Which stages to (re)run: all changed ones, or `--from STAGE` on, or `--only STAGE`; `--force`: all."""

    start: str | None = None
    only: str | None = None
    force: bool = False

    def forced(self, stages: list[str], stage: str) -> bool:
        if self.force or self.only == stage:
            return True
        return self.start is not None and stages.index(stage) >= stages.index(self.start)

    def runs(self, stage: str) -> bool:
        return self.only is None or self.only == stage


def run_pipeline(recipe: PipelineRecipe, selection: Selection = Selection(), push: bool = False,
                 progress: Any = None, report: Callable[[list[StageOutcome], str | None], None] = lambda o, s: None,
                 ) -> list[StageOutcome]:
    """Run the recipe's stages; `report(outcomes, running)` is called before and after each stage."""
    stages = recipe.stages
    for name in filter(None, (selection.start, selection.only)):
        if name not in stages:
            raise RecipeError(f"{recipe.path}: no `{name}` stage; this pipeline has {', '.join(stages)}")
    if push and "publish" not in stages:
        raise RecipeError(f"{recipe.path}: --push needs a `publish:` stage")
    if push and not sections.build_publish(recipe).repo_id:
        raise RecipeError(f"{recipe.path}: publish.repo_id: --push needs the Hub repository (ORG/NAME)")
    recipe.output_dir.mkdir(parents=True, exist_ok=True)
    state = PipelineState(recipe.output_dir)
    outcomes: list[StageOutcome] = []
    changed = False  # once a stage runs, every later stage runs
    for stage in stages:
        folder = recipe.out(stage)
        upstream = {s: state.get(s).get("digest") for s in UPSTREAM[stage] if s in stages}
        print_ = fingerprint(stage, sections.stage_section_raw(recipe, stage), recipe.raw["model"], recipe.folder,
                             recipe.output_dir, upstream)
        record = state.get(stage)
        intact = record.get("status") == "done" and output_digest(stage, folder) == record.get("digest")
        if not selection.runs(stage) and not intact:
            raise RecipeError(f"{recipe.path}: --only {selection.only}: stage {stage} has not finished "
                              f"(or its outputs changed); run without --only first")
        forced = selection.forced(stages, stage)
        unchanged = intact and record.get("fingerprint") == print_ and not changed and not forced
        if not selection.runs(stage) or unchanged:
            outcomes.append(StageOutcome(stage, "skipped", record.get("wall_s", 0.0), record.get("summary", {})))
            continue
        resume = record.get("status") == "running" and record.get("fingerprint") == print_ and not forced
        report(outcomes, stage)
        state.set(stage, status="running", fingerprint=print_)
        started = time.perf_counter()
        try:
            summary = STAGE_RUNNERS[stage](recipe, folder, StageRun(resume, forced, progress, push))
        except BaseException:
            outcomes.append(StageOutcome(stage, "failed", time.perf_counter() - started))
            report(outcomes, None)
            raise
        wall = time.perf_counter() - started
        state.set(stage, status="done", fingerprint=print_, digest=output_digest(stage, folder), wall_s=round(wall, 2),
                  summary=summary)
        outcomes.append(StageOutcome(stage, "done", wall, summary))
        changed = True
        report(outcomes, None)
    return outcomes


# ----------------------------------------------------------------------------------------------------- stages


def _synth(recipe: PipelineRecipe, folder: Path, run: StageRun) -> dict[str, Any]:
    return _synthesize(sections.build_synth(recipe), run, "sft")


def _prefs(recipe: PipelineRecipe, folder: Path, run: StageRun) -> dict[str, Any]:
    return _synthesize(sections.build_prefs(recipe), run, "preferences")


def _synthesize(section, run: StageRun, kept: str) -> dict[str, Any]:
    from llmtune.synth.run import generation_fingerprint, recorded_fingerprint, synthesize

    # The synth journal is reused while the generation inputs are the same (a filter change only refilters).
    changed = recorded_fingerprint(section.output_dir) not in (None, generation_fingerprint(section))
    result = synthesize(section, overwrite=changed or run.forced, progress=run.progress)
    return {"rows": result["kept"][kept], "removed": sum(result["removed_by_filter"].values()),
            "rejects": result["rejects"],
            "decontaminated": result["decontaminated"], "items_per_s": result["items_per_s"]}


def _train(stage: str) -> Callable[..., dict[str, Any]]:
    def train(recipe: PipelineRecipe, folder: Path, run: StageRun) -> dict[str, Any]:
        import json

        resume = run.resume
        train_recipe = sections.build_train(recipe, stage)
        if recipe.accelerate_config is not None:
            _launch(recipe, stage, train_recipe, resume)
        else:
            if train_recipe.method == "sft":
                from llmtune.train import sft as method
            else:
                from llmtune.train import preference as method
            if method.main(train_recipe, overwrite=not resume, resume="auto") is None:
                raise KeyboardInterrupt(f"{stage}: stopped by a signal; a checkpoint was saved: run again to resume")
        manifest = json.loads((folder / "manifest.json").read_text())
        trained = manifest.get("train", {})
        return {"rows": manifest.get("data", {}).get("train", {}).get("rows"), "steps": trained.get("steps"),
                "final_loss": trained.get("final_loss"), "tokens_per_s": trained.get("tokens_per_second")}

    return train


def _launch(recipe: PipelineRecipe, stage: str, train_recipe, resume: bool) -> None:
    """The stage as `accelerate launch ... -m llmtune train STAGE-RECIPE`: every process trains, this one waits."""
    import subprocess
    import sys

    from llmtune.atomic import write_atomic
    from llmtune.config import recipe_to_yaml

    stage_recipe = recipe.output_dir / f"{stage}.recipe.yaml"  # paths in it are absolute
    write_atomic(stage_recipe, recipe_to_yaml(train_recipe))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipe.accelerate_config),
               "-m", "llmtune", "train", str(stage_recipe), *([] if resume else ["--overwrite"])]
    log.info("%s: %s", stage, " ".join(command))
    code = subprocess.run(command).returncode
    if code != 0:
        raise RecipeError(f"{stage}: `accelerate launch` exited with status {code} (its output is above); "
                          f"run again to resume from the newest checkpoint")
    if not (recipe.out(stage) / "manifest.json").is_file():
        raise KeyboardInterrupt(f"{stage}: stopped by a signal; a checkpoint was saved: run again to resume")


def _eval(recipe: PipelineRecipe, folder: Path, run: StageRun) -> dict[str, Any]:
    from llmtune.eval.run import evaluate

    section = sections.build_eval(recipe)
    if run.forced and folder.exists():
        shutil.rmtree(folder)  # forced: every item scored again; else the journal keeps what is still valid
    started = time.perf_counter()
    report = evaluate(section, progress=run.progress)
    scored = sum(len(models) * task["items"] for task, models in
                 ((t, report["results"][t["name"]]) for t in report["tasks"]))
    deltas = {}
    for task in report["tasks"]:
        metric = task["primary_metric"]
        for model, comparisons in report["comparisons"][task["name"]].items():
            for c in comparisons:
                if c["metric"] == metric:
                    deltas[f"{task['name']}/{model}"] = {
                        "metric": metric, "baseline": report["results"][task["name"]][report["baseline"]]["metrics"][
                            metric]["mean"],
                        "value": report["results"][task["name"]][model]["metrics"][metric]["mean"],
                        "difference": c["difference"], "p_value": c["p_value"]}
    return {"rows": scored, "items_per_s": round(scored / max(time.perf_counter() - started, 1e-9), 2),
            "deltas": deltas}


def _merge(recipe: PipelineRecipe, folder: Path, run: StageRun) -> dict[str, Any]:
    import json

    from llmtune.merge import MERGE_MANIFEST, merge_run

    source = sections.merged_stage(recipe)
    merge_run(recipe.out(source), folder, atol=sections.build_merge(recipe).atol)
    merged = json.loads((folder / MERGE_MANIFEST).read_text())
    return {"run": source, "max_logit_difference": merged.get("max_logit_difference")}


def _publish(recipe: PipelineRecipe, folder: Path, run: StageRun) -> dict[str, Any]:
    from llmtune.publish import build_publish_folder, push_folder

    settings = sections.build_publish(recipe)
    trained = sections.merged_stage(recipe)
    source = recipe.out("merge") if settings.source == "merged" else recipe.out(trained)
    report = recipe.out("eval") / "report.json"
    evaluated = report.is_file() and "eval" in recipe.stages
    build_publish_folder(source, folder, settings.license, settings.repo_id, report if evaluated else None,
                         trained if evaluated else None)
    summary: dict[str, Any] = {"source": settings.source, "run": trained}
    if run.push:
        summary["pushed"] = push_folder(folder, settings.repo_id or "", settings.private)
    return summary


STAGE_RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "synth": _synth, "sft": _train("sft"), "prefs": _prefs, "dpo": _train("dpo"), "eval": _eval, "merge": _merge,
    "publish": _publish,
}
