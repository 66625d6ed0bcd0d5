"""Inference: `llmtune generate`, `llmtune chat`, and `llmtune serve` driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from openai import OpenAI

from llmtune.config import load_recipe
from llmtune.inference.batcher import Batcher, QueueFull
from llmtune.inference.chat import chat_loop
from llmtune.inference.generation import GenerationRequest, Sampling
from llmtune.inference.loading import BASE, load_for_inference
from llmtune.inference.server import create_app
from llmtune.train import sft
from tests.helpers import REPO, run_cli, write_recipe

ANSWER = "Ask a clinician."
QUESTION = [{"role": "user", "content": "Can I double my dose?"}]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny adapter trained hard on one answer, so its greedy output is stable and differs from the base's."""
    folder = tmp_path_factory.mktemp("served")
    rows = [{"messages": [{"role": "user", "content": f"Can I take {i} doses of drug {i % 7}?"},
                          {"role": "assistant", "content": ANSWER}]} for i in range(32)]
    (folder / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = load_recipe(write_recipe(folder, folder / "chat.jsonl",
                                      # A random tiny model's logits are nearly flat; a trainable lm_head lets
                                      # the adapter make one answer clearly the most likely.
                                      adapter={"r": 16, "alpha": 32, "dropout": 0.0, "modules_to_save": ["lm_head"]},
                                      train={"epochs": 8, "learning_rate": 1e-2, "logging_steps": 10}))
    return sft.main(recipe)


@pytest.fixture(scope="module")
def loaded(trained_run):
    return load_for_inference(str(trained_run))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(loaded):
    """`create_app` under uvicorn on loopback, in a thread of this process."""
    app = create_app(loaded, max_batch_size=16)
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", app
    uv.should_exit = True
    thread.join(timeout=10)


def _client(base_url: str, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def _chat(client: OpenAI, model: str, messages=QUESTION, **kwargs) -> str:
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=12, **kwargs)
    return reply.choices[0].message.content


def test_models_lists_the_base_and_the_adapter(server, loaded, trained_run):
    names = [m.id for m in _client(server[0]).models.list().data]
    assert names == ["builtin:tiny", trained_run.name] == loaded.names


def test_chat_completions_from_base_and_adapter_streamed_and_not(server, trained_run):
    client = _client(server[0])
    adapter_reply = _chat(client, trained_run.name)
    base_reply = _chat(client, "builtin:tiny")
    assert adapter_reply == ANSWER
    assert base_reply != adapter_reply  # the adapter changes what the model says
    stream = client.chat.completions.create(model=trained_run.name, messages=QUESTION, temperature=0,
                                            max_tokens=12, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_completions_endpoint_and_stop_strings(server, trained_run):
    client = _client(server[0])
    reply = client.completions.create(model="builtin:tiny", prompt="The patient", max_tokens=5, temperature=0)
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens <= 5
    cut = _chat(client, trained_run.name, stop=["clinician"])
    assert cut == "Ask a "


def test_greedy_output_is_the_same_from_server_generate_and_plain_peft(server, trained_run, tmp_path):
    served = _chat(_client(server[0]), trained_run.name)

    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"id": "q1", "messages": QUESTION}) + "\n")
    result = run_cli("generate", str(trained_run), "-i", str(rows), "-o", str(tmp_path / "out.jsonl"),
                     "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr[-2000:]
    generated = json.loads((tmp_path / "out.jsonl").read_text())["output"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.builtin_models import cache_dir

    tokenizer = AutoTokenizer.from_pretrained(trained_run)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cache_dir() / "models" / "tiny"),
                                      str(trained_run)).eval()
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    plain = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert served == generated == plain == ANSWER


def test_sixteen_concurrent_requests_complete_correctly_in_shared_batches(server, trained_run):
    base_url, app = server
    client = _client(base_url)
    prompts = [[{"role": "user", "content": f"Can I take {'a lot of ' * (i % 4)}drug {i}?"}] for i in range(16)]
    alone = [_chat(client, trained_run.name, p) for p in prompts[:4]]  # one at a time
    batches_before = app.state.batcher.batches_run
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: _chat(client, trained_run.name, p), prompts))
    assert len(together) == 16 and together[:4] == alone
    assert all(reply == ANSWER for reply in together)
    assert app.state.batcher.batches_run - batches_before < 16  # requests shared forward passes


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, trained_run):
    base_url, _ = server
    url = f"{base_url}/chat/completions"
    ok = {"model": trained_run.name, "messages": QUESTION, "max_tokens": 4}
    cases = [
        (httpx.post(url, json={**ok, "model": "nope"}), 404, "model_not_found"),
        (httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, None),
        (httpx.post(url, json={**ok, "max_tokens": 10_000_000}), 400, "context_length_exceeded"),
        (httpx.post(url, json={**ok, "messages": []}), 400, None),
        (httpx.post(url, json={**ok, "n": 2, "stream": True}), 400, None),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"] == code
    assert httpx.post(url, json=ok, timeout=60).status_code == 200


def test_api_key_is_required_when_set(loaded):
    with TestClient(create_app(loaded, api_key="s3cret")) as client:
        body = {"model": "builtin:tiny", "messages": QUESTION, "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=body).status_code == 401
        wrong = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 200


def test_full_queue_answers_503(loaded):
    async def overfill():
        batcher = Batcher(loaded, max_queue=1)  # not started: nothing drains the queue
        request = GenerationRequest(adapter=BASE, prompt="hi", max_new_tokens=1)
        first = asyncio.ensure_future(batcher.submit(request))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(request)
        first.cancel()

    asyncio.run(overfill())
    app = create_app(loaded)
    with TestClient(app) as client:
        async def refuse(request):
            raise QueueFull("the request queue is full (64); retry later")

        app.state.batcher.submit = refuse
        response = client.post("/v1/chat/completions", json={"model": "builtin:tiny", "messages": QUESTION})
        assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"


def test_generate_resumes_by_id(trained_run, tmp_path):
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"id": f"q{i}", "messages": QUESTION}) + "\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "q0", "output": "earlier"}) + "\n" + json.dumps({"id": "q3", "output": "x"})
                   + "\n" + '{"id": "q4", "outp')  # the last line was cut by a kill
    result = run_cli("generate", str(trained_run), "-i", str(rows), "-o", str(out), "--batch-size", "3",
                     "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line is valid JSON again
    assert sorted(r["id"] for r in records) == [f"q{i}" for i in range(6)]
    assert next(r for r in records if r["id"] == "q0")["output"] == "earlier"  # not generated again
    assert "4 new rows" in result.stdout


def test_generate_names_the_bad_row(trained_run, tmp_path):
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"id": "a", "messages": QUESTION}) + "\n" + json.dumps({"id": "b"}) + "\n")
    result = run_cli("generate", str(trained_run), "-i", str(rows), "-o", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2 and f"{rows}: row 2: needs `messages` or a `prompt`" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_chat_loop_streams_resets_and_exits(loaded):
    from rich.console import Console

    console = Console(record=True, width=200)
    inputs = iter(["Can I double my dose?", "/reset", "Can I double my dose?", "/exit"])
    history = chat_loop(loaded, loaded.adapter_for(next(iter(loaded.adapters))), "Be brief.",
                        Sampling(), 12, read=lambda _: next(inputs), console=console)
    assert [m["role"] for m in history] == ["system", "user", "assistant"]  # the reset dropped the first turn
    assert history[-1]["content"] == ANSWER
    assert console.export_text().count(ANSWER) == 2


def test_serve_command_with_api_key(trained_run):
    port = _free_port()
    env = {**os.environ, "LLMTUNE_TEST_KEY": "k-123"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llmtune", "serve", str(trained_run), "--port", str(port),
         "--api-key-env", "LLMTUNE_TEST_KEY"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base_url}/models").status_code == 401:  # up, and guarded
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        else:
            pytest.fail("llmtune serve did not come up")
        assert _chat(_client(base_url, "k-123"), trained_run.name) == ANSWER
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_n_choices_and_seeded_sampling(loaded):
    with TestClient(create_app(loaded)) as client:
        body = {"model": "builtin:tiny", "messages": QUESTION, "max_tokens": 8, "temperature": 1.0, "seed": 7}
        first = client.post("/v1/chat/completions", json={**body, "n": 3}).json()
        assert [c["index"] for c in first["choices"]] == [0, 1, 2]
        assert 3 <= first["usage"]["completion_tokens"] <= 3 * 8  # usage counts every choice
        again = client.post("/v1/chat/completions", json={**body, "n": 3}).json()
        texts = [c["message"]["content"] for c in first["choices"]]
        assert texts == [c["message"]["content"] for c in again["choices"]]  # the same seed, the same samples
        assert len(set(texts)) > 1  # sampling at temperature 1 on a near-flat model: the choices differ
