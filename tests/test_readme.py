"""Every command the README shows runs (the SmolLM2 demo through its tiny-model variant), and CI runs the
README's test command verbatim."""

from __future__ import annotations

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
    assert demo == SETUP + ".venv/bin/llmtune train recipes/clinical-qa/sft-smollm2.yaml"
    assert tests.startswith(SETUP) and "pytest" in tests


def test_ci_runs_every_test_command_of_the_readme():
    ci = (REPO / ".ci" / "run").read_text()
    for command in readme_commands():
        if "pytest" in command:
            assert command in ci, command


def _runnable(command: str, out: Path, sft_run: Path | None) -> str:
    """The README command as the tests run it: tiny model, a temporary output folder, this venv."""
    command = command.removeprefix(SETUP)  # CI runs the set-up itself, from scratch
    command = command.replace("-smollm2.yaml", "-tiny.yaml").replace(".venv/bin/", f"{BIN}/")
    if " train " in command:
        command = re.sub(r" --set output_dir=\S+", "", command) + f" --set output_dir={shlex.quote(str(out))}"
    if sft_run is not None:
        command += f" --set preference.from_run={shlex.quote(str(sft_run))}"
    return command


@pytest.mark.parametrize("command", [c for c in readme_commands() if "pytest" not in c])
def test_readme_command_runs(command, tmp_path, request):
    sft_run = request.getfixturevalue("finished_sft_run") if "dpo-" in command else None
    runnable = _runnable(command, tmp_path / "run", sft_run)
    env = {**os.environ, "OMP_NUM_THREADS": "1" if "launch" in command else os.environ.get("OMP_NUM_THREADS", "")}
    result = subprocess.run(runnable, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{runnable}\n{result.stderr[-4000:]}"
    if " train " in command:
        assert (tmp_path / "run" / "manifest.json").is_file()
