"""`llmtune eval` MCQ scoring vs lm-evaluation-harness on the same model, task and items, side by side.

    python benchmarks/eval_vs_lm_eval.py [--model builtin:smollm2-135m-instruct] [--items 110] [--rounds 2]

The task is the clinical MCQ eval set (recipes/clinical-qa/data/eval/clinical-mcq.jsonl), plain format; lm-eval
scores our exported copy of it (`llmtune eval --export-harness`), so both sides see the same contexts and
continuations. Sides alternate, after a warm-up of each; both use batch size 8 on the CPU in fp32. Reports
items/s, the ratio, and both accuracies (they must agree); written to benchmarks/results/eval_vs_lm_eval.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / "recipes" / "clinical-qa" / "data" / "eval" / "clinical-mcq.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--items", type=int, default=110)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    from llmtune.eval.harness import export_tasks, harness_task_name, run_harness
    from llmtune.eval.recipe import EvalSection
    from llmtune.eval.run import evaluate

    tmp = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    try:
        rows = [line for line in DATA.read_text().splitlines() if line.strip()][: args.items]
        data = tmp / "clinical_mcq.jsonl"
        data.write_text("\n".join(rows) + "\n")

        def section(name: str) -> EvalSection:
            return EvalSection(output_dir=tmp / name, models=[{"name": "model", "path": args.model}],
                               tasks=[{"name": "clinical_mcq", "kind": "mcq", "path": data, "prompt": "plain"}],
                               batch_size=8)

        export_tasks(section("export").tasks, tmp / "harness")
        task = harness_task_name(section("export").tasks[0])

        def ours(run: str) -> tuple[float, float]:
            started = time.perf_counter()
            report = evaluate(section(run))
            return time.perf_counter() - started, report["results"]["clinical_mcq"]["model"]["metrics"]["acc"]["mean"]

        def theirs() -> tuple[float, float]:
            started = time.perf_counter()
            output = run_harness(section("harness-run"), [task], include_path=tmp / "harness")
            return time.perf_counter() - started, output["model"]["results"][task]["acc,none"]

        ours("warm"), theirs()  # warm-up: imports, model files in the page cache
        timings: dict[str, list[float]] = {"llmtune": [], "lm-eval": []}
        accuracy: dict[str, float] = {}
        for round_index in range(args.rounds):
            seconds, accuracy["llmtune"] = ours(f"round{round_index}")  # a fresh folder: nothing resumed
            timings["llmtune"].append(seconds)
            seconds, accuracy["lm-eval"] = theirs()
            timings["lm-eval"].append(seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(rows)
    rate = {side: n / min(values) for side, values in timings.items()}  # best round: least disturbed by noise
    print(f"{args.model}, {n} clinical MCQ items x 4 options, batch 8, best of {args.rounds} rounds (model load incl.)")
    print(f"{'side':<10} {'items/s':>8} {'accuracy':>9}")
    for side in timings:
        print(f"{side:<10} {rate[side]:>8.2f} {accuracy[side]:>9.4f}")
    print(f"llmtune / lm-eval items/s: x{rate['llmtune'] / rate['lm-eval']:.2f}; same accuracy: "
          f"{abs(accuracy['llmtune'] - accuracy['lm-eval']) < 1e-9}")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "eval_vs_lm_eval.json"
    out.write_text(json.dumps({"model": args.model, "items": n, "timings_s": timings, "items_per_s": rate,
                               "accuracy": accuracy}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
