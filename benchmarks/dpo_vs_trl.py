"""DPO side by side: `llmtune train` vs `trl dpo` (TRL's own script, its defaults), same model, data and LoRA.

    python benchmarks/dpo_vs_trl.py [--model builtin:smollm2-135m-instruct] [--steps 8] [--rounds 2]

Both sides train a fresh LoRA (r=16, alpha=32, all-linear) from the base with DPO (sigmoid, beta 0.1) on
`recipes/clinical-qa/data/prefs.jsonl`, batch 4, for the same number of optimizer steps, in alternation
(trl, llmtune, trl, llmtune, ...) so that machine noise hits both. Reported per side: optimizer steps/s from
the trainer's own `train_runtime` (start-up excluded), wall time of the whole command, peak RSS
(/usr/bin/time), and the final logged loss. Written to benchmarks/results/dpo_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, last_metric, model_folder, timed, write_results

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
    result, wall, rss = timed(command, env)
    text = result.stdout + result.stderr
    return {"steps_per_s": steps / last_metric(text, "train_runtime"), "wall_s": wall, "peak_rss_mb": rss,
            "final_loss": last_metric(text, "loss")}


def run_llmtune(model: str, out: Path, steps: int, env: dict[str, str]) -> dict:
    recipe = out.parent / f"{out.name}.yaml"
    recipe.write_text(json.dumps({
        "method": "dpo", "output_dir": str(out), "model": {"name_or_path": model},
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": [{"path": str(PREFS)}], "max_length": 512},
        "train": {"max_steps": steps, "batch_size": 4, "learning_rate": 1e-6, "logging_steps": 1},
    }))
    _, wall, rss = timed([sys.executable, "-m", "llmtune", "train", str(recipe)], env)
    manifest = json.loads((out / "manifest.json").read_text())
    # Every step's log carries the running train_runtime; the last entry is the whole run.
    runtime = [r["train_runtime"] for r in manifest["train"]["log"] if "train_runtime" in r][-1]
    return {"steps_per_s": steps / runtime, "wall_s": wall, "peak_rss_mb": rss,
            "final_loss": manifest["train"]["final_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results", help="Folder for the JSON.")
    args = parser.parse_args()

    model_dir = model_folder(args.model)
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
        results["llmtune"].append(run_llmtune(args.model, work / f"llmtune-{i}", args.steps, env))

    summary = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    trl = summary["trl dpo (defaults)"]
    ratios = {name: {"steps_per_s": row["steps_per_s"] / trl["steps_per_s"],
                     "peak_rss": row["peak_rss_mb"] / trl["peak_rss_mb"]}
              for name, row in summary.items() if name != "trl dpo (defaults)"}
    print(f"DPO, {args.model}, LoRA r16 all-linear, batch 4, {args.steps} steps, median of {args.rounds} rounds")
    print(f"{'side':<22}{'steps/s':>9}{'wall s':>9}{'peak RSS MB':>13}{'final loss':>12}")
    for name, row in summary.items():
        print(f"{name:<22}{row['steps_per_s']:>9.3f}{row['wall_s']:>9.1f}{row['peak_rss_mb']:>13.0f}"
              f"{row['final_loss']:>12.4f}")
    for name, ratio in ratios.items():
        print(f"{name} / trl: steps/s x{ratio['steps_per_s']:.2f}, peak RSS x{ratio['peak_rss']:.2f}")
    write_results("dpo_vs_trl", args.results, {"model": args.model, "steps": args.steps, "rounds": results,
                                              "summary": summary, "ratios_vs_trl": ratios})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
