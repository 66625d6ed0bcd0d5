"""`llmtune synth` throughput against a teacher with fixed latency, at several concurrency limits.

    python benchmarks/synth_concurrency.py [--items 64] [--latency-ms 100] [--concurrency 1 4 16]

The teacher is a loopback OpenAI-compatible server (tests/teacher_server.py) that answers every request after a
fixed delay, like a remote endpoint whose time is spent generating. Each configuration runs the same
self-instruct job (two requests per item) through the real pipeline: openai client, journal, filters,
decontamination. Reports items/s, requests/s, the server-side peak of requests in flight, and the speed-up over
concurrency 1; written to benchmarks/results/synth_concurrency.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llmtune.synth.recipe import SynthSection  # noqa: E402
from llmtune.synth.run import synthesize  # noqa: E402
from tests.teacher_server import TeacherServer  # noqa: E402

SEEDS = REPO / "recipes" / "clinical-qa" / "data" / "questions.jsonl"


def run_once(url: str, folder: Path, items: int, concurrency: int) -> dict:
    seeds = folder / "seeds.jsonl"
    if not seeds.exists():
        rows = [json.loads(line) for line in SEEDS.read_text().splitlines() if line.strip()]
        texts = [r.get("question") or r["messages"][-1]["content"] for r in rows]
        seeds.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in texts))
    section = SynthSection.model_validate({
        "output_dir": str(folder / f"out-c{concurrency}-{items}"),
        "teacher": {"base_url": url, "model": "teacher", "max_concurrency": concurrency},
        "methods": [{"kind": "self_instruct", "seeds": str(seeds), "num_items": items, "batch_size": items}],
        "filters": {"near_duplicates": None},
    })
    report = synthesize(section)
    return {"items": report["new_items"], "requests": report["tokens"].get("requests", 0), "wall_s": report["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    server = TeacherServer(latency_s=args.latency_ms / 1000)
    url = server.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_once(url, Path(tmp), 4, max(args.concurrency))  # warm-up: imports, client, first connections
            for concurrency in args.concurrency:
                server.peak_in_flight = 0
                result = run_once(url, Path(tmp), args.items, concurrency)
                rows.append({"concurrency": concurrency, **result,
                             "items_per_s": round(result["items"] / result["wall_s"], 2),
                             "requests_per_s": round(result["requests"] / result["wall_s"], 2),
                             "peak_in_flight": server.peak_in_flight})
    finally:
        server.stop()
    base = rows[0]["items_per_s"]
    print(f"teacher latency {args.latency_ms:g} ms per request, {args.items} self-instruct items (2 requests each)")
    print(f"{'concurrency':>11} {'items/s':>8} {'requests/s':>10} {'peak in flight':>14} {'speed-up':>8}")
    for row in rows:
        row["speedup"] = round(row["items_per_s"] / base, 2)
        print(f"{row['concurrency']:>11} {row['items_per_s']:>8.2f} {row['requests_per_s']:>10.2f} "
              f"{row['peak_in_flight']:>14} {row['speedup']:>7.2f}x")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "synth_concurrency.json"
    out.write_text(json.dumps({"latency_ms": args.latency_ms, "items": args.items, "rows": rows}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
