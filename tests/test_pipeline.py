"""`llmtune run`: the stages in order, skipped when unchanged, rerun from the first change, resumed after a kill;
checked first with stand-in stages (the orchestration alone), then for real on the tiny pipeline recipe."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from llmtune.config import RecipeError
from llmtune.pipeline import run as pipeline_run
from llmtune.pipeline.recipe import load_pipeline
from llmtune.pipeline.run import Selection, run_pipeline
from llmtune.pipeline.state import OUTPUT_FILES, PipelineState
from tests.helpers import REPO, run_cli

TINY = REPO / "recipes" / "clinical-qa" / "tiny.yaml"


# ------------------------------------------------------------------------------------- orchestration, stand-ins


@pytest.fixture
def fake_stages(monkeypatch):
    """Stages that write their output files and record how they were called, in microseconds."""
    calls: list[tuple[str, bool]] = []

    def fake(stage: str):
        def run(recipe, folder: Path, how):
            calls.append((stage, how.resume))
            folder.mkdir(parents=True, exist_ok=True)
            name = OUTPUT_FILES[stage][0].replace("*", "out")
            (folder / name).write_text(json.dumps({"stage": stage, "call": len(calls)}))  # a new output each run
            return {"rows": 1}
        return run

    monkeypatch.setattr(pipeline_run, "STAGE_RUNNERS", {s: fake(s) for s in pipeline_run.STAGE_RUNNERS})
    return calls


def _outcomes(path: Path, overrides: list[str] | None = None, **selection) -> dict[str, str]:
    outcomes = run_pipeline(load_pipeline(path, overrides), Selection(**selection))
    return {o.stage: o.status for o in outcomes}


@pytest.fixture
def pipeline_copy(tmp_path) -> Path:
    """tiny.yaml next to the real recipe folder's inputs, writing under tmp_path."""
    raw = yaml.safe_load(TINY.read_text())
    raw["pipeline"]["output_dir"] = str(tmp_path / "out")
    path = TINY.parent / f".test-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    yield path
    path.unlink()


def test_unchanged_stages_are_skipped_and_a_change_reruns_from_there(fake_stages, pipeline_copy):
    stages = ["synth", "sft", "prefs", "dpo", "eval", "merge", "publish"]
    assert set(_outcomes(pipeline_copy).values()) == {"done"}
    assert [s for s, _ in fake_stages] == stages
    assert set(_outcomes(pipeline_copy).values()) == {"skipped"}
    assert len(fake_stages) == 7
    changed = _outcomes(pipeline_copy, ["dpo.preference.beta=0.3"])
    assert changed == dict.fromkeys(stages[:3], "skipped") | dict.fromkeys(stages[3:], "done")
    assert set(_outcomes(pipeline_copy, ["dpo.preference.beta=0.3"]).values()) == {"skipped"}


def test_from_only_and_force_select_stages(fake_stages, pipeline_copy):
    _outcomes(pipeline_copy)
    fake_stages.clear()
    assert _outcomes(pipeline_copy, start="eval") == {"synth": "skipped", "sft": "skipped", "prefs": "skipped",
                                                      "dpo": "skipped", "eval": "done", "merge": "done",
                                                      "publish": "done"}
    fake_stages.clear()
    only = _outcomes(pipeline_copy, only="sft")
    assert only["sft"] == "done" and [s for s, _ in fake_stages] == ["sft"]
    # sft has a new output: a plain run now reruns the stages that read it
    fake_stages.clear()
    _outcomes(pipeline_copy)
    assert [s for s, _ in fake_stages] == ["prefs", "dpo", "eval", "merge", "publish"]
    fake_stages.clear()
    _outcomes(pipeline_copy, force=True)
    assert len(fake_stages) == 7


def test_a_killed_stage_resumes_and_a_changed_one_starts_fresh(fake_stages, pipeline_copy, monkeypatch):
    def killed(recipe, folder, how):
        fake_stages.append(("sft", how.resume))
        raise KeyboardInterrupt

    runners = dict(pipeline_run.STAGE_RUNNERS)
    monkeypatch.setitem(pipeline_run.STAGE_RUNNERS, "sft", killed)
    with pytest.raises(KeyboardInterrupt):
        _outcomes(pipeline_copy)
    recorded = PipelineState(load_pipeline(pipeline_copy).output_dir).stages
    assert recorded["synth"]["status"] == "done" and recorded["sft"]["status"] == "running"
    monkeypatch.setitem(pipeline_run.STAGE_RUNNERS, "sft", runners["sft"])
    fake_stages.clear()
    assert _outcomes(pipeline_copy)["synth"] == "skipped"
    assert fake_stages[0] == ("sft", True)  # same fingerprint as when it was killed: resume
    # killed again, then restarted with a different learning rate: no resume
    monkeypatch.setitem(pipeline_run.STAGE_RUNNERS, "sft", killed)
    with pytest.raises(KeyboardInterrupt):
        _outcomes(pipeline_copy, ["sft.train.learning_rate=0.01"])
    monkeypatch.setitem(pipeline_run.STAGE_RUNNERS, "sft", runners["sft"])
    fake_stages.clear()
    _outcomes(pipeline_copy, ["sft.train.learning_rate=0.02"])
    assert fake_stages[0] == ("sft", False)


def test_only_needs_the_stages_before_it(fake_stages, pipeline_copy):
    with pytest.raises(RecipeError, match="stage synth has not finished"):
        _outcomes(pipeline_copy, only="sft")


@pytest.mark.parametrize("override, message", [
    ("sft.output_dir=elsewhere", "sft.output_dir: set by the pipeline"),
    ("prefs.samplez=3", "prefs: unknown key(s) samplez"),
    ("prefs.samples=0", "prefs.samples"),
    ("prefs.contrasts.0.table=nope.csv", "prefs.contrasts[0].table: file not found: nope.csv"),
    ("prefs.contrasts.0.pairs_per_fakt=1", "prefs.contrasts[0].pairs_per_fakt: unknown key; did you mean"),
    ("prefs.contrasts.0.pairs_per_fact=-1", "prefs.contrasts[0].pairs_per_fact"),
    ("sft.train.learnig_rate=1", "sft.train.learnig_rate: unknown key; did you mean `learning_rate`?"),
    ("dpo.preference.bta=1", "dpo.preference.bta: unknown key; did you mean `beta`?"),
    ("eval.tasks.0.path=nope.jsonl", "eval.tasks[0].path: file not found: nope.jsonl"),
    ("synth.methods.0.table=nope.csv", "synth.methods[0].table: file not found: nope.csv"),
    ("merge.run=kto", "merge.run"),
    ("pipeline.accelerate_config=nope.yaml", "pipeline.accelerate_config: file not found"),
])
def test_bad_stage_sections_fail_before_anything_runs(pipeline_copy, override, message, tmp_path):
    with pytest.raises(RecipeError) as err:
        load_pipeline(pipeline_copy, [override])
    assert message in str(err.value) and str(pipeline_copy) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_prefs_without_on_policy_pairs_needs_contrasts(pipeline_copy, tmp_path):
    from llmtune.pipeline import sections

    recipe = load_pipeline(pipeline_copy, ["prefs.on_policy=false"])
    assert [m.kind for m in sections.build_prefs(recipe).methods] == ["fact_contrasts"]  # no policy, no prompts
    raw = yaml.safe_load(pipeline_copy.read_text())
    raw["prefs"].pop("contrasts")
    pipeline_copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert [m["kind"] for m in sections.prefs_raw(load_pipeline(pipeline_copy))["methods"]] == ["preferences"]
    with pytest.raises(RecipeError, match="`on_policy: false` and no `contrasts:`: nothing would make pairs"):
        load_pipeline(pipeline_copy, ["prefs.on_policy=false"])
    assert not (tmp_path / "out").exists()


def test_stage_dependencies_are_checked(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(f"""\
        pipeline: {{output_dir: {tmp_path / 'out'}}}
        model: {{name_or_path: builtin:tiny}}
        dpo: {{}}
        """))
    with pytest.raises(RecipeError, match="dpo: needs an `sft:` stage"):
        load_pipeline(path)
    path.write_text(path.read_text().replace("dpo: {}", "bogus: {}"))
    with pytest.raises(RecipeError, match="unknown section"):
        load_pipeline(path)


# ------------------------------------------------------------------------------------------- the real pipeline


def test_retraining_the_sft_adapter_regenerates_the_on_policy_answers(tmp_path):
    """The prefs journal holds the SFT adapter's own answers: a retrained adapter at the same path must not
    reuse them (it did: the fingerprint named the folder, not its weights)."""
    from llmtune.pipeline import sections
    from llmtune.synth.run import generation_fingerprint

    recipe = load_pipeline(TINY, [f"pipeline.output_dir={tmp_path / 'out'}"])
    (tmp_path / "out" / "synth").mkdir(parents=True)
    (tmp_path / "out" / "synth" / "sft.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "What class is metformin?"}, {"role": "assistant", "content": "A biguanide."}]}))
    sft = tmp_path / "out" / "sft"
    sft.mkdir()
    (sft / "adapter_config.json").write_text("{}")
    (sft / "adapter_model.safetensors").write_bytes(b"first adapter")
    first = generation_fingerprint(sections.build_prefs(recipe))
    (sft / "manifest.json").write_text('{"train_seconds": 12.5}')  # run bookkeeping: answers unchanged
    (sft / "checkpoint-4").mkdir()
    assert generation_fingerprint(sections.build_prefs(recipe)) == first
    (sft / "adapter_model.safetensors").write_bytes(b"retrained adapter")
    assert generation_fingerprint(sections.build_prefs(recipe)) != first


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "out"
    result = run_cli("run", str(TINY), "--set", f"pipeline.output_dir={out}")
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result


def test_tiny_pipeline_runs_every_stage(tiny_pipeline):
    out, result = tiny_pipeline
    state = json.loads((out / "pipeline-state.json").read_text())["stages"]
    assert list(state) == ["synth", "sft", "prefs", "dpo", "eval", "merge", "publish"]
    assert all(s["status"] == "done" and s["digest"] for s in state.values())
    synth = json.loads((out / "synth" / "report.json").read_text())
    assert synth["kept"]["sft"] == state["sft"]["summary"]["rows"] > 0
    assert synth["decontaminated"] == 0
    pairs = [json.loads(line) for line in (out / "prefs" / "preferences.jsonl").read_text().splitlines()]
    assert len(pairs) == state["dpo"]["summary"]["rows"] > 0
    assert {p["method"] for p in pairs} == {"preferences", "fact_contrasts"}
    system = {"role": "system", "content": "You are a clinical reference assistant."}
    assert all(p["prompt"][0] == system for p in pairs)  # contrast pairs ask as the SFT items do
    report = json.loads((out / "eval" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "sft", "dpo"]
    assert set(report["comparisons"]["clinical-mcq"]) == {"sft", "dpo"}
    merged = json.loads((out / "merged" / "llmtune-merge.json").read_text())
    assert merged["source_run"] == str(out / "dpo")
    card = (out / "publish" / "README.md").read_text()
    assert "model-index" in card and "clinical-mcq" in card
    for line in ("synth", "sft", "prefs", "dpo", "eval", "merge", "publish"):
        assert line in result.stdout
    assert "clinical-mcq/dpo" in result.stdout  # the eval deltas in the closing summary


def test_published_folder_loads_with_plain_transformers(tiny_pipeline):
    out, _ = tiny_pipeline
    code = textwrap.dedent(f"""\
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out / 'publish')!r})
        tok = AutoTokenizer.from_pretrained({str(out / 'publish')!r})
        ids = tok.apply_chat_template([{{"role": "user", "content": "What is metformin?"}}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        print(model.generate(**ids, max_new_tokens=4, do_sample=False).shape[-1] > ids["input_ids"].shape[-1])
        """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-3000:]


def test_second_run_skips_every_stage_and_a_new_beta_reruns_from_dpo(tiny_pipeline):
    out, _ = tiny_pipeline
    before = json.loads((out / "pipeline-state.json").read_text())["stages"]
    journals = {m: (out / "eval" / "items" / "clinical-mcq" / f"{m}.jsonl").read_text() for m in ("base", "sft", "dpo")}
    again = run_cli("run", str(TINY), "--set", f"pipeline.output_dir={out}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "pipeline-state.json").read_text())["stages"] == before
    assert again.stdout.count("skipped") == 7
    beta = run_cli("run", str(TINY), "--set", f"pipeline.output_dir={out}", "--set", "dpo.preference.beta=0.5")
    assert beta.returncode == 0, beta.stderr[-3000:]
    after = json.loads((out / "pipeline-state.json").read_text())["stages"]
    for stage in ("synth", "sft", "prefs"):
        assert after[stage] == before[stage], stage
    for stage in ("dpo", "eval", "merge", "publish"):
        assert after[stage]["fingerprint"] != before[stage]["fingerprint"], stage
    assert yaml.safe_load((out / "dpo" / "recipe.yaml").read_text())["preference"]["beta"] == 0.5
    # eval scored only the new DPO adapter: base and SFT items came from its journal
    items = out / "eval" / "items" / "clinical-mcq"
    assert all((items / f"{m}.jsonl").read_text() == journals[m] for m in ("base", "sft"))
    assert (items / "dpo.jsonl").read_text() != journals["dpo"]


def test_dry_run_checks_without_running(tmp_path):
    result = run_cli("run", str(TINY), "--dry-run", "--set", f"pipeline.output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "synth -> sft -> prefs -> dpo -> eval -> merge -> publish" in result.stdout
    assert not (tmp_path / "out").exists()


def test_training_stages_run_under_accelerate_launch_when_configured(tmp_path):
    """With `pipeline.accelerate_config`, sft runs as `accelerate launch -m llmtune train` in 2 processes."""
    raw = yaml.safe_load(TINY.read_text())
    raw["pipeline"] = {"output_dir": str(tmp_path / "out"), "seed": 1,
                       "accelerate_config": "../accelerate/ddp.yaml"}  # 2 processes; gloo on a CPU machine
    raw = {k: v for k, v in raw.items() if k in ("pipeline", "model", "synth", "sft")}
    path = TINY.parent / f".test-launch-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        result = run_cli("run", str(path), env={"OMP_NUM_THREADS": "1"})
    finally:
        path.unlink()
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((tmp_path / "out" / "sft" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    launched = yaml.safe_load((tmp_path / "out" / "sft.recipe.yaml").read_text())
    assert launched["data"]["train"][0]["path"] == str(tmp_path / "out" / "synth" / "sft.jsonl")
