"""What the training benchmarks share: timed subprocesses, the matmul peak, a neutral held-out loss, and models
to run them on: a builtin, a local folder, or random weights of a real-size architecture (`random:NAME`)."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = "builtin:smollm2-135m-instruct"


@dataclass(frozen=True)
class Measured:
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mb: float
    peak_gpu_mb: float | None  # device memory the command added at its peak (NVML); None without a GPU


def timed(command: list[str], env: dict[str, str]) -> Measured:
    """Run `command`; its wall time, its peak RSS (from wait4, like /usr/bin/time) and its peak GPU memory."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, GpuMemoryPeak() as gpu:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)  # reaps the child itself: its own rusage, not the sum of all
        wall = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(command)}\n{stderr[-3000:]}")
    return Measured(stdout, stderr, wall, usage.ru_maxrss / 1024, gpu.peak_mb)


class GpuMemoryPeak:
    """Samples the GPU's used memory every 20 ms (NVML) while a child runs; the peak above the level at entry.
    It sees the child's whole footprint (CUDA context and allocator cache included), the same way for every side."""

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuMemoryPeak:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML library or no NVIDIA GPU: CPU benchmarks report RSS only
            return self
        baseline = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        self.peak_mb = 0.0

        def sample() -> None:
            while not self._stop.wait(0.02):
                used = (pynvml.nvmlDeviceGetMemoryInfo(handle).used - baseline) / 2**20
                self.peak_mb = max(self.peak_mb, used)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def median(values: list[float | None]) -> float | None:
    """The median over rounds; None where a side has no such figure (GPU memory on a CPU)."""
    import statistics

    return None if None in values else statistics.median(values)


def peak_memory(on_gpu: bool) -> tuple[str, str]:
    """The figure that compares sides' memory, and its name: peak GPU memory on a GPU, peak RSS elsewhere."""
    return ("peak_gpu_mb", "GPU memory") if on_gpu else ("peak_rss_mb", "RSS")


def gpu_column(row: dict) -> str:
    """A side's peak GPU memory, 13 wide; a dash on a CPU."""
    return f"{'-':>13}" if row["peak_gpu_mb"] is None else f"{row['peak_gpu_mb']:>13.0f}"


def last_metric(text: str, key: str) -> float:
    """The last value of `key` in a transformers log line (`{'loss': '1.23', ...}`)."""
    values = re.findall(rf"'{re.escape(key)}': '?([0-9.e+-]+)'?", text)
    return float(values[-1])


def llmtune_train_runtime(out: Path) -> tuple[dict, float]:
    """An `llmtune train` output's manifest section and the trainer's own train_runtime, the figure TRL prints:
    both sides are timed alike (llmtune's own `train_seconds` also covers `trainer.train()`'s set-up)."""
    manifest = json.loads((out / "manifest.json").read_text())["train"]
    # Every step's log carries the running train_runtime; the last entry is the whole run.
    return manifest, [r["train_runtime"] for r in manifest["log"] if "train_runtime" in r][-1]


def model_folder(model: str, tokenizer: str = DEFAULT_TOKENIZER) -> Path:
    """`builtin:NAME`, `random:ARCHITECTURE` (see random_model_folder) or a local model folder."""
    from llmtune.builtin_models import ensure_builtin

    if model.startswith("random:"):
        return random_model_folder(model.removeprefix("random:"), tokenizer)
    return ensure_builtin(model.removeprefix("builtin:")) if model.startswith("builtin:") else Path(model)


def random_model_folder(architecture: str, tokenizer: str = DEFAULT_TOKENIZER) -> Path:
    """A real-size model with no download: random bf16 weights in the shape of a published architecture
    (llmtune.memory.KNOWN_CONFIGS, e.g. meta-llama/Llama-3.1-8B-Instruct) or of a local model folder's config,
    with `tokenizer`'s tokenizer and chat template. Built on the GPU when there is one; cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtune.atomic import atomic_folder
    from llmtune.builtin_models import cache_dir
    from llmtune.memory import KNOWN_CONFIGS, architecture_config

    if architecture.startswith("builtin:"):
        model_folder(architecture)  # built on first use: its config is there then
    config = architecture_config(architecture)
    if config is None:
        sys.exit(f"random:{architecture}: not a model folder nor one of {', '.join(KNOWN_CONFIGS)}")
    target = cache_dir() / "random" / re.sub(r"[^A-Za-z0-9.-]+", "_", f"{architecture}--{Path(tokenizer).name}")
    if (target / "config.json").is_file():
        return target
    tokens = AutoTokenizer.from_pretrained(model_folder(tokenizer))
    if len(tokens) > config.vocab_size:
        sys.exit(f"{tokenizer} has {len(tokens)} tokens, more than {architecture}'s vocabulary of {config.vocab_size}")
    config.eos_token_id = config.pad_token_id = tokens.eos_token_id
    config.bos_token_id = tokens.bos_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with atomic_folder(target, replace=False) as staging:
        model.save_pretrained(staging)
        tokens.save_pretrained(staging)
    return target


def matmul_peak_gflops(dtype_name: str = "bfloat16", seconds: float = 3.0) -> float:
    """Best sustained GEMM rate of the device training runs on (the GPU if any), now, in the given dtype: the MFU
    denominator."""
    import torch

    on_gpu = torch.cuda.is_available()
    size = 8192 if on_gpu else 2048
    dtype, device = getattr(torch, dtype_name), "cuda" if on_gpu else "cpu"
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    repeats = 10 if on_gpu else 1  # one GPU product is too short to time on its own
    for _ in range(3):
        a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if on_gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if on_gpu:
            torch.cuda.synchronize()
        best = max(best, repeats * 2 * size**3 / (time.perf_counter() - started) / 1e9)
    del a, b
    if on_gpu:
        torch.cuda.empty_cache()
    return best


@functools.cache
def _judge_base(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map=device).eval()


def heldout_loss(model_dir: Path, adapter_dir: Path, rows: list[dict]) -> float:
    """Mean completion-token NLL of base + adapter on prompt/completion rows, in fp32: one judge for every side
    (the base is loaded once, on the GPU if there is one)."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(_judge_base(model_dir), adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
            prompt_len = len(tokenizer(prompt, add_special_tokens=False).input_ids)
            ids = torch.tensor([tokenizer(full, add_special_tokens=False).input_ids], device=model.device)
            labels = ids.clone()
            labels[:, :prompt_len] = -100
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
            total += nll.item()
            count += int((target != -100).sum())
    model.unload()  # takes the adapter's layers out again: the cached base stays clean for the next side
    return total / count


def write_results(name: str, results_dir: Path, payload: dict) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"{name}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out
