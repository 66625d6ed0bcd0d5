"""Recipes: every shipped recipe validates; bad recipes fail with one clear message and write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmtune.config import RecipeError, load_recipe
from tests.helpers import REPO, run_cli, write_recipe

SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


def shipped_kind(path: Path) -> str:
    """accelerate config, synthesis recipe, fact templates (data for synthesis), eval data (phrase rules) or
    training recipe."""
    raw = yaml.safe_load(path.read_text())
    if "accelerate" in path.parts:
        return "accelerate"
    if "eval" in path.parent.parts and "data" in path.parent.parts:
        return "eval_rules"
    if "pipeline" in raw:
        return "pipeline"
    if "synth" in raw:
        return "synth"
    if "eval" in raw:
        return "eval"
    if "entity" in raw and "attributes" in raw:
        return "fact_templates"
    return "train"


RECIPES = [p for p in SHIPPED if shipped_kind(p) == "train"]


def _needs_a_finished_run(path: Path) -> bool:
    return "from_run" in path.read_text()


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(path, request):
    overrides = []
    if _needs_a_finished_run(path):  # a DPO recipe continues from an SFT run: point it at a real one
        overrides.append(f"preference.from_run={request.getfixturevalue('finished_sft_run')}")
    recipe = load_recipe(path, overrides)
    assert recipe.data.train, path
    assert all(Path(s.path).is_file() for s in recipe.data.train if s.is_local)


def test_shipped_recipes_name_their_launch_command():
    for path in RECIPES:
        header = path.read_text().splitlines()[:6]
        command = "sweep" if "sweep" in yaml.safe_load(path.read_text()) else "train"
        assert any(f"llmtune {command} {path.relative_to(REPO)}" in line for line in header), path


def test_shipped_sweeps_validate():
    from llmtune.sweep.recipe import load_sweep

    sweeps = [p for p in RECIPES if "sweep" in yaml.safe_load(p.read_text())]
    assert sweeps
    for path in sweeps:
        assert load_sweep(path).section.space, path


def test_accelerate_configs_parse():
    configs = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"single-gpu", "ddp", "fsdp", "deepspeed-zero3"}
    for config in configs:
        assert "distributed_type" in yaml.safe_load(config.read_text()), config


def _error(tmp_path, chat_file, **sections) -> str:
    path = write_recipe(tmp_path, chat_file, **sections)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    return str(caught.value)


def test_typo_key_suggests_the_right_one(tmp_path, chat_file):
    message = _error(tmp_path, chat_file, train={"learnig_rate": 1e-4})
    assert "train.learnig_rate: unknown key; did you mean `learning_rate`?" in message
    assert str(tmp_path / "recipe.yaml") in message


def test_typo_in_a_list_item_is_located(tmp_path, chat_file):
    message = _error(tmp_path, chat_file, data={"train": [{"path": str(chat_file), "formt": "alpaca"}]})
    assert "data.train.0.formt: unknown key; did you mean `format`?" in message


def test_wrong_type_and_bad_choice(tmp_path, chat_file):
    assert "train.batch_size" in _error(tmp_path, chat_file, train={"batch_size": "four"})
    message = _error(tmp_path, chat_file, adapter={"kind": "lorax"})
    assert "adapter.kind" in message and "'lora'" in message


def test_missing_data_file_is_named(tmp_path, chat_file):
    message = _error(tmp_path, chat_file, data={"train": [{"path": "nope.jsonl"}]})
    assert "data.train[0].path: file not found: nope.jsonl" in message


@pytest.mark.parametrize(
    ("sections", "expected"),
    [
        ({"quantization": {"load_in": "4bit"}, "adapter": None}, "4bit base cannot be trained directly"),
        ({"data": {"packing": True, "max_length": None}}, "`packing: true` needs `max_length`"),
        ({"data": {"validation_fraction": 0.1, "validation": [{"path": "x.jsonl"}]}}, "not both"),
        ({"train": {"eval_steps": 5}}, "`train.eval_steps` needs validation data"),
        ({"method": "kto", "train": {"group_by_length": True}}, "`train.group_by_length` cannot be used with"),
    ],
)
def test_conflicting_options_give_one_message(tmp_path, chat_file, sections, expected):
    data = sections.get("data")
    if data and "train" not in data:
        sections["data"] = {"train": [{"path": str(chat_file)}], "max_length": 128, **data}
    assert expected in _error(tmp_path, chat_file, **sections)


def test_secrets_are_refused(tmp_path, chat_file):
    assert "secrets never go in a recipe" in _error(tmp_path, chat_file, model={"name_or_path": "x", "hub_token": "a"})
    leaked = "hf_" + "A" * 34
    assert "looks like a token" in _error(tmp_path, chat_file, model={"name_or_path": leaked})


def test_set_overrides_nested_values(tmp_path, chat_file):
    path = write_recipe(tmp_path, chat_file)
    recipe = load_recipe(path, ["train.learning_rate=1e-4", "adapter.target_modules=[q_proj, v_proj]"])
    assert recipe.train.learning_rate == 1e-4
    assert recipe.adapter.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(RecipeError, match="did you mean `learning_rate`"):
        load_recipe(path, ["train.learning_rat=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.learning_rate"])


def test_validate_prints_the_resolved_recipe(tmp_path, chat_file):
    result = run_cli("validate", str(write_recipe(tmp_path, chat_file)), "--set", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["epochs"] == 3
    assert resolved["train"]["lr_scheduler"] == "cosine"  # defaults filled in
    assert resolved["data"]["train"][0]["path"] == str(chat_file)


@pytest.mark.parametrize(
    "sections",
    [
        {"train": {"learnig_rate": 1e-4}},
        {"train": {"batch_size": "four"}},
        {"data": {"train": [{"path": "missing.jsonl"}]}},
        {"quantization": {"load_in": "4bit"}, "adapter": None},
    ],
    ids=["typo", "type", "missing-file", "conflict"],
)
def test_bad_recipe_exits_nonzero_without_an_output_folder(tmp_path, chat_file, sections):
    path = write_recipe(tmp_path, chat_file, **sections)
    result = run_cli("train", str(path))
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


SYNTH_RECIPES = [p for p in SHIPPED if shipped_kind(p) == "synth"]


@pytest.mark.parametrize("path", SYNTH_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_synth_recipe_validates_and_names_its_command(path):
    from llmtune.synth.recipe import load_synth_recipe

    section = load_synth_recipe(path)
    assert section.methods and section.decontaminate.eval_sets
    header = path.read_text().splitlines()[:4]
    assert any(f"llmtune synth {path.relative_to(REPO)}" in line for line in header), path


EVAL_RECIPES = [p for p in SHIPPED if shipped_kind(p) == "eval"]
RULES_FILES = [p for p in SHIPPED if shipped_kind(p) == "eval_rules"]


@pytest.mark.parametrize("path", RULES_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_behaviour_rules_load(path):
    from llmtune.eval.rules import load_behaviour_rules

    assert all(load_behaviour_rules(path).values()), path


@pytest.mark.parametrize("path", EVAL_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_eval_recipe_validates_and_names_its_command(path, finished_sft_run):
    from llmtune.eval.recipe import load_eval_recipe

    runs = [i for i, m in enumerate(yaml.safe_load(path.read_text())["eval"]["models"]) if "runs/" in m["path"]]
    section = load_eval_recipe(path, [f"eval.models.{i}.path={finished_sft_run}" for i in runs])
    assert all(Path(t.path).is_file() for t in section.tasks)
    header = path.read_text().splitlines()[:4]
    assert any(f"llmtune eval {path.relative_to(REPO)}" in line for line in header), path


PIPELINE_RECIPES = [p for p in SHIPPED if shipped_kind(p) == "pipeline"]


@pytest.mark.parametrize("path", PIPELINE_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_pipeline_passes_the_offline_dry_run(path):
    """Schema, paths, accelerate config and a memory estimate that fits, with no network and no GPU."""
    from llmtune.pipeline.dryrun import dry_run
    from llmtune.pipeline.recipe import load_pipeline

    recipe = load_pipeline(path)
    lines = dry_run(recipe)
    header = path.read_text().splitlines()[:8]
    assert any(f"llmtune run {path.relative_to(REPO)}" in line for line in header), path
    if recipe.pipeline.gpu_memory_gb is not None:  # the GPU recipes: every training stage estimated, and fits
        estimated = [line for line in lines if "GB per process" in line]
        assert len(estimated) == len(recipe.trained()) and all("fits" in line for line in estimated), lines
    if recipe.accelerate_config is not None:
        assert any("accelerate launch --config_file" in line for line in lines)


def test_dry_run_refuses_a_recipe_that_cannot_fit():
    from llmtune.pipeline.dryrun import dry_run
    from llmtune.pipeline.recipe import load_pipeline

    path = REPO / "recipes" / "clinical-qa" / "gpu" / "llama3.1-8b-qlora.yaml"
    with pytest.raises(RecipeError, match=r"sft: estimated \d+\.\d GB per process does not fit"):
        dry_run(load_pipeline(path, ["sft.quantization=null", "sft.train.gradient_checkpointing=false"]))


@pytest.mark.parametrize("name, params", [("meta-llama/Llama-3.1-8B-Instruct", 8_030_261_248),
                                          ("Qwen/Qwen2.5-7B-Instruct", 7_615_616_512),
                                          ("mistralai/Mistral-7B-Instruct-v0.3", 7_248_023_552)])
def test_memory_estimate_builds_the_published_architectures(name, params):
    """The meta-device build of each known config has exactly the parameter count its model card states, and
    LoRA r=16 on every linear layer of Llama-3.1-8B has the 41,943,040 parameters peft reports."""
    from llmtune.memory import architecture_config, estimate, model_shape

    shape = model_shape(architecture_config(name), lora_r=16)
    assert shape.total_params == params
    if name.startswith("meta-llama"):
        assert shape.lora_params == 41_943_040
    qlora = estimate(shape, dtype="bfloat16", load_in="4bit", batch_size=1, max_length=512,
                     gradient_checkpointing=True)
    full = estimate(shape, dtype="bfloat16", load_in=None, batch_size=1, max_length=512, gradient_checkpointing=True)
    assert 0.25 < qlora.weights_gb / full.weights_gb < 0.45  # 4-bit layers, 16-bit embeddings and head
