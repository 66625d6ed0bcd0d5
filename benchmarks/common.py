"""What the training benchmarks share: timed subprocesses, the matmul peak, a neutral held-out loss."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run under /usr/bin/time; returns the process, wall seconds and peak RSS in MB."""
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M", *command], env=env, capture_output=True,
                            text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")
    rss = int(re.findall(r"MAXRSS_KB=(\d+)", result.stderr)[-1]) / 1024
    return result, wall, rss


def last_metric(text: str, key: str) -> float:
    """The last value of `key` in a transformers log line (`{'loss': '1.23', ...}`)."""
    values = re.findall(rf"'{re.escape(key)}': '?([0-9.e+-]+)'?", text)
    return float(values[-1])


def model_folder(model: str) -> Path:
    from llmtune.builtin_models import ensure_builtin

    return ensure_builtin(model.removeprefix("builtin:")) if model.startswith("builtin:") else Path(model)


def matmul_peak_gflops(dtype_name: str = "bfloat16", size: int = 2048, seconds: float = 3.0) -> float:
    """Best sustained GEMM rate of this machine, now, in the given dtype (the MFU denominator)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def heldout_loss(model_dir: Path, adapter_dir: Path, rows: list[dict]) -> float:
    """Mean completion-token NLL of base + adapter on prompt/completion rows, in fp32: one judge for every side."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids)
            ids = torch.tensor([tokenizer(full, add_special_tokens=False).input_ids])
            labels = ids.clone()
            labels[:, :prompt_len] = -100
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
            total += nll.item()
            count += int((target != -100).sum())
    return total / count


def write_results(name: str, results_dir: Path, payload: dict) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"{name}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out
