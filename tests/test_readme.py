"""Every command the README shows runs (the SmolLM2 demo through its tiny-model variant), and CI runs the
README's test command verbatim."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

README = (REPO / "README.md").read_text()
BIN = Path(sys.executable).parent
SETUP = "./scripts/setup.sh && "


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_opens_with_the_demo_and_the_test_command():
    demo, tests = readme_commands()[:2]
    assert demo == SETUP + ".venv/bin/llmtune run recipes/clinical-qa/cpu-smollm2.yaml"
    assert tests.startswith(SETUP) and "pytest" in tests


def test_ci_runs_every_test_command_of_the_readme():
    ci = (REPO / ".ci" / "run").read_text()
    for command in readme_commands():
        if "pytest" in command:
            assert command in ci, command


def _runnable(command: str, out: Path, sft_run: Path | None) -> str:
    """The README command as the tests run it: tiny model, a temporary output folder, this venv."""
    command = command.removeprefix(SETUP)  # CI runs the set-up itself, from scratch
    if "synth_concurrency" in command:  # no model: a loopback teacher with fixed latency
        command = re.sub(r" --\S+ \d+", "", command) + f" --items 8 --latency-ms 20 --results {shlex.quote(str(out))}"
        return command.replace(".venv/bin/", f"{BIN}/")
    if command.startswith(".venv/bin/python benchmarks/"):  # the same script on the tiny model, in seconds
        # A GPU command's random 8B weights become random weights of the tiny architecture: the same code path.
        model = "random:builtin:tiny --tokenizer builtin:tiny" if "random:" in command else "builtin:tiny"
        command = re.sub(r" --model \S+| --\S+ \d+(?=\s|$)", "", command)
        command += f" --model {model} --results {shlex.quote(str(out))}"
        small = {"dpo_vs_trl": " --steps 2 --rounds 1", "eval_vs_lm_eval": " --items 8 --rounds 1",
                 "sft_vs_trl": " --epochs 1 --rounds 1"}
        command += next((v for k, v in small.items() if k in command), " --requests 4 --tokens 4")
    if " run recipes/" in command:  # the pipeline: its tiny variant; the GPU recipes' dry run as it is
        command = command.replace("cpu-smollm2.yaml", "tiny.yaml").replace(".venv/bin/", f"{BIN}/")
        return command if "--dry-run" in command else command + f" --set pipeline.output_dir={shlex.quote(str(out))}"
    command = command.replace("-smollm2.yaml", "-tiny.yaml").replace(".venv/bin/", f"{BIN}/")
    if " train " in command:
        command = re.sub(r" --set output_dir=\S+", "", command) + f" --set output_dir={shlex.quote(str(out))}"
    if " synth " in command:
        command += f" --set synth.output_dir={shlex.quote(str(out))}"
    if " sweep " in command:
        command += f" --set sweep.output_dir={shlex.quote(str(out))} --trials 2"
    if " eval recipes/" in command:
        command += f" --set eval.output_dir={shlex.quote(str(out))}"
    if sft_run is not None:
        command += f" --set preference.from_run={shlex.quote(str(sft_run))}"
    return command


RUN_FOLDERS = re.compile(r"runs/clinical-qa/(sft|dpo)-smollm2(?!-)\b")


@pytest.mark.parametrize("command", [c for c in readme_commands() if "pytest" not in c])
def test_readme_command_runs(command, tmp_path, request, tmp_path_factory):
    if " run recipes/" in command:
        _run_pipeline_command(command, tmp_path_factory)
        return
    eval_recipe = " eval recipes/" in command
    uses_a_run = "dpo-" in command or eval_recipe or RUN_FOLDERS.search(command) is not None
    sft_run = request.getfixturevalue("finished_sft_run") if uses_a_run else None
    if eval_recipe:  # the tiny eval recipe compares the base with a real (tiny) SFT run
        runnable = _runnable(command, tmp_path / "run", None) + f" --set eval.models.1.path={shlex.quote(str(sft_run))}"
    elif " train " in command or sft_run is None:
        runnable = _runnable(command, tmp_path / "run", sft_run if "dpo-" in command else None)
    else:  # generate / chat / serve / eval on a trained run: a real tiny run stands in for the SmolLM2 ones
        runnable = RUN_FOLDERS.sub(str(sft_run), command).replace(".venv/bin/", f"{BIN}/")
        runnable = runnable.replace("builtin:smollm2-135m-instruct", "builtin:tiny")
        runnable = re.sub(r"-o \S+", f"-o {tmp_path / 'output'}", runnable)
    env = {**os.environ, "OMP_NUM_THREADS": "1" if "launch" in command else os.environ.get("OMP_NUM_THREADS", "")}
    if " serve " in command:
        _serve_until_it_answers(runnable, env)
        return
    stdin = "/exit\n" if " chat " in command else None
    result = subprocess.run(runnable, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                            input=stdin)
    assert result.returncode == 0, f"{runnable}\n{result.stderr[-4000:]}"
    if " train " in command:
        assert (tmp_path / "run" / "manifest.json").is_file()
    if " synth " in command:
        report = json.loads((tmp_path / "run" / "report.json").read_text())
        assert report["kept"]["sft"] > 0 and (tmp_path / "run" / "sft.jsonl").is_file()
    if " eval " in command:
        report = json.loads(next(tmp_path.glob("*/report.json")).read_text())
        assert report["results"] and (next(tmp_path.glob("*/report.html"))).is_file()
    if " sweep " in command:
        assert (tmp_path / "run" / "best-recipe.yaml").is_file() and (tmp_path / "run" / "results.md").is_file()
    if " generate " in command:
        assert len((tmp_path / "output").read_text().splitlines()) == 10
    if " merge " in command:
        assert (tmp_path / "output" / "model.safetensors").is_file()
    if " publish " in command:
        assert (tmp_path / "output" / "README.md").is_file()


def _run_pipeline_command(command: str, tmp_path_factory) -> None:
    """Pipeline commands share one output folder (as they would for a user): the demo runs every stage, the
    same recipe again skips them all, a changed DPO beta reruns from dpo."""
    out = tmp_path_factory.getbasetemp() / "readme-pipeline"
    runnable = _runnable(command, out, None)
    before = _stage_state(out)
    result = subprocess.run(runnable, shell=True, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{runnable}\n{result.stderr[-4000:]}"
    if "--dry-run" in command:
        assert "GB per process" in result.stdout
        return
    after = _stage_state(out)
    assert all(stage["status"] == "done" for stage in after.values()) and len(after) == 7
    if "--set" in command and before:  # dpo.preference.beta: the stages before dpo are untouched
        assert all(after[s] == before[s] for s in ("synth", "sft", "prefs")) and after["dpo"] != before["dpo"]
    assert (out / "publish" / "README.md").is_file()


def _stage_state(out: Path) -> dict:
    state = out / "pipeline-state.json"
    return json.loads(state.read_text())["stages"] if state.is_file() else {}


def _serve_until_it_answers(command: str, env: dict[str, str]) -> None:
    import socket
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = re.sub(r"--port \d+", f"--port {port}", command)
    process = subprocess.Popen(shlex.split(command), cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
                assert {m["id"] for m in models["data"]} >= {"dpo"}
                return
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read().decode()[-3000:]
                time.sleep(0.3)
        pytest.fail(f"{command} did not answer")
    finally:
        process.terminate()
        process.wait(timeout=30)
