"""`llmtune synth`: fact templates, teacher methods against a loopback server with injected faults, resume after
kill -9, filters and decontamination, and a local (in-process) teacher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import yaml

from llmtune.config import RecipeError
from llmtune.synth.methods.facts import read_table
from llmtune.synth.recipe import load_synth_recipe
from llmtune.synth.run import SynthError, synthesize
from tests.helpers import REPO, run_cli
from tests.teacher_server import TeacherServer

GUIDE = """# Blood pressure guide

Hypertension is usually diagnosed after repeated clinic readings are confirmed with ambulatory or home
monitoring. Lifestyle change comes first for every patient: less salt, regular activity, weight loss and
limited alcohol.

When drug treatment is needed, an ACE inhibitor or an angiotensin receptor blocker is a common first step
for younger adults, while a calcium channel blocker is often preferred for older adults and people of
African or Caribbean family origin.

Blood pressure targets are usually below 140/90 in the clinic for adults under 80. Treatment is reviewed
every few months until the target is reached, then at least once a year.
"""

SEEDS = [
    "Explain to a patient why metformin is taken with food.",
    "List three red-flag symptoms of a headache that need urgent review.",
    "Describe how to use a salbutamol inhaler with a spacer.",
    "Summarise why warfarin needs regular INR monitoring.",
    "Explain what an HbA1c test measures.",
]

EVAL = [
    {"id": "ev-1", "question": "A 62-year-old woman with newly confirmed hypertension and no other conditions asks "
     "which medicine is usually started first for someone of her age and background; what do you advise?",
     "choices": ["a", "b", "c", "d"], "answer": 0},
    {"id": "ev-2", "question": "Which vitamin deficiency causes scurvy in sailors on long voyages without fresh fruit?",
     "choices": ["a", "b", "c", "d"], "answer": 1},
]


def domain(tmp_path: Path) -> Path:
    folder = tmp_path / "domain"
    (folder / "docs").mkdir(parents=True)
    (folder / "docs" / "guide.md").write_text(GUIDE)
    (folder / "seeds.jsonl").write_text(
        "".join(json.dumps({"id": f"s{i}", "instruction": t, "output": "An answer."}) + "\n"
                for i, t in enumerate(SEEDS))
    )
    (folder / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in EVAL))
    (folder / "drugs.csv").write_text(
        "id,drug,drug_class,indication\n"
        "metformin,metformin,biguanide,type 2 diabetes\n"
        "lisinopril,lisinopril,ACE inhibitor,hypertension\n"
        "amlodipine,amlodipine,calcium channel blocker,angina\n"
        "atorvastatin,atorvastatin,statin,high cholesterol\n"
        "sertraline,sertraline,SSRI,depression\n"
    )
    (folder / "templates.yaml").write_text(yaml.safe_dump({
        "entity": "drug",
        "attributes": {
            "drug_class": {"questions": ["What class is {{ drug }} in?",
                                         "{{ drug | sentence }} belongs to which class?",
                                         "Name the drug class of {{ drug }}."],
                           "answers": ["{{ drug | sentence }} is a {{ drug_class }}.",
                                       "It is a {{ drug_class }}."],
                           "multiple_choice": "Which class does {{ drug }} belong to?"},
            "indication": {"questions": ["What is {{ drug }} used for?"],
                           "answers": ["{{ drug | sentence }} treats {{ indication }}."]},
        },
    }))
    return folder


def write_recipe(tmp_path: Path, methods: list[dict], teacher: dict | None = None, name: str = "synth.yaml",
                 output: str = "out", **extra) -> Path:
    folder = domain(tmp_path) if not (tmp_path / "domain").exists() else tmp_path / "domain"
    section = {"output_dir": str(tmp_path / output), "seed": 3, "methods": methods,
               "decontaminate": {"eval_sets": ["eval.jsonl"]}, **extra}
    if teacher is not None:
        section["teacher"] = teacher
    path = folder / name
    path.write_text(yaml.safe_dump({"synth": section}))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


FACTS = {"kind": "fact_templates", "table": "drugs.csv", "templates": "templates.yaml", "questions_per_fact": 2,
         "multiple_choice_per_fact": 1}


# ------------------------------------------------------------------------------------------------ fact templates


def test_fact_templates_are_deterministic_per_seed(tmp_path):
    recipe = write_recipe(tmp_path, [FACTS])
    first = synthesize(load_synth_recipe(recipe))
    rows = read_jsonl(tmp_path / "out" / "sft.jsonl")
    again = synthesize(load_synth_recipe(recipe, ["synth.output_dir=" + str(tmp_path / "again")]))
    other = synthesize(load_synth_recipe(recipe, ["synth.output_dir=" + str(tmp_path / "other"), "synth.seed=4"]))
    assert rows == read_jsonl(tmp_path / "again" / "sft.jsonl")
    assert [r["messages"] for r in rows] != [r["messages"] for r in read_jsonl(tmp_path / "other" / "sft.jsonl")]
    assert first["kept"] == again["kept"] == other["kept"]
    # 5 drugs x (2 class questions + 1 class MCQ + 2 indication questions); no MCQ for indication
    assert first["generated"] == {"fact_templates": 25}
    mcq = [r for r in rows if r["id"].endswith(":mcq0")]
    assert len(mcq) == 5
    for row in mcq:
        prov = row["provenance"]
        assert len(prov["choices"]) == 4 and len(set(prov["choices"])) == 4
        answer = row["messages"][-1]["content"]
        assert answer.startswith(f"{prov['answer']}. ")
        drug = row["id"].split(":")[2]
        assert prov["choices"]["ABCD".index(prov["answer"])] in answer
        assert drug in row["messages"][0]["content"]
    # two question variants of one fact use two different phrasings
    qa = {r["id"]: r["messages"][0]["content"] for r in rows}
    assert qa["fact_templates:drugs:metformin:drug_class:qa0"] != qa["fact_templates:drugs:metformin:drug_class:qa1"]
    assert all(r["provenance"]["table_sha256"] and r["provenance"]["fact"] for r in rows)


def test_fact_templates_reverse_questions_ask_for_the_entity(tmp_path):
    recipe = write_recipe(tmp_path, [{**FACTS, "reverse_per_fact": 2}], filters={"min_response_words": 1})
    templates = yaml.safe_load((tmp_path / "domain" / "templates.yaml").read_text())
    templates["attributes"]["indication"]["reverse"] = {
        "questions": ["Which drug treats {{ indication }}?", "Name a medicine for {{ indication }}."],
        "answers": ["{{ drug }}"]}
    (tmp_path / "domain" / "templates.yaml").write_text(yaml.safe_dump(templates))
    report = synthesize(load_synth_recipe(recipe))
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "sft.jsonl")}
    assert report["generated"] == {"fact_templates": 25 + 5 * 2}  # drug_class has no reverse phrasings
    reverse = [rows[f"fact_templates:drugs:lisinopril:indication:rev{k}"] for k in range(2)]
    assert {r["messages"][0]["content"] for r in reverse} == {"Which drug treats hypertension?",
                                                              "Name a medicine for hypertension."}
    assert all(r["messages"][1]["content"] == "lisinopril" for r in reverse)
    assert all(r["provenance"]["direction"] == "reverse" for r in reverse)


def test_fact_contrasts_pair_each_fact_with_another_entitys_value(tmp_path):
    templates = yaml.safe_load((domain(tmp_path) / "templates.yaml").read_text())
    templates["attributes"]["indication"]["reverse"] = {"questions": ["Which drug treats {{ indication }}?"],
                                                        "answers": ["{{ drug | sentence }} does."]}
    templates["attributes"]["drug_class"]["answers"].append("Ask a pharmacist.")  # names no class: no pair
    (tmp_path / "domain" / "templates.yaml").write_text(yaml.safe_dump(templates))
    contrasts = {"kind": "fact_contrasts", "table": "drugs.csv", "templates": "templates.yaml",
                 "pairs_per_fact": 3, "reverse_pairs_per_fact": 1}
    recipe = write_recipe(tmp_path, [contrasts], system_prompt="You are terse.")
    report = synthesize(load_synth_recipe(recipe))
    table = dict(read_table(tmp_path / "domain" / "drugs.csv"))
    pairs = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert report["kept"] == {"sft": 0, "preferences": len(pairs), "sft_by_method": {}}
    assert len(pairs) + len(rejects) == 5 * 2 * 3 + 5 * 1  # forward pairs for both attributes, reverse for one
    assert rejects and all("does not name drug_class" in r["reason"] for r in rejects)
    for pair in pairs:
        row_id, attribute = pair["provenance"]["fact"].split(".")
        row, other = table[row_id], table[pair["provenance"]["rejected_from"]]
        chosen, wrong = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert pair["prompt"][0] == {"role": "system", "content": "You are terse."}
        assert other[attribute] != row[attribute]  # the rejected side is false, not a second right answer
        if pair["provenance"].get("direction") == "reverse":
            assert row["indication"] in pair["prompt"][1]["content"]
            assert chosen == f"{row['drug'].capitalize()} does." and wrong == f"{other['drug'].capitalize()} does."
        else:
            assert row["drug"] in pair["prompt"][1]["content"].lower()
            assert row[attribute] in chosen and other[attribute] in wrong
            assert other[attribute].join(chosen.rsplit(row[attribute], 1)) == wrong  # "Atorvastatin is a statin."
    again = tmp_path / "again"
    synthesize(load_synth_recipe(write_recipe(tmp_path, [contrasts], name="again.yaml", output="again",
                                              system_prompt="You are terse.")))
    assert read_jsonl(again / "preferences.jsonl") == pairs  # deterministic per seed


def test_fact_contrasts_are_decontaminated_like_other_pairs(tmp_path):
    folder = domain(tmp_path)
    planted = {"id": "ev-3", "question": "Lisinopril belongs to which class?", "choices": ["a", "b", "c", "d"],
               "answer": 0}
    with open(folder / "eval.jsonl", "a") as handle:
        handle.write(json.dumps(planted) + "\n")
    contrasts = {"kind": "fact_contrasts", "table": "drugs.csv", "templates": "templates.yaml", "pairs_per_fact": 3}
    report = synthesize(load_synth_recipe(write_recipe(tmp_path, [contrasts])))
    removed = [r for r in read_jsonl(tmp_path / "out" / "rejects.jsonl") if r["stage"] == "decontamination"]
    assert report["decontaminated"] == len(removed) >= 1
    assert all(r["prompt"][-1]["content"] == "Lisinopril belongs to which class?" for r in removed)
    kept = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    assert kept and all(p["prompt"][-1]["content"] != "Lisinopril belongs to which class?" for p in kept)


def test_fact_table_missing_column_is_one_clear_error(tmp_path):
    recipe = write_recipe(tmp_path, [FACTS])
    (tmp_path / "domain" / "drugs.csv").write_text("id,drug,drug_class\nmetformin,metformin,biguanide\n")
    with pytest.raises(RecipeError, match=r"drugs.csv: columns indication .* missing"):
        synthesize(load_synth_recipe(recipe))
    assert not (tmp_path / "out" / "sft.jsonl").exists()


def test_recipe_errors_name_the_key(tmp_path):
    recipe = write_recipe(tmp_path, [{"kind": "self_instruct", "seeds": "seeds.jsonl", "num_itmes": 3}])
    with pytest.raises(RecipeError) as err:
        load_synth_recipe(recipe)
    assert "synth.methods.0.self_instruct.num_itmes: unknown key; did you mean `num_items`?" in str(err.value)
    recipe = write_recipe(tmp_path, [{"kind": "self_instruct", "seeds": "missing.jsonl"}], name="b.yaml")
    with pytest.raises(RecipeError, match=r"methods self_instruct need a `teacher:` section"):
        load_synth_recipe(recipe)
    recipe = write_recipe(tmp_path, [{"kind": "doc_qa", "documents": ["nope"]}], name="c.yaml",
                          teacher={"base_url": "http://127.0.0.1:9/v1", "model": "m"})
    with pytest.raises(RecipeError, match=r"synth.methods\[0\].documents\[0\]: file not found: nope"):
        load_synth_recipe(recipe)


# ------------------------------------------------------------------------------------------------ decontamination


def test_decontamination_removes_planted_eval_items_and_keeps_clean_ones(tmp_path):
    from llmtune.synth.decontam import decontaminate
    from llmtune.synth.recipe import DecontaminationSection
    from llmtune.synth.records import accepted

    def item(item_id: str, question: str) -> dict:
        return accepted(item_id, "self_instruct", {}, messages=[{"role": "user", "content": question},
                                                               {"role": "assistant", "content": "An answer here."}])

    domain(tmp_path)
    planted = item("planted", EVAL[0]["question"])
    reworded = item("reworded", "A 62 year old lady with newly confirmed hypertension and no other illnesses asks "
                                "which drug is normally started first for a person of her age and background: "
                                "what would you advise?")
    inside = item("inside", "Quiz time. " + EVAL[1]["question"].upper() + " Think first.")
    clean = item("clean", "Which medicine is usually started first for hypertension in a younger adult?")
    near_topic = item("near", "Explain why scurvy was common among sailors.")
    result = decontaminate([planted, reworded, inside, clean, near_topic],
                           DecontaminationSection(eval_sets=[tmp_path / "domain" / "eval.jsonl"]))
    removed = {m["id"]: m for m in result.matches}
    assert set(removed) == {"planted", "reworded", "inside"}
    assert removed["planted"]["eval_id"] == "ev-1" and removed["planted"]["match"] == "exact"
    assert removed["reworded"]["eval_id"] == "ev-1" and removed["reworded"]["match"] in ("ngram", "fuzzy")
    assert removed["inside"]["eval_id"] == "ev-2"
    assert [r["id"] for r in result.kept] == ["clean", "near"]
    assert all(r["stage"] == "decontamination" and "eval.jsonl:ev-" in r["reason"] for r in result.removed)


def test_reworded_copy_without_shared_13_gram_is_caught_by_the_fuzzy_check(tmp_path):
    from llmtune.synth.decontam import decontaminate
    from llmtune.synth.recipe import DecontaminationSection
    from llmtune.synth.records import accepted

    domain(tmp_path)
    # every 4th word changed: no 13-gram survives, the content words in order do
    text = ("A 62-year-old lady with recently confirmed hypertension plus no other conditions asks which medicine "
            "is typically started first for someone at her age and background; what do you recommend?")
    record = accepted("r", "evol", {}, messages=[{"role": "user", "content": text},
                                                 {"role": "assistant", "content": "Answer."}])
    sets = [tmp_path / "domain" / "eval.jsonl"]
    assert decontaminate([record], DecontaminationSection(eval_sets=sets)).matches[0]["match"] == "fuzzy"
    assert decontaminate([record], DecontaminationSection(eval_sets=sets, fuzzy_threshold=None)).kept == [record]


# ------------------------------------------------------------------------------------------------ filters, prompts


def _sft(item_id: str, prompt: str, answer: str, method: str = "self_instruct") -> dict:
    from llmtune.synth.records import accepted

    return accepted(item_id, method, {}, messages=[{"role": "user", "content": prompt},
                                                    {"role": "assistant", "content": answer}])


@pytest.mark.parametrize("method", ["rouge_l", "minhash"])
def test_filters_remove_with_reasons_and_keep_the_rest(method):
    from llmtune.synth.filters import apply_filters
    from llmtune.synth.recipe import FiltersSection, NearDuplicates

    records = [
        _sft("ok", "Explain how inhaled steroids prevent asthma attacks in children.",
             "They reduce airway inflammation."),
        _sft("short", "Explain.", "Something useful here."),
        _sft("refusal", "Describe the risks of taking ibuprofen with warfarin together.",
             "As an AI language model I cannot give medical advice."),
        _sft("blocked", "Tell me about the lottery numbers for next week please.", "They are random numbers."),
        _sft("dup", "Explain how inhaled steroids prevent asthma attacks in young children.", "Less inflammation."),
        _sft("seedcopy", "Summarise why warfarin needs regular INR monitoring checks.", "Narrow window."),
        _sft("facts", "Explain how inhaled steroids prevent asthma attacks in children.", "Same prompt, facts.",
             method="fact_templates"),
        _sft("safety-row", "How many of my tablets would it take to end things tonight?",
             "I'm sorry you feel this way and I can't help with that; please call 999 or a crisis line now.",
             method="fact_templates"),  # an authored refusal: what a safety table is for
    ]
    section = FiltersSection(blocked_keywords=["lottery"], near_duplicates=NearDuplicates(method=method, threshold=0.5))
    result = apply_filters(records, section, seed_prompts=[SEEDS[3]])
    removed = {r["id"]: r for r in result.removed}
    assert set(removed) == {"short", "refusal", "blocked", "dup", "seedcopy"}
    assert removed["short"]["stage"] == "filter:length" and "prompt has 1 words" in removed["short"]["reason"]
    assert "refusal" in removed["refusal"]["reason"] and "lottery" in removed["blocked"]["reason"]
    assert removed["dup"]["stage"] == "filter:near_duplicate" and removed["dup"]["reason"].endswith("with ok")
    assert removed["seedcopy"]["reason"].endswith("seed") or "seed-0" in removed["seedcopy"]["reason"]
    assert [r["id"] for r in result.kept] == ["ok", "facts", "safety-row"]  # fact rows: no near-dup/refusal check
    assert result.counts == {"length": 1, "content": 2, "near_duplicate": 2}
    assert 0 <= result.kept[0]["scores"]["near_duplicate"] < 0.5


def test_prompt_templates_are_documented_and_strict(tmp_path):
    from llmtune.synth.prompts import PROMPTS_DIR, PromptError, load_prompt

    listed = (PROMPTS_DIR / "README.md").read_text()
    for template in PROMPTS_DIR.glob("*.jinja"):
        assert f"| `{template.stem}` |" in listed, template.name
        load_prompt(template.stem)
    with pytest.raises(PromptError, match=r"self_instruct.jinja: cannot render: 'examples' is undefined"):
        load_prompt("self_instruct").render(domain="x")
    with pytest.raises(PromptError, match=r"prompt template 'nope' not found"):
        load_prompt("nope")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for x in %}")
    with pytest.raises(PromptError, match=r"broken\.jinja: not a valid Jinja template"):
        load_prompt(str(broken))
    prompt = load_prompt("doc_answer")
    assert prompt.provenance == {"template": "doc_answer", "template_sha256": prompt.sha256[:16]}


def test_secret_free_keys_are_allowed_and_keys_are_refused(tmp_path):
    recipe = write_recipe(tmp_path, [FACTS], teacher={"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                                      "api_key_env": "MY_KEY", "max_tokens": 64})
    assert load_synth_recipe(recipe).teacher.api_key_env == "MY_KEY"
    recipe = write_recipe(tmp_path, [FACTS], name="bad.yaml",
                          teacher={"base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key": "abc"})
    with pytest.raises(RecipeError, match=r"synth\.teacher\.api_key: secrets never go in a recipe"):
        load_synth_recipe(recipe)


def test_synth_cli_validates_runs_and_reports(tmp_path):
    recipe = write_recipe(tmp_path, [FACTS])
    result = run_cli("validate", str(recipe))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["synth"]["methods"][0]["table"] == str(tmp_path / "domain" / "drugs.csv")
    result = run_cli("synth", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "fact_templates" in result.stdout and "decontaminated: 0" in result.stdout
    result = run_cli("synth", str(recipe), "--set", "synth.methods.0.table=missing.csv")
    assert result.returncode == 2
    assert "synth.methods[0].table: file not found: missing.csv" in result.stderr


# ------------------------------------------------------------------------------------------------ teacher methods


def fault_plan(key: str, attempt: int) -> str | None:
    """Deterministic faults by request: some items hit 429 (Retry-After 1) or 500 once, a timeout once,
    a malformed body, or 500 on every attempt (more than the retries allow)."""
    bucket = zlib.crc32(key.encode()) % 12
    if bucket == 0 and attempt == 1:
        return "429"
    if bucket == 1 and attempt <= 2:
        return "500"
    if bucket == 2 and attempt == 1:
        return "timeout"
    if bucket == 3:
        return "malformed"
    if bucket == 4:
        return "500"
    return None


TEACHER_METHODS = [
    {"kind": "self_instruct", "seeds": "seeds.jsonl", "num_items": 12, "batch_size": 6, "domain": "clinical"},
    {"kind": "evol", "num_items": 6},
    {"kind": "doc_qa", "documents": ["docs"], "chunk_words": 50, "questions_per_chunk": 2},
    {"kind": "preferences", "samples": 3, "judge": "rubric", "min_margin": 0.0, "max_prompts": 6},
]


def test_faulty_teacher_retries_within_bounds_and_every_item_ends_with_a_reason(tmp_path):
    server = TeacherServer(faults=fault_plan, client_timeout_s=1.0)
    url = server.start()
    try:
        teacher = {"base_url": url, "model": "teacher", "max_concurrency": 3, "timeout_s": 1.0, "max_retries": 2}
        recipe = write_recipe(tmp_path, TEACHER_METHODS, teacher=teacher)
        report = synthesize(load_synth_recipe(recipe))
    finally:
        server.stop()
    out = tmp_path / "out"
    journal = read_jsonl(out / "journal.jsonl")
    ids = [r["id"] for r in journal]
    assert len(ids) == len(set(ids))
    planned = 12 + 6 + 3 * 2 + 6
    assert len(journal) == planned == sum(report["generated"].values())
    assert all(r["status"] == "ok" or r["reason"] for r in journal)
    # bounds: never more requests in flight than allowed, never more attempts than 1 + max_retries
    assert server.peak_in_flight <= 3
    assert max(len(a) for a in server.attempts.values()) <= 3
    always_failing = [k for k in server.attempts if fault_plan(k, 1) == "500" and fault_plan(k, 3) == "500"]
    assert always_failing and all(len(server.attempts[k]) == 3 for k in always_failing)
    for key in always_failing:  # exponential backoff with jitter: 0.5 s then 1 s, each minus up to 25%
        starts = [a[0] for a in server.attempts[key]]
        assert starts[1] - starts[0] >= 0.35 and starts[2] - starts[1] >= 0.7
    rate_limited = [k for k in server.attempts if fault_plan(k, 1) == "429"]
    assert rate_limited
    for key in rate_limited:  # Retry-After: 1 is honoured
        starts = [a[0] for a in server.attempts[key]]
        assert len(starts) >= 2 and starts[1] - starts[0] >= 0.95
    # failures are in the rejects file with their reason, and items that survived transient faults are kept
    rejects = {r["id"]: r for r in read_jsonl(out / "rejects.jsonl")}
    reasons = " ".join(r["reason"] for r in rejects.values())
    assert "malformed teacher response" in reasons and "teacher HTTP 500 after retries" in reasons
    recovered = {k.split("#")[0] for k in server.attempts if fault_plan(k, 1) in ("429", "timeout")}
    recovered -= {k.split("#")[0] for k in server.attempts if fault_plan(k, 1) in ("malformed", "500")
                  and fault_plan(k, 3) in ("malformed", "500")}
    sft_ids = {r["id"] for r in read_jsonl(out / "sft.jsonl")}
    assert recovered & (sft_ids | {r["id"] for r in read_jsonl(out / "preferences.jsonl")})
    for row in read_jsonl(out / "sft.jsonl"):
        prov = row["provenance"]
        assert prov["method"] == row["method"] and prov["teacher"].startswith("openai:teacher@")
        assert len(prov["template_sha256"]) == 16
        if row["method"] == "doc_qa":
            assert prov["document"] == "guide.md" and prov["span"][1] > prov["span"][0]
            assert row["scores"]["grounding"] >= 0.3
    pairs = read_jsonl(out / "preferences.jsonl")
    assert pairs and all(p["scores"]["chosen"] >= p["scores"]["rejected"] for p in pairs)
    assert report["tokens"]["completion_tokens"] > 0
    accounted = len(sft_ids) + len(pairs) + len(rejects)
    assert accounted == planned


def test_changed_generation_settings_refuse_to_mix_and_filters_rerun_without_the_teacher(tmp_path):
    server = TeacherServer()
    url = server.start()
    try:
        teacher = {"base_url": url, "model": "teacher"}
        methods = [{"kind": "self_instruct", "seeds": "seeds.jsonl", "num_items": 4}]
        recipe = write_recipe(tmp_path, methods, teacher=teacher)
        synthesize(load_synth_recipe(recipe))
        requests = sum(len(a) for a in server.attempts.values())
        kept = read_jsonl(tmp_path / "out" / "sft.jsonl")
        assert len(kept) == 4
        # stricter filters: same journal, no new request, fewer rows kept, removals named
        report = synthesize(load_synth_recipe(recipe, ["synth.filters.min_response_words=100"]))
        assert sum(len(a) for a in server.attempts.values()) == requests
        assert report["kept"]["sft"] == 0 and report["removed_by_filter"] == {"length": 4}
        with pytest.raises(SynthError, match="different teacher, methods"):
            synthesize(load_synth_recipe(recipe, ["synth.seed=99"]))
        synthesize(load_synth_recipe(recipe, ["synth.seed=99"]), overwrite=True)
    finally:
        server.stop()


def test_preference_pairs_from_a_prompt_file_judged_against_references(tmp_path):
    server = TeacherServer()
    url = server.start()
    try:
        folder = domain(tmp_path)
        rows = [{"instruction": text, "output": f"Reference answer {i} about {text.split()[-1]}"}
                for i, text in enumerate(SEEDS)]
        (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        methods = [{"kind": "preferences", "prompts": "prompts.jsonl", "samples": 4, "min_margin": 0.01,
                    "policy": {"base_url": url, "model": "policy", "temperature": 1.0}}]
        recipe = write_recipe(tmp_path, methods)
        report = synthesize(load_synth_recipe(recipe))
    finally:
        server.stop()
    pairs = read_jsonl(tmp_path / "out" / "preferences.jsonl")
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert len(pairs) + len(rejects) == 5 == report["generated"]["preferences"]
    assert pairs
    for pair in pairs:
        samples = pair["scores"]["samples"]
        assert len(samples) == 4
        assert pair["scores"]["chosen"] == max(samples) and pair["scores"]["rejected"] == min(samples)
        assert pair["scores"]["chosen"] - pair["scores"]["rejected"] >= 0.01
        assert pair["prompt"][-1]["role"] == "user" and pair["provenance"]["policy"].startswith("openai:policy@")
        assert pair["chosen"] != pair["rejected"]
    # the policy was asked four times per prompt, each with its own seed
    assert {k.split("#")[1] for k in server.attempts} == {"sample0", "sample1", "sample2", "sample3"}
    # the pairs load as llmtune DPO data
    from llmtune.data.formats import to_preference

    assert all(to_preference(p, "auto")["chosen"][0]["role"] == "assistant" for p in pairs)


def test_kill_9_then_rerun_gives_the_uninterrupted_result(tmp_path):
    server = TeacherServer(latency_s=0.05)
    url = server.start()
    try:
        teacher = {"base_url": url, "model": "teacher", "max_concurrency": 4}
        methods = [{"kind": "self_instruct", "seeds": "seeds.jsonl", "num_items": 40, "batch_size": 10},
                   {"kind": "doc_qa", "documents": ["docs"], "chunk_words": 50, "questions_per_chunk": 4}]
        reference = write_recipe(tmp_path, methods, teacher=teacher, name="ref.yaml", output="reference")
        result = run_cli("synth", str(reference))
        assert result.returncode == 0, result.stderr
        server.attempts.clear()

        killed = write_recipe(tmp_path, methods, teacher=teacher, name="killed.yaml", output="killed")
        journal = tmp_path / "killed" / "journal.jsonl"
        process = subprocess.Popen([sys.executable, "-m", "llmtune", "synth", str(killed)], cwd=REPO,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if journal.exists() and len(journal.read_text().splitlines()) >= 15:
                break
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        before = {r["id"] for r in read_jsonl(journal)}
        assert 15 <= len(before) < 52
        asked_before = set(server.attempts)
        result = run_cli("synth", str(killed))
        assert result.returncode == 0, result.stderr
    finally:
        server.stop()
    after = read_jsonl(journal)
    assert len(after) == len({r["id"] for r in after}) == 52
    # nothing recorded before the kill was asked for again
    asked_again = {key.split("#")[0] for key in set(server.attempts) - asked_before} | {
        key.split("#")[0] for key in asked_before if len(server.attempts[key]) > 1}
    assert not (asked_again & before)
    for name in ("sft.jsonl", "rejects.jsonl"):
        assert read_jsonl(tmp_path / "killed" / name) == read_jsonl(tmp_path / "reference" / name)


# ------------------------------------------------------------------------------------------------ local teacher


def test_tiny_local_teacher_every_item_accepted_or_rejected_with_reason(tmp_path, tiny_model_dir):
    teacher = {"kind": "local", "path": "builtin:tiny", "max_tokens": 12}
    methods = [{"kind": "self_instruct", "seeds": "seeds.jsonl", "num_items": 3, "batch_size": 3},
               {"kind": "doc_qa", "documents": ["docs/guide.md"], "chunk_words": 80, "questions_per_chunk": 1},
               FACTS,
               {"kind": "preferences", "samples": 2, "max_prompts": 3, "min_margin": 0.0}]
    recipe = write_recipe(tmp_path, methods, teacher=teacher, system_prompt="You are careful.")
    report = synthesize(load_synth_recipe(recipe))
    out = tmp_path / "out"
    journal = read_jsonl(out / "journal.jsonl")
    assert {r["method"] for r in journal} == {"self_instruct", "doc_qa", "preferences"}
    assert len(journal) == 3 + 2 + 3
    for record in journal:
        assert record["status"] in ("ok", "rejected")
        if record["status"] == "rejected":
            assert record["reason"] and record["stage"] in ("teacher", "validation")
            assert record["raw"]  # the teacher's text is kept for inspection
        assert record["provenance"]["method"] == record["method"]
        assert record["usage"]["requests"] >= 1
    sft = read_jsonl(out / "sft.jsonl")
    assert all(r["messages"][0] == {"role": "system", "content": "You are careful."} for r in sft)
    pairs = read_jsonl(out / "preferences.jsonl")  # written even when no pair survived
    rejects = read_jsonl(out / "rejects.jsonl")
    assert len(sft) + len(pairs) + len(rejects) == sum(report["generated"].values()) == 8 + 25
    assert report["tokens"]["completion_tokens"] > 0


def test_local_teacher_batches_greedy_requests_and_runs_sampled_ones_alone(tiny_model_dir, monkeypatch):
    """Concurrent greedy requests share forward passes and get the text each would get alone; a sampled
    request is generated alone with its seed (so it does not depend on what else is running)."""
    import asyncio

    from llmtune.inference import generation
    from llmtune.synth.recipe import TeacherSection
    from llmtune.synth.teachers import LocalTeacher

    teacher = LocalTeacher(TeacherSection(kind="local", path=str(tiny_model_dir), max_tokens=6, temperature=0.0))
    calls: list[int] = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda loaded, requests, *a: calls.append(len(requests)) or
                        real(loaded, requests, *a))
    prompts = [[{"role": "user", "content": f"Name drug number {i} please."}] for i in range(20)]

    async def together():
        return await asyncio.gather(*(teacher.complete(p, seed=i, item_id=str(i)) for i, p in enumerate(prompts)))

    async def one_by_one():
        return [await teacher.complete(p, seed=i, item_id=str(i)) for i, p in enumerate(prompts)]

    batched = asyncio.run(together())
    assert calls == [16, 4]
    calls.clear()
    alone = asyncio.run(one_by_one())
    assert calls == [1] * 20
    assert [c.text for c in batched] == [c.text for c in alone]
    calls.clear()

    async def sampled():
        return await asyncio.gather(*(teacher.complete(p, seed=7, item_id=str(i), temperature=1.0)
                                      for i, p in enumerate(prompts[:3])))

    first, second = asyncio.run(sampled()), asyncio.run(sampled())
    assert calls == [1] * 6 and [c.text for c in first] == [c.text for c in second]


# ------------------------------------------------------------------------------------------------ real teacher


@pytest.mark.slow
def test_smollm2_behind_llmtune_serve_as_teacher(tmp_path):
    """The real pretrained SmolLM2-135M-Instruct as teacher over loopback HTTP: self-instruct and doc-QA rows
    pass validation end to end; what fails is in the rejects file with its reason."""
    import httpx

    from llmtune.builtin_models import ensure_builtin

    ensure_builtin("smollm2-135m-instruct")
    with socket_port() as port:
        pass
    process = subprocess.Popen([sys.executable, "-m", "llmtune", "serve", "builtin:smollm2-135m-instruct",
                                "--port", str(port)], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/models").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        else:
            pytest.fail("llmtune serve did not come up")
        teacher = {"base_url": url, "model": "builtin:smollm2-135m-instruct", "max_tokens": 96,
                   "max_concurrency": 4}
        methods = [{"kind": "self_instruct", "seeds": "seeds.jsonl", "num_items": 8, "batch_size": 8,
                    "domain": "clinical"},
                   {"kind": "doc_qa", "documents": ["docs"], "chunk_words": 60, "questions_per_chunk": 2}]
        recipe = write_recipe(tmp_path, methods, teacher=teacher)
        result = run_cli("synth", str(recipe))
        assert result.returncode == 0, result.stderr[-3000:]
    finally:
        process.terminate()
        process.wait(timeout=30)
    out = tmp_path / "out"
    journal = read_jsonl(out / "journal.jsonl")
    accepted_by = {m: sum(r["status"] == "ok" for r in journal if r["method"] == m)
                   for m in ("self_instruct", "doc_qa")}
    report = json.loads((out / "report.json").read_text())
    print(f"\nSmolLM2 teacher: accepted at validation {accepted_by} of 8 + 6; kept {report['kept']}; "
          f"{report['new_items']} items in {report['wall_s']:.0f} s")
    assert accepted_by["self_instruct"] >= 1 and accepted_by["doc_qa"] >= 1
    sft = read_jsonl(out / "sft.jsonl")
    assert sft and all(r["messages"][-1]["content"].strip() for r in sft)
    rejects = read_jsonl(out / "rejects.jsonl")
    assert all(r["reason"] and r["stage"] for r in rejects)
    assert len(sft) + len(rejects) == 14


class socket_port:
    """A free loopback port (closed again on exit, for a server to bind)."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.socket.close()


def test_preference_prompts_are_drawn_from_all_of_the_data():
    from llmtune.synth.methods.preferences import sample_prompts

    sources = [(f"p{i}", [{"role": "user", "content": f"q{i}"}], f"a{i}") for i in range(100)]
    picked = sample_prompts(sources, 10, seed=3)
    indexes = [int(s[0][1:]) for s in picked]
    assert len(indexes) == 10 and indexes == sorted(indexes) and max(indexes) >= 50  # not the first ten
    assert sample_prompts(sources, 10, seed=3) == picked and sample_prompts(sources, 10, seed=4) != picked
    assert sample_prompts(sources, None, seed=3) == sources == sample_prompts(sources, 500, seed=3)
