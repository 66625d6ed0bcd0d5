"""`llmtune eval`: MCQ log-likelihood scoring against a plain reference, a trained adapter beating its base
with a paired test that says so (and identical models that tie), generative metrics, the report, resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from llmtune.data.loading import DataError
from llmtune.eval.items import McqItem, read_mcq
from llmtune.eval.recipe import EvalSection, load_eval_recipe
from llmtune.eval.report import EvalReport
from llmtune.eval.run import evaluate
from tests.helpers import REPO, run_cli, write_recipe

# Options of the same length (3 characters, 3 tokens for the tiny model's tokenizer): only the content decides.
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "llmtune" / "eval" / "report.schema.json"
RIGHT = "yes"
WRONG = ["dog", "sky", "nix"]


def mcq_rows(count: int, seed: int = 0) -> list[dict]:
    """Questions whose right option is always RIGHT (an adapter can learn that; a random model cannot know it)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        choices = [RIGHT, *WRONG]
        rng.shuffle(choices)
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) for _ in range(4))
        rows.append({"id": f"q{i}", "category": "odd" if i % 2 else "even", "question": f"Question {i}: {words}?",
                     "choices": choices, "answer": choices.index(RIGHT)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def mcq_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("mcq") / "mcq.jsonl", mcq_rows(40))


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model_dir, mcq_file) -> Path:
    """A tiny LoRA trained to answer RIGHT to such questions (other questions than the eval's)."""
    folder = tmp_path_factory.mktemp("prefer-right")
    train = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": RIGHT}]}
             for r in mcq_rows(48, seed=1)]
    data = write_jsonl(folder / "train.jsonl", train)
    recipe = write_recipe(folder, data, train={"epochs": 10, "batch_size": 8, "learning_rate": 2e-2,
                                               "logging_steps": 2, "warmup_ratio": 0.0})
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def test_mcq_log_likelihoods_match_a_per_option_reference(tiny_model_dir, mcq_file):
    from llmtune.eval.mcq import build_options, option_logprobs
    from llmtune.inference.loading import load_for_inference

    loaded = load_for_inference(str(tiny_model_dir))
    items = [*read_mcq(mcq_file)[:6], McqItem("long", "x", "A longer question with more words in it?",
                                               ("short", "a much longer option with many more tokens in it"), 1)]
    for style, layout in (("chat", "cloze"), ("plain", "cloze"), ("chat", "letters")):
        options = [o for item in items for o in build_options(loaded, item, style, "Be brief.", layout)]
        batched = option_logprobs(loaded, options, rows_per_pass=9)  # batches cut across items
        for option, score in zip(options, batched, strict=True):
            ids = torch.tensor([option.context + option.continuation])
            with torch.no_grad():
                logprobs = torch.log_softmax(loaded.model(ids).logits.float(), dim=-1)[0]
            start = len(option.context)
            reference = sum(logprobs[start + i - 1, token].item() for i, token in enumerate(option.continuation))
            assert score == pytest.approx(reference, abs=1e-5)


def test_trained_adapter_beats_the_base_and_identical_models_tie(tmp_path, tiny_model_dir, mcq_file, adapter_run):
    section = EvalSection(
        output_dir=tmp_path / "eval",
        models=[{"name": "base", "path": str(tiny_model_dir)}, {"name": "base-again", "path": str(tiny_model_dir)},
                {"name": "tuned", "path": str(adapter_run)}],
        tasks=[{"name": "prefer-right", "kind": "mcq", "path": mcq_file}],
        batch_size=8,
    )
    report = evaluate(section)
    EvalReport.model_validate(report)
    results = report["results"]["prefer-right"]
    assert results["tuned"]["metrics"]["acc"]["mean"] >= 0.9
    assert results["base"]["metrics"]["acc"]["mean"] <= 0.6
    tuned = {c["metric"]: c for c in report["comparisons"]["prefer-right"]["tuned"]}
    assert tuned["acc"]["test"] == "mcnemar_exact" and tuned["acc"]["p_value"] < 0.001
    assert tuned["acc"]["difference"] > 0.3 and tuned["acc"]["low"] > 0
    same = {c["metric"]: c for c in report["comparisons"]["prefer-right"]["base-again"]}
    assert same["acc"]["difference"] == 0 and same["acc"]["p_value"] == 1.0
    assert same["acc"]["only_candidate_right"] == same["acc"]["only_baseline_right"] == 0
    # CIs bracket the mean; per-category counts add up
    acc = results["base"]["metrics"]["acc"]
    assert acc["low"] <= acc["mean"] <= acc["high"]
    assert results["tuned"]["category_items"] == {"even": 20, "odd": 20}
    # the tuned run's loss curve comes from its manifest
    assert next(m for m in report["models"] if m["name"] == "tuned")["loss_curve"]
    out = tmp_path / "eval"
    assert json.loads((out / "report.json").read_text()) == report
    _validate_against_schema(report)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list((out / "plots").glob("*.png"))) >= 3
    assert "| prefer-right | tuned | acc |" in (out / "report.md").read_text()
    per_item = [json.loads(line) for line in (out / "items" / "prefer-right" / "tuned.jsonl").read_text().splitlines()]
    assert [r["id"] for r in per_item] and len(per_item) == 40 and all(len(r["logprobs"]) == 4 for r in per_item)


def test_evaluation_resumes_per_item_and_skips_finished_work(tmp_path, tiny_model_dir, mcq_file, monkeypatch):
    section = EvalSection(output_dir=tmp_path / "eval", models=[{"name": "base", "path": str(tiny_model_dir)}],
                          tasks=[{"name": "t", "kind": "mcq", "path": mcq_file}], batch_size=4)
    first = evaluate(section)
    journal = tmp_path / "eval" / "items" / "t" / "base.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join(lines[:15]) + lines[15][:10])  # killed mid-write after 15 items
    scored = []
    import llmtune.eval.mcq as mcq

    original = mcq.score_mcq
    monkeypatch.setattr(mcq, "score_mcq", lambda loaded, items, *a, **k: scored.extend(items) or original(
        loaded, items, *a, **k))
    second = evaluate(section)
    kept = {json.loads(line)["id"] for line in lines[:15]}
    assert len(scored) == 25 and {item.id for item in scored} == {r["id"] for r in map(json.loads, lines)} - kept
    assert second["results"] == first["results"]

    import llmtune.eval.run as run

    monkeypatch.setattr(run, "_load", lambda model: pytest.fail("a finished evaluation loaded the model again"))
    assert evaluate(section)["results"] == first["results"]


def test_generative_scores_and_report(tmp_path, tiny_model_dir):
    from llmtune.eval.generative import exact_match, normalize_answer, rouge_l, token_f1

    assert normalize_answer("The  Paris!") == "paris"
    assert exact_match("the Paris.", "paris") == 1.0 and exact_match("Lyon", "Paris") == 0.0
    assert token_f1("blood pressure control", "control of blood pressure") == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert rouge_l("a b c d", "a b c d") == 1.0 and rouge_l("x y", "a b") == 0.0
    rows = [{"id": "g1", "question": "Say hello", "answer": ["hello", "hi"]},
            {"id": "g2", "messages": [{"role": "user", "content": "Name a colour"},
                                      {"role": "assistant", "content": "blue"}], "answer": "blue"}]
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    section = EvalSection(output_dir=tmp_path / "eval", models=[{"name": "base", "path": str(tiny_model_dir)}],
                          tasks=[{"name": "gen", "kind": "generative", "path": data, "max_new_tokens": 6}])
    report = evaluate(section)
    result = report["results"]["gen"]["base"]
    assert set(result["metrics"]) == {"exact_match", "f1", "rouge_l"} and result["items"] == 2
    items = [json.loads(x) for x in (tmp_path / "eval" / "items" / "gen" / "base.jsonl").read_text().splitlines()]
    assert all(isinstance(r["prediction"], str) for r in items)


def test_stats_known_values():
    from llmtune.eval.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap

    # 10 items only the candidate gets right, 0 the other way: exact two-sided p = 2 * 0.5**10
    test = mcnemar_exact([0.0] * 10 + [1.0] * 5, [1.0] * 15)
    assert test["p_value"] == pytest.approx(2 * 0.5**10) and test["only_candidate_right"] == 10
    assert mcnemar_exact([1, 0, 1], [1, 0, 1])["p_value"] == 1.0
    ci = bootstrap_ci([0, 1] * 50, 2000, 0.95, seed=0)
    assert ci.mean == 0.5 and 0.39 < ci.low < 0.45 and 0.55 < ci.high < 0.61
    same = paired_bootstrap([0.2, 0.4, 0.9], [0.2, 0.4, 0.9], 500, 0.95, seed=0)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    better = paired_bootstrap([0.1] * 30, [0.6] * 30, 500, 0.95, seed=0)
    assert better["difference"] == pytest.approx(0.5) and better["p_value"] == 0.0


def test_bad_eval_input_names_file_and_row(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok?", "choices": ["a", "b"], "answer": 0},
                                               {"question": "x?", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: `answer` must be a choice index 0..1"):
        read_mcq(bad)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({"eval": {"output_dir": str(tmp_path / "out"),
                                               "models": [{"name": "a", "path": "builtin:tiny"}],
                                               "tasks": [{"name": "t", "kind": "mcq", "path": "missing.jsonl"}]}}))
    result = run_cli("eval", str(recipe))
    assert result.returncode == 2 and "eval.tasks[0].path: file not found: missing.jsonl" in result.stderr
    recipe.write_text(yaml.safe_dump({"eval": {"output_dir": "x", "models": [{"name": "a", "path": "builtin:tiny"}],
                                               "tasks": [{"name": "t", "kind": "mcqq", "path": "bad.jsonl"}]}}))
    with pytest.raises(Exception, match=r"eval.tasks.0.kind"):
        load_eval_recipe(recipe)


def test_exported_task_scores_the_same_under_lm_eval(tmp_path, tiny_model_dir, adapter_run):
    """lm-eval itself, on our exported task, gives the same per-item log-likelihoods and right/wrong as
    `llmtune eval`, for the base (pretrained=) and a trained run (peft=), plain and chat prompts, options scored
    as text (cloze) or as letters after a listed A-D (MMLU's format)."""
    pytest.importorskip("lm_eval")
    from llmtune.eval.harness import export_tasks, harness_task_name, run_harness

    rng = random.Random(7)
    rows = [{**row, "answer": rng.randrange(4)} for row in mcq_rows(16, seed=3)]  # right answers vary
    data = write_jsonl(tmp_path / "varied.jsonl", rows)
    for style, choices_format in (("plain", "cloze"), ("chat", "cloze"), ("plain", "letters"), ("chat", "letters")):
        section = EvalSection(output_dir=tmp_path / f"{style}-{choices_format}",
                              models=[{"name": "base", "path": str(tiny_model_dir)},
                                      {"name": "tuned", "path": str(adapter_run)}],
                              tasks=[{"name": f"varied-{style}-{choices_format}", "kind": "mcq", "path": data,
                                      "prompt": style, "choices_format": choices_format}])
        report = evaluate(section)
        task = section.tasks[0]
        export_tasks([task], tmp_path / "export")
        harness = run_harness(section, [harness_task_name(task)], include_path=tmp_path / "export",
                              log_samples=True, apply_chat_template=style == "chat")
        for model in ("base", "tuned"):
            ours = [json.loads(x) for x in (section.output_dir / "items" / task.name / f"{model}.jsonl")
                    .read_text().splitlines()]
            theirs = {str(s["doc"]["id"]): s for s in harness[model]["samples"][harness_task_name(task)]}
            assert len(theirs) == len(ours) == 16
            for item in ours:
                sample = theirs[item["id"]]
                assert item["acc"] == sample["acc"] and item["acc_norm"] == sample["acc_norm"], (style, model)
                assert item["logprobs"] == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-4)
            ours_acc = report["results"][task.name][model]["metrics"]["acc"]["mean"]
            assert harness[model]["results"][harness_task_name(task)]["acc,none"] == pytest.approx(ours_acc)


def test_eval_command_with_flags_export_and_harness(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval")
    data = write_jsonl(tmp_path / "quiz.jsonl", mcq_rows(6, seed=9))
    export = tmp_path / "export"
    result = run_cli("eval", "--model", "base=builtin:tiny", "--task", f"mcq:{data}", "--export-harness", str(export))
    assert result.returncode == 0, result.stderr[-2000:]
    spec = yaml.safe_load((export / "llmtune_quiz.yaml").read_text())
    assert spec["output_type"] == "multiple_choice" and spec["doc_to_choice"] == "choices"
    out = tmp_path / "out"
    result = run_cli("eval", "--model", "base=builtin:tiny", "--task", f"mcq:{data}", "-o", str(out),
                     "--harness", "llmtune_quiz", "--harness-include", str(export))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "quiz" in result.stdout and "acc" in result.stdout
    report = json.loads((out / "report.json").read_text())
    EvalReport.model_validate(report)
    assert report["harness"]["base"]["llmtune_quiz"]["acc,none"] == report["results"]["quiz"]["base"]["metrics"][
        "acc"]["mean"]
    assert "## lm-evaluation-harness" in (out / "report.md").read_text()
    result = run_cli("eval", "--model", "base", "--task", f"mcq:{data}", "-o", str(out))
    assert result.returncode != 0 and "expected NAME=PATH" in result.stderr


def test_judge_tasks_grade_answers_through_a_teacher_endpoint(tmp_path, tiny_model_dir, adapter_run):
    from tests.teacher_server import TeacherServer

    rows = [{"id": f"s{i}", "category": "refer" if i % 2 else "decline", "prompt": f"Request number {i}, please.",
             "expected": "refer" if i % 2 else "decline"} for i in range(8)]
    data = write_jsonl(tmp_path / "safety.jsonl", rows)
    server = TeacherServer(faults=lambda key, attempt: "malformed" if key == "s3#judge" else None)
    url = server.start()
    try:
        section = EvalSection(
            output_dir=tmp_path / "eval",
            models=[{"name": "base", "path": str(tiny_model_dir)}, {"name": "tuned", "path": str(adapter_run)}],
            tasks=[{"name": "safety", "kind": "judge", "path": data, "judge_prompt": "judge_safety",
                    "max_new_tokens": 8}],
            judge={"base_url": url, "model": "judge", "max_retries": 0},
        )
        report = evaluate(section)
    finally:
        server.stop()
    EvalReport.model_validate(report)
    assert set(report["results"]["safety"]["tuned"]["metrics"]) == {"judge_score", "judge_pass"}
    tests = {c["metric"]: c["test"] for c in report["comparisons"]["safety"]["tuned"]}
    assert tests == {"judge_score": "paired_bootstrap", "judge_pass": "mcnemar_exact"}
    for model in ("base", "tuned"):
        items = {json.loads(x)["id"]: json.loads(x) for x in
                 (tmp_path / "eval" / "items" / "safety" / f"{model}.jsonl").read_text().splitlines()}
        assert len(items) == 8
        assert items["s3"]["judge_error"].startswith("malformed teacher response") and items["s3"]["judge_score"] == 0
        others = [r for key, r in items.items() if key != "s3"]
        assert all(r["judge_reply"].startswith("Score: ") and 0 <= r["judge_score"] <= 1 for r in others)
        assert all(r["judge_pass"] == float(r["judge_score"] >= 0.5) for r in items.values())
    # the rubric saw the request, the model's answer and the expected behaviour
    assert {key.split("#")[1] for key in server.attempts} == {"judge"}
    seen = server.prompts["s1#judge"]
    assert "Request: Request number 1, please." in seen and 'expected behaviour is: refer' in seen
    assert f"Assistant's answer: {items['s1']['prediction']}" in seen

def test_a_local_judge_that_is_the_evaluated_base_reuses_the_loaded_model(tmp_path, adapter_run, monkeypatch):
    import llmtune.inference.loading as loading

    rows = [{"id": f"s{i}", "category": "refer", "prompt": f"Request number {i}, please.", "expected": "refer"}
            for i in range(4)]
    data = write_jsonl(tmp_path / "safety.jsonl", rows)
    loads: list[str] = []
    load = loading.load_for_inference

    def counted(target: str, *args, **kwargs):
        loads.append(target)
        return load(target, *args, **kwargs)

    monkeypatch.setattr(loading, "load_for_inference", counted)

    def judged(folder: str) -> dict[str, list[str | None]]:
        section = EvalSection(
            output_dir=tmp_path / folder,
            models=[{"name": "base", "path": "builtin:tiny"}, {"name": "tuned", "path": str(adapter_run)}],
            tasks=[{"name": "safety", "kind": "judge", "path": data, "judge_prompt": "judge_safety",
                    "max_new_tokens": 6}],
            judge={"kind": "local", "path": "builtin:tiny", "max_tokens": 6})
        evaluate(section)
        return {model: [json.loads(x)["judge_reply"] for x in
                        (tmp_path / folder / "items" / "safety" / f"{model}.jsonl").read_text().splitlines()]
                for model in ("base", "tuned")}

    reused = judged("reused")
    assert loads == ["builtin:tiny", str(adapter_run)]  # the judge came from the models already in memory
    monkeypatch.setattr(loading, "serves_base_of", lambda loaded, target: False)
    loads.clear()
    separate = judged("separate")
    assert loads == ["builtin:tiny", "builtin:tiny", str(adapter_run), "builtin:tiny"]
    # with the tuned model's adapter switched off, its base judges exactly as a judge loaded on its own
    assert reused == separate and all(reply is not None for replies in reused.values() for reply in replies)



DEMO_SAFETY_RULES = REPO / "recipes" / "clinical-qa" / "data" / "eval" / "safety-rules.yaml"


@pytest.mark.parametrize(("answer", "shown"), [
    ("Call 999 (911 or 112) now and ask someone near you to get help quickly.", ["emergency", "refer"]),
    ("I can't prescribe a dose for you; please talk to your GP about your pain.", ["refer", "decline"]),
    ("Please don't double your warfarin dose: it can cause serious bleeding.", ["decline"]),
    ("Sertraline is classed as a selective serotonin reuptake inhibitor.", []),
    ("A good mood is essential: the emergence of GPS maps helped doctoral students.", []),  # words, not substrings
])
def test_the_demo_safety_rules_read_behaviours_off_phrases(answer, shown):
    from llmtune.eval.rules import behaviours_shown, load_behaviour_rules

    assert behaviours_shown(answer, load_behaviour_rules(DEMO_SAFETY_RULES)) == shown


def test_rules_tasks_pass_answers_that_show_the_expected_behaviour(tmp_path, tiny_model_dir, adapter_run):
    from llmtune.eval.run import task_fingerprint

    rules = tmp_path / "rules.yaml"
    rules.write_text("answered: ['^']\nnever: ['\\bzqzqzq\\b']\n")  # '^' matches any answer, even an empty one
    rows = [{"id": f"s{i}", "category": "c", "prompt": f"Request number {i}, please.",
             "expected": "never" if i % 3 == 0 else "answered"} for i in range(9)]
    data = write_jsonl(tmp_path / "safety.jsonl", rows)
    task = {"name": "safety", "kind": "rules", "path": data, "rules": rules, "max_new_tokens": 6}
    section = EvalSection(output_dir=tmp_path / "eval", tasks=[task],
                          models=[{"name": "base", "path": str(tiny_model_dir)},
                                  {"name": "tuned", "path": str(adapter_run)}])
    report = evaluate(section)
    EvalReport.model_validate(report)
    assert report["tasks"][0]["kind"] == "rules" and report["tasks"][0]["primary_metric"] == "rule_pass"
    assert report["results"]["safety"]["tuned"]["metrics"]["rule_pass"]["mean"] == pytest.approx(6 / 9)
    assert [c["test"] for c in report["comparisons"]["safety"]["tuned"]] == ["mcnemar_exact"]
    for model in ("base", "tuned"):
        journal = tmp_path / "eval" / "items" / "safety" / f"{model}.jsonl"
        items = [json.loads(line) for line in journal.read_text().splitlines()]
        assert [r["rule_pass"] for r in items] == [0.0 if i % 3 == 0 else 1.0 for i in range(9)]
        assert all(r["behaviours"] == ["answered"] and r["expected"] == row["expected"]
                   for r, row in zip(items, rows, strict=True))
    # new phrases regrade: the task's fingerprint covers the rules file
    before = task_fingerprint(section.tasks[0])
    rules.write_text("answered: ['^']\nnever: ['^']\n")
    assert task_fingerprint(section.tasks[0]) != before


def test_bad_rules_input_is_named_before_any_model_loads(tmp_path):
    from pydantic import ValidationError

    from llmtune.config import RecipeError

    rules = tmp_path / "rules.yaml"
    rules.write_text("refer: ['\\bGP\\b']\n")
    data = write_jsonl(tmp_path / "safety.jsonl", [{"id": "a", "prompt": "Hi", "expected": "refer"},
                                                    {"id": "b", "prompt": "Hello", "expected": "emergency"}])

    def section(**task) -> EvalSection:
        return EvalSection(output_dir=tmp_path / "eval", models=[{"name": "base", "path": "no/such/model"}],
                           tasks=[{"name": "safety", "kind": "rules", "path": data, **task}])

    with pytest.raises(RecipeError, match=r"safety.jsonl: item b: `expected` must be one of refer .*not 'emergency'"):
        evaluate(section(rules=rules))
    rules.write_text("refer: ['(GP']\n")
    with pytest.raises(RecipeError, match=r"rules.yaml: refer: bad regular expression '\(GP'"):
        evaluate(section(rules=rules))
    rules.write_text("refer: GP\n")
    with pytest.raises(RecipeError, match=r"rules.yaml: refer: a non-empty list of phrases"):
        evaluate(section(rules=rules))
    with pytest.raises(ValidationError, match="goes with `kind: rules`"):
        section()
    assert not (tmp_path / "eval").exists()  # nothing half-written


def test_report_html_renders_its_plots_in_headless_chromium(tmp_path, tiny_model_dir):
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (CI installs Debian's chromium package)")
    rng = random.Random(1)
    data = write_jsonl(tmp_path / "varied.jsonl", [{**r, "answer": rng.randrange(4)} for r in mcq_rows(24)])
    section = EvalSection(output_dir=tmp_path / "eval", models=[{"name": "base", "path": str(tiny_model_dir)}],
                          tasks=[{"name": "t", "kind": "mcq", "path": data}], batch_size=8)
    report = evaluate(section)
    assert report["results"]["t"]["base"]["metrics"]["acc"]["mean"] > 0.1  # a bar to see
    page, shot = tmp_path / "eval" / "report.html", tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    bar = torch.tensor([0x4C, 0x72, 0xB0]) / 255  # the bars' colour in the accuracy plot
    near = (torch.from_numpy(pixels.copy()) - bar).abs().max(dim=-1).values < 0.03
    assert near.sum() > 2000  # the plot's bars are on screen, not a broken image icon


def _validate_against_schema(report: dict) -> None:
    """report.json against the published schema file, with an independent validator (jsonschema)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.validate(report, schema)
    broken = {k: v for k, v in report.items() if k != "comparisons"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_published_report_schema_is_current():
    assert json.loads(SCHEMA_FILE.read_text()) == EvalReport.model_json_schema()
