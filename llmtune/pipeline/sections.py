"""Each stage's section of a pipeline recipe turned into the section its own command reads.

`build_*` runs when the stage is about to start (upstream outputs exist by then) and resolves every path;
`check` runs before anything starts and validates schemas, rules and the user's own input files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmtune.config import Recipe, RecipeError, recipe_from_mapping, validate_section
from llmtune.eval.recipe import EvalSection, resolve_eval_paths
from llmtune.pipeline.recipe import (
    MergeStage,
    PipelineRecipe,
    PublishStage,
    stage_raw,
    train_recipe_raw,
    validate_train,
)
from llmtune.synth.recipe import SynthSection, resolve_synth_paths

# What the prefs stage asks of the SFT policy unless `prefs.policy` says otherwise: varied, short answers.
PREFS_POLICY = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 64}
PREFS_METHOD_KEYS = ("max_prompts", "samples", "judge", "judge_prompt", "min_margin", "chosen")


def synth_raw(recipe: PipelineRecipe) -> dict[str, Any]:
    raw = stage_raw(recipe, "synth")
    _refuse_output_dir(recipe, "synth", raw)
    raw.update(output_dir=str(recipe.out("synth")), seed=raw.get("seed", recipe.pipeline.seed))
    return raw


def build_synth(recipe: PipelineRecipe) -> SynthSection:
    section = validate_section(SynthSection, synth_raw(recipe), recipe.path, "synth.")
    return resolve_synth_paths(section, recipe.folder, recipe.path)


def prefs_raw(recipe: PipelineRecipe) -> dict[str, Any]:
    """A synth section with a `preferences` method (the SFT adapter answers, the reference answers judge; off with
    `on_policy: false`) and a `fact_contrasts` method per entry of `contrasts:` (pairs rendered from fact tables)."""
    raw = stage_raw(recipe, "prefs")
    _refuse_output_dir(recipe, "prefs", raw)
    method: dict[str, Any] = {"kind": "preferences"}
    for key in PREFS_METHOD_KEYS:
        if key in raw:
            method[key] = raw.pop(key)
    method["prompts"] = str(raw.pop("prompts", None) or recipe.out("synth") / "sft.jsonl")
    on_policy = raw.pop("on_policy", True)
    contrasts = raw.pop("contrasts", [])
    if not isinstance(contrasts, list) or not all(isinstance(c, dict) for c in contrasts):
        raise RecipeError(f"{recipe.path}: prefs.contrasts: a list of fact tables "
                          "({table, templates, pairs_per_fact, reverse_pairs_per_fact})")
    policy = raw.pop("policy", None) or {}
    if not isinstance(policy, dict):
        raise RecipeError(f"{recipe.path}: prefs.policy: a teacher section (kind, path, temperature, ...)")
    if policy.get("kind", "local") == "local" and "path" not in policy:  # the sft stage's adapter, on-policy
        policy = {"kind": "local", "path": str(recipe.out("sft")), **PREFS_POLICY, **policy}
    synth = stage_raw(recipe, "synth")
    section = {
        "output_dir": str(recipe.out("prefs")),
        "seed": raw.pop("seed", recipe.pipeline.seed),
        "methods": ([{**method, "policy": policy}] if on_policy else [])
        + [{"kind": "fact_contrasts", **contrast} for contrast in contrasts],
        "system_prompt": synth.get("system_prompt"),  # contrast pairs ask as the SFT items did
        # Short reference answers ("metformin") are fine here; the synth stage's eval sets stay out of pairs too.
        "filters": raw.pop("filters", {"min_response_words": 1}),
        "decontaminate": raw.pop("decontaminate", synth.get("decontaminate", {})),
    }
    if not section["methods"]:
        raise RecipeError(f"{recipe.path}: prefs: `on_policy: false` and no `contrasts:`: nothing would make pairs")
    if raw:
        keys = ", ".join(sorted(raw))
        raise RecipeError(f"{recipe.path}: prefs: unknown key(s) {keys}; prefs takes prompts, policy, filters, "
                          f"decontaminate, seed, on_policy, contrasts and {', '.join(PREFS_METHOD_KEYS)}")
    return section


def build_prefs(recipe: PipelineRecipe) -> SynthSection:
    section = _validate_prefs(recipe, prefs_raw(recipe))
    return resolve_synth_paths(section, recipe.folder, recipe.path)


def _validate_prefs(recipe: PipelineRecipe, raw: dict[str, Any]) -> SynthSection:
    try:
        return validate_section(SynthSection, raw, recipe.path, "prefs.")
    except RecipeError as err:  # name the keys as the user wrote them, not as the derived synth section has them
        message = str(err)
        first_contrast = int(raw["methods"][0]["kind"] == "preferences")  # contrasts follow the on-policy method
        for index in range(first_contrast, len(raw["methods"])):
            written = f"prefs.contrasts[{index - first_contrast}]."
            for derived in (f"prefs.methods.{index}.fact_contrasts.", f"prefs.methods.{index}."):
                message = message.replace(derived, written)
        for derived in ("prefs.methods.0.preferences.", "prefs.methods.0.", "prefs.preferences."):
            message = message.replace(derived, "prefs.")
        raise RecipeError(message) from None


def sft_raw(recipe: PipelineRecipe) -> dict[str, Any]:
    return train_recipe_raw(recipe, "sft", recipe.out("synth") / "sft.jsonl", None)


def dpo_raw(recipe: PipelineRecipe) -> dict[str, Any]:
    return train_recipe_raw(recipe, "dpo", recipe.out("prefs") / "preferences.jsonl", recipe.out("sft"))


def build_train(recipe: PipelineRecipe, stage: str) -> Recipe:
    """The train recipe, loaded exactly as `llmtune train` loads a file (dpo inherits the sft run's base)."""
    raw = sft_raw(recipe) if stage == "sft" else dpo_raw(recipe)
    return recipe_from_mapping(raw, recipe.path, f"{stage}.")


def eval_raw(recipe: PipelineRecipe) -> dict[str, Any]:
    raw = stage_raw(recipe, "eval")
    _refuse_output_dir(recipe, "eval", raw)
    raw["output_dir"] = str(recipe.out("eval"))
    if "models" not in raw:  # base vs every trained stage
        raw["models"] = [{"name": "base", "path": recipe.model.name_or_path},
                         *({"name": stage, "path": str(recipe.out(stage))} for stage in recipe.trained())]
        raw.setdefault("baseline", "base")
    raw.setdefault("seed", recipe.pipeline.seed)
    return raw


def build_eval(recipe: PipelineRecipe) -> EvalSection:
    section = validate_section(EvalSection, eval_raw(recipe), recipe.path, "eval.")
    return resolve_eval_paths(section, recipe.folder, str(recipe.path))


def build_merge(recipe: PipelineRecipe) -> MergeStage:
    return validate_section(MergeStage, stage_raw(recipe, "merge"), recipe.path, "merge.")


def build_publish(recipe: PipelineRecipe) -> PublishStage:
    settings = validate_section(PublishStage, stage_raw(recipe, "publish"), recipe.path, "publish.")
    if settings.source == "merged" and "merge" not in recipe.stages:
        raise RecipeError(f"{recipe.path}: publish.source: merged needs a `merge:` stage (or `source: adapter`)")
    return settings


def merged_stage(recipe: PipelineRecipe) -> str:
    """The trained stage that merge merges and publish publishes: `merge.run`, else the last trained stage."""
    chosen = build_merge(recipe).run if "merge" in recipe.stages else None
    return chosen or recipe.trained()[-1]


def stage_section_raw(recipe: PipelineRecipe, stage: str) -> dict[str, Any]:
    """What a stage's fingerprint is made of: its section as derived (upstream paths included)."""
    return {"synth": synth_raw, "prefs": prefs_raw, "sft": sft_raw, "dpo": dpo_raw, "eval": eval_raw}.get(
        stage, lambda r: stage_raw(r, stage))(recipe)


def check(recipe: PipelineRecipe, stage: str) -> None:
    """Validate a stage before any stage runs; paths the pipeline itself produces are not checked here."""
    if stage == "synth":
        build_synth(recipe)
    elif stage == "prefs":
        raw = prefs_raw(recipe)
        _validate_prefs(recipe, raw)
        if "prompts" in stage_raw(recipe, "prefs"):
            _must_exist(recipe, "prefs.prompts", Path(raw["methods"][0]["prompts"]))
        contrasts = [m for m in raw["methods"] if m["kind"] == "fact_contrasts"]
        for index, contrast in enumerate(contrasts):
            for key in ("table", "templates"):
                _must_exist(recipe, f"prefs.contrasts[{index}].{key}", Path(contrast[key]))
    elif stage in ("sft", "dpo"):
        raw = sft_raw(recipe) if stage == "sft" else dpo_raw(recipe)
        validate_train(recipe, stage, raw)
        for index, source in enumerate(stage_raw(recipe, stage).get("data", {}).get("train", [])):
            if isinstance(source, dict) and Path(str(source.get("path", ""))).suffix:
                _must_exist(recipe, f"{stage}.data.train[{index}].path", Path(source["path"]))
    elif stage == "eval":
        raw = eval_raw(recipe)
        section = validate_section(EvalSection, raw, recipe.path, "eval.")
        produced = {str(recipe.out(s)) for s in recipe.trained()}
        user_models = [m for m in section.models if m.path not in produced]
        # task files always; model paths only where the user gave them (the first model stands in otherwise)
        models = user_models or section.models[:1]
        resolve_eval_paths(section.model_copy(update={"models": models}), recipe.folder, str(recipe.path))
    elif stage == "merge":
        build_merge(recipe)
    elif stage == "publish":
        build_publish(recipe)


def _must_exist(recipe: PipelineRecipe, key: str, path: Path) -> None:
    resolved = (recipe.folder / path).resolve()
    if not resolved.exists():
        raise RecipeError(f"{recipe.path}: {key}: file not found: {path} (looked in {resolved})")


def _refuse_output_dir(recipe: PipelineRecipe, stage: str, raw: dict[str, Any]) -> None:
    if "output_dir" in raw:
        raise RecipeError(f"{recipe.path}: {stage}.output_dir: set by the pipeline (pipeline.output_dir/{stage})")


