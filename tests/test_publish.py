"""Publish: a safe folder with a parseable model card; the push goes through huggingface_hub to a local
stand-in for the Hub API that records what was uploaded."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from huggingface_hub import ModelCard

from llmtune.config import load_recipe
from llmtune.publish import PublishError, build_publish_folder
from llmtune.train import sft
from tests.helpers import copy_run_files, run_cli, write_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("clinical-run")
    rows = [{"messages": [{"role": "user", "content": f"Dose {i}?"}, {"role": "assistant", "content": f"{i} mg."}]}
            for i in range(16)]
    (folder / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return sft.main(load_recipe(write_recipe(folder, folder / "chat.jsonl", train={"max_steps": 3})))


def test_publish_folder_has_safe_files_and_a_card_with_hub_metadata(run, tmp_path):
    result = run_cli("publish", str(run), "-o", str(tmp_path / "pub"), "--license", "apache-2.0",
                     "--repo-id", "org/tiny-clinical")
    assert result.returncode == 0, result.stderr[-2000:]
    folder = tmp_path / "pub"
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "recipe.yaml", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    card = ModelCard.load(folder / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation" and "llmtune" in meta["tags"]
    assert meta["datasets"] == ["chat.jsonl"]
    assert "## Data provenance" in card.text and "## Intended use and limitations" in card.text


def test_publish_refuses_pickles_and_secrets(run, tmp_path):
    planted = copy_run_files(run, tmp_path / "planted")
    (planted / "optimizer.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PublishError, match=r"refusing to publish pickle files: optimizer\.pt"):
        build_publish_folder(planted, tmp_path / "out")
    (planted / "optimizer.pt").unlink()
    (planted / "notes.json").write_text(json.dumps({"token": "hf_" + "x" * 34}))
    with pytest.raises(PublishError, match=r"notes\.json: looks like it contains a secret"):
        build_publish_folder(planted, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class FakeHub:
    """Just enough of the Hub API for `create_repo` + `upload_folder` (regular uploads, no LFS)."""

    def __init__(self) -> None:
        self.created: list[dict] = []
        self.uploaded: dict[str, bytes] = {}
        self.authorization: set[str] = set()
        self.validated = ""
        app = FastAPI()

        @app.post("/api/repos/create")
        async def create(request: Request):
            self.authorization.add(request.headers.get("authorization", ""))
            body = await request.json()
            self.created.append(body)
            return {"url": f"{self.url}/{body.get('organization')}/{body['name']}", "name": body["name"]}

        @app.post("/api/validate-yaml")
        async def validate(request: Request):
            self.validated = (await request.json())["content"]
            return {"errors": [], "warnings": []}

        @app.post("/api/models/{org}/{name}/preupload/{revision}")
        async def preupload(org: str, name: str, revision: str, request: Request):
            files = (await request.json())["files"]
            return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                              for f in files]}

        @app.post("/api/models/{org}/{name}/commit/{revision}")
        async def commit(org: str, name: str, revision: str, request: Request):
            for line in (await request.body()).splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.uploaded[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return {"commitUrl": f"{self.url}/{org}/{name}/commit/abc123", "commitOid": "abc123",
                    "pullRequestUrl": None}

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.05)


def test_push_uploads_the_folder_through_huggingface_hub(run, tmp_path):
    hub = FakeHub()
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_testtoken", "HF_HUB_DISABLE_XET": "1"}
    try:
        result = run_cli("publish", str(run), "-o", str(tmp_path / "pub"), "--repo-id", "org/tiny", "--push",
                         env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        assert hub.created and hub.created[0]["name"] == "tiny"
        assert hub.authorization == {"Bearer hf_testtoken"}
        published = {p.name for p in (tmp_path / "pub").iterdir()}
        assert set(hub.uploaded) == published
        assert hub.uploaded["adapter_model.safetensors"] == (run / "adapter_model.safetensors").read_bytes()
        assert hub.validated.startswith("---")  # the card's metadata went through the Hub's YAML check

        no_token = run_cli("publish", str(run), "-o", str(tmp_path / "pub2"), "--repo-id", "org/tiny", "--push",
                           env={**env, "HF_TOKEN": ""})
        assert no_token.returncode == 2 and "set HF_TOKEN" in no_token.stderr
    finally:
        hub.server.should_exit = True


def test_card_carries_the_eval_report_numbers(run, tmp_path, tiny_model_dir):
    from llmtune.eval.recipe import EvalSection
    from llmtune.eval.run import evaluate

    rows = [{"id": f"q{i}", "category": "c", "question": f"Dose {i}?", "choices": [f"{i} mg.", "none", "ten", "x"],
             "answer": i % 4} for i in range(12)]
    data = tmp_path / "mcq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = EvalSection(output_dir=tmp_path / "eval", models=[{"name": "base", "path": str(tiny_model_dir)},
                                                                  {"name": "tuned", "path": str(run)}],
                          tasks=[{"name": "doses", "kind": "mcq", "path": data}])
    report = evaluate(section)
    result = run_cli("publish", str(run), "-o", str(tmp_path / "pub"), "--repo-id", "org/tiny-clinical",
                     "--eval-report", str(tmp_path / "eval" / "report.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    card = ModelCard.load(tmp_path / "pub" / "README.md")
    [index] = card.data.to_dict()["model-index"]
    published = {m["name"]: m["value"] for r in index["results"] for m in r["metrics"]}
    tuned = report["results"]["doses"]["tuned"]["metrics"]
    assert published == {metric: round(value["mean"], 4) for metric, value in tuned.items()}
    assert index["results"][0]["task"]["type"] == "multiple-choice"
    assert "| doses | acc |" in card.text and "McNemar" in card.text
    compared = report["comparisons"]["doses"]["tuned"][0]
    assert f"{compared['difference']:+.3f}" in card.text
    # a report that does not contain this run is refused, naming what it has
    result = run_cli("publish", str(run), "-o", str(tmp_path / "pub2"), "--eval-report",
                     str(tmp_path / "eval" / "report.json"), "--eval-model", "nobody")
    assert result.returncode == 2 and "the report has base, tuned" in result.stderr
    assert not (tmp_path / "pub2").exists()


GREEDY = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, base = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(folder)
if base != "-":
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
else:
    model = AutoModelForCausalLM.from_pretrained(folder)
answers = []
for prompt in json.loads(sys.argv[3]):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:]
    answers.append(tokenizer.decode(out, skip_special_tokens=True))
print(json.dumps(answers))
"""
PROMPTS = ["Dose 3?", "Dose 12?", "hello", "What is the usual dose of this medicine for an adult?", "mg"]


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_published_folder_loads_in_a_fresh_process_and_generates_what_llmtune_does(run, tmp_path, kind,
                                                                                    tiny_model_dir):
    import subprocess
    import sys

    from llmtune.inference.generation import GenerationRequest, generate
    from llmtune.inference.loading import load_for_inference

    source = run
    if kind == "merged":
        assert run_cli("merge", str(run), "-o", str(tmp_path / "merged")).returncode == 0
        source = tmp_path / "merged"
    assert run_cli("publish", str(source), "-o", str(tmp_path / "pub")).returncode == 0
    base = str(tiny_model_dir) if kind == "adapter" else "-"
    plain = subprocess.run([sys.executable, "-c", GREEDY, str(tmp_path / "pub"), base, json.dumps(PROMPTS)],
                           capture_output=True,
                           text=True, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert plain.returncode == 0, plain.stderr[-2000:]
    loaded = load_for_inference(str(run))
    ours = [choices[0].text for choices in generate(loaded, [
        GenerationRequest(adapter=next(iter(loaded.adapters)), messages=[{"role": "user", "content": prompt}],
                          max_new_tokens=8) for prompt in PROMPTS])]
    assert json.loads(plain.stdout.strip().splitlines()[-1]) == ours
    assert any(ours)  # text was generated, not only an end of turn
