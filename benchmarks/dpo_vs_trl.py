"""DPO side by side: `llmtune train` vs `trl dpo` (TRL's own script, its defaults), same model, data and LoRA.

    python benchmarks/dpo_vs_trl.py [--model builtin:smollm2-135m-instruct] [--steps 8] [--rounds 2]

On a GPU, `--model random:meta-llama/Llama-3.1-8B-Instruct` runs the real 8B shape with random bf16 weights.

Both sides train a fresh LoRA (r=16, alpha=32, all-linear) from the base with DPO (sigmoid, beta 0.1) on
`recipes/clinical-qa/data/prefs.jsonl`, batch 4, for the same number of optimizer steps, in alternation
(trl, llmtune, trl, llmtune, ...) so that machine noise hits both. Reported per side: optimizer steps/s from
the trainer's own `train_runtime` (start-up excluded), wall time of the whole command, peak RSS
(wait4, as /usr/bin/time reads it) and on a GPU the peak device memory the command added (NVML), and the final
logged loss. Written to benchmarks/results/dpo_vs_trl[-gpu].json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    DEFAULT_TOKENIZER,
    REPO,
    gpu_column,
    last_metric,
    llmtune_train_runtime,
    median,
    model_folder,
    peak_memory,
    timed,
    write_results,
)

PREFS = REPO / "recipes" / "clinical-qa" / "data" / "prefs.jsonl"


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_trl(model_dir: Path, data_dir: Path, out: Path, steps: int, env: dict[str, str]) -> dict:
    command = [
        sys.executable, "-m", "trl.scripts.dpo", "--model_name_or_path", str(model_dir),
        "--dataset_name", str(data_dir), "--output_dir", str(out), "--max_steps", str(steps),
        "--per_device_train_batch_size", "4", "--use_peft", "--lora_r", "16", "--lora_alpha", "32",
        "--lora_target_modules", "all-linear", "--report_to", "none", "--save_strategy", "no",
        "--logging_steps", "1", "--max_length", "512",
        # The one flag a CPU user must add: without it TRL's defaults (bf16) stop with "doesn't support bf16/gpu".
        *(["--use_cpu"] if not torch_cuda_available() else []),
    ]
    run = timed(command, env)
    text = run.stdout + run.stderr
    return {"steps_per_s": steps / last_metric(text, "train_runtime"), "wall_s": run.wall_s,
            "peak_rss_mb": run.peak_rss_mb, "peak_gpu_mb": run.peak_gpu_mb, "final_loss": last_metric(text, "loss")}


def run_llmtune(model_dir: Path, out: Path, steps: int, env: dict[str, str]) -> dict:
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(json.dumps({
        "method": "dpo", "output_dir": str(out), "model": {"name_or_path": str(model_dir)},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(PREFS)}], "max_length": 512},
        "train": {"max_steps": steps, "batch_size": 4, "learning_rate": 1e-6, "logging_steps": 1},
    }))
    run = timed([sys.executable, "-m", "llmtune", "train", str(recipe)], env)
    manifest, runtime = llmtune_train_runtime(out)
    return {"steps_per_s": steps / runtime, "wall_s": run.wall_s, "peak_rss_mb": run.peak_rss_mb,
            "peak_gpu_mb": run.peak_gpu_mb, "final_loss": manifest["final_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="Tokenizer (and chat template) of a random:ARCHITECTURE model.")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results", help="Folder for the JSON.")
    args = parser.parse_args()

    model_dir = model_folder(args.model, args.tokenizer)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    data_dir = work / "prefs"
    data_dir.mkdir()
    # The same pairs in the form TRL expects for conversational data (answers as message lists too).
    with open(PREFS) as source, open(data_dir / "train.jsonl", "w") as target:
        for line in source:
            row = json.loads(line)
            for side in ("chosen", "rejected"):
                row[side] = [{"role": "assistant", "content": row[side]}]
            target.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n")

    results: dict[str, list[dict]] = {"trl dpo (defaults)": [], "llmtune": []}
    for i in range(args.rounds):
        results["trl dpo (defaults)"].append(run_trl(model_dir, data_dir, work / f"trl-{i}", args.steps, env))
        results["llmtune"].append(run_llmtune(model_dir, work / f"llmtune-{i}", args.steps, env))

    summary = {name: {k: median([r[k] for r in runs]) for k in runs[0]} for name, runs in results.items()}
    trl = summary["trl dpo (defaults)"]
    memory, memory_name = peak_memory(on_gpu=trl["peak_gpu_mb"] is not None)
    ratios = {name: {"steps_per_s": row["steps_per_s"] / trl["steps_per_s"], "peak_memory": row[memory] / trl[memory]}
              for name, row in summary.items() if name != "trl dpo (defaults)"}
    print(f"DPO, {args.model}, LoRA r16 all-linear, batch 4, {args.steps} steps, median of {args.rounds} rounds")
    print(f"{'side':<22}{'steps/s':>9}{'wall s':>9}{'peak RSS MB':>13}{'peak GPU MB':>13}{'final loss':>12}")
    for name, row in summary.items():
        print(f"{name:<22}{row['steps_per_s']:>9.3f}{row['wall_s']:>9.1f}{row['peak_rss_mb']:>13.0f}{gpu_column(row)}"
              f"{row['final_loss']:>12.4f}")
    for name, ratio in ratios.items():
        print(f"{name} / trl: steps/s x{ratio['steps_per_s']:.2f}, peak {memory_name} x{ratio['peak_memory']:.2f}")
    write_results(f"dpo_vs_trl{'-gpu' if memory == 'peak_gpu_mb' else ''}", args.results, {
        "model": args.model, "steps": args.steps, "rounds": results, "summary": summary, "ratios_vs_trl": ratios})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
