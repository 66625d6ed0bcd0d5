"""A pipeline recipe: one file whose sections are the stages of `llmtune run`.

    pipeline: {output_dir: runs/clinical-qa/tiny, seed: 42}
    model:   {name_or_path: builtin:tiny}          # the base every stage shares
    synth:   a `synth:` section (llmtune synth)    # output_dir defaults to OUT/synth
    sft:     a train recipe without method/model/output_dir; data.train defaults to the synth output
    prefs:   on-policy preference pairs: the SFT adapter samples answers to the synthesized prompts,
             judged against their reference answers (llmtune synth's `preferences` method)
    dpo:     a train recipe (method dpo|orpo|kto) continuing from the SFT run, on the prefs output
    eval:    an `eval:` section; models default to base + every trained stage
    merge:   {run: dpo}                             # which adapter to merge (default: the last trained)
    publish: {license: ..., repo_id: ...}           # a dry-run folder unless `llmtune run --push`

Each stage section becomes exactly the section its own command reads, so a stage here is that command.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llmtune.config import ModelSection, Recipe, RecipeError, Section, read_raw_recipe, validate_section

STAGES = ("synth", "sft", "prefs", "dpo", "eval", "merge", "publish")
Stage = Literal["synth", "sft", "prefs", "dpo", "eval", "merge", "publish"]


class PipelineSection(Section):
    output_dir: Path  # every stage writes into a subfolder named after it (relative to the working directory)
    seed: int = 42
    # An accelerate config (relative to this file): the training stages then run under `accelerate launch`
    # with it (DDP, FSDP, DeepSpeed), each as `llmtune train` on the stage's recipe; the other stages stay here.
    accelerate_config: Path | None = None
    # The accelerator memory the recipe is sized for; `--dry-run` compares the estimate with it.
    gpu_memory_gb: float | None = Field(None, gt=0)


class MergeStage(Section):
    run: Literal["sft", "dpo"] | None = None  # default: the last trained stage
    atol: float = Field(1e-3, gt=0)


class PublishStage(Section):
    source: Literal["merged", "adapter"] = "merged"
    license: str = "other"
    repo_id: str | None = None  # needed by `llmtune run --push`
    private: bool = False


@dataclass(frozen=True)
class PipelineRecipe:
    """The raw sections (after `--set`), validated up front; stage sections are derived from them on demand."""

    path: Path
    raw: dict[str, Any]
    pipeline: PipelineSection
    model: ModelSection

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def output_dir(self) -> Path:
        return self.pipeline.output_dir.resolve()

    @property
    def accelerate_config(self) -> Path | None:
        config = self.pipeline.accelerate_config
        return None if config is None else (self.folder / config).resolve()

    @property
    def stages(self) -> list[str]:
        return [name for name in STAGES if name in self.raw]

    def out(self, stage: str) -> Path:
        return self.output_dir / ("merged" if stage == "merge" else stage)

    def trained(self) -> list[str]:
        return [name for name in ("sft", "dpo") if name in self.raw]


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineRecipe:
    """Read and check a pipeline recipe: every stage section is validated now, before hours of work."""
    path = Path(path)
    raw = read_raw_recipe(path, overrides)
    if "pipeline" not in raw:
        raise RecipeError(f"{path}: no `pipeline:` section (see recipes/clinical-qa/tiny.yaml)")
    unknown = [key for key in raw if key not in (*STAGES, "pipeline", "model")]
    if unknown:
        raise RecipeError(f"{path}: unknown section(s) {', '.join(unknown)}; a pipeline has pipeline, model and "
                          f"stages {', '.join(STAGES)}")
    if "model" not in raw:
        raise RecipeError(f"{path}: no `model:` section: the base model every stage shares")
    recipe = PipelineRecipe(path, raw, validate_section(PipelineSection, raw["pipeline"], path, "pipeline."),
                            validate_section(ModelSection, raw["model"], path, "model."))
    _check_dependencies(recipe)
    if recipe.accelerate_config is not None and not recipe.accelerate_config.is_file():
        raise RecipeError(f"{path}: pipeline.accelerate_config: file not found: {recipe.pipeline.accelerate_config} "
                          f"(looked in {recipe.accelerate_config})")
    from llmtune.pipeline import sections

    for stage in recipe.stages:
        sections.check(recipe, stage)
    return recipe


def _check_dependencies(recipe: PipelineRecipe) -> None:
    raw, have = recipe.raw, set(recipe.stages)

    def needs(stage: str, what: str, ok: bool) -> None:
        if stage in have and not ok:
            raise RecipeError(f"{recipe.path}: {stage}: {what}")

    def given(stage: str, *keys: str) -> bool:
        node: Any = raw.get(stage) or {}
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return bool(node)

    needs("sft", "no training data: add a `synth:` stage or `sft.data.train`", "synth" in have or given("sft", "data",
                                                                                                      "train"))
    needs("prefs", "needs an `sft:` stage (its adapter is the policy) or `prefs.policy`",
          "sft" in have or given("prefs", "policy"))
    needs("prefs", "no prompts: add a `synth:` stage or `prefs.prompts`", "synth" in have or given("prefs", "prompts"))
    needs("dpo", "needs an `sft:` stage to continue from", "sft" in have)
    needs("dpo", "no preference data: add a `prefs:` stage or `dpo.data.train`",
          "prefs" in have or given("dpo", "data", "train"))
    needs("merge", "needs a trained stage (sft or dpo)", bool(recipe.trained()))
    merge_run = given("merge", "run") and raw["merge"]["run"]
    if merge_run and merge_run not in have:
        raise RecipeError(f"{recipe.path}: merge.run: {merge_run} is not a trained stage of this pipeline "
                          f"({', '.join(recipe.trained()) or 'none'})")
    needs("publish", "needs a trained stage (sft or dpo)", bool(recipe.trained()))


def stage_raw(recipe: PipelineRecipe, stage: str) -> dict[str, Any]:
    """A copy of the stage's section as written (an empty section is `{}`)."""
    section = recipe.raw.get(stage)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise RecipeError(f"{recipe.path}: {stage}: a stage section is a mapping of keys")
    return copy.deepcopy(section)


def train_recipe_raw(recipe: PipelineRecipe, stage: str, data_default: Path, from_run: Path | None) -> dict[str, Any]:
    """The standalone train recipe of the sft or dpo stage."""
    raw = stage_raw(recipe, stage)
    for key in ("output_dir", "model"):
        if key in raw:
            raise RecipeError(f"{recipe.path}: {stage}.{key}: set by the pipeline (pipeline.output_dir, model:)")
    data = raw.setdefault("data", {})
    if not isinstance(data, dict):
        raise RecipeError(f"{recipe.path}: {stage}.data: a mapping of keys")
    data.setdefault("train", [{"path": str(data_default)}])
    raw.update(method=raw.get("method", "sft" if stage == "sft" else "dpo"), output_dir=str(recipe.out(stage)),
               seed=raw.get("seed", recipe.pipeline.seed))
    if stage == "sft":
        raw["model"] = copy.deepcopy(recipe.raw["model"])
        if raw["method"] != "sft":
            raise RecipeError(f"{recipe.path}: sft.method: the sft stage trains with method sft")
    else:
        if raw["method"] not in ("dpo", "orpo", "kto"):
            raise RecipeError(f"{recipe.path}: dpo.method: one of dpo, orpo, kto")
        preference = raw.setdefault("preference", {})
        if "from_run" in preference:
            raise RecipeError(f"{recipe.path}: dpo.preference.from_run: the pipeline continues from its sft stage")
        preference["from_run"] = str(from_run)
    return raw


def validate_train(recipe: PipelineRecipe, stage: str, raw: dict[str, Any]) -> Recipe:
    """Schema and rules only (upstream outputs may not exist yet); errors are named `stage.…`."""
    check = copy.deepcopy(raw)
    if stage == "dpo":
        check["model"] = copy.deepcopy(recipe.raw["model"])
        check["preference"] = {k: v for k, v in check["preference"].items() if k != "from_run"}
        check.setdefault("adapter", {})  # the adapter comes from the sft run
    return validate_section(Recipe, check, recipe.path, prefix=f"{stage}.")
