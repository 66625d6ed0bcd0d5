"""`llmtune serve` throughput at concurrency 1, 4 and 16, with dynamic batching on and off.

    python benchmarks/serve_throughput.py [--model builtin:smollm2-135m-instruct] [--requests 32] [--tokens 32]

Each configuration starts its own server process (loopback, random port), warms it up, then sends the same
chat requests (greedy, fixed max_tokens) through the official openai client from N threads. Batching off is
`--max-batch-size 1`: the same server, one request per forward pass. Reports requests/s and completion
tokens/s; written to benchmarks/results/serve_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "recipes" / "clinical-qa" / "data" / "questions.jsonl"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llmtune", "serve", model, "--port", str(port), "--max-batch-size", str(max_batch_size)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            httpx.get(f"{base_url}/models").raise_for_status()
            return process, base_url
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    sys.exit("server did not start")


def measure(base_url: str, model: str, prompts: list[list[dict]], concurrency: int, tokens: int) -> dict:
    client = OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)

    def ask(messages) -> int:
        reply = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=tokens)
        return reply.usage.completion_tokens

    ask(prompts[0])  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        produced = sum(pool.map(ask, prompts))
    elapsed = time.perf_counter() - started
    return {"requests_per_s": len(prompts) / elapsed, "tokens_per_s": produced / elapsed, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results", help="Folder for the JSON.")
    args = parser.parse_args()

    questions = [json.loads(line)["messages"] for line in QUESTIONS.read_text().splitlines()]
    prompts = [questions[i % len(questions)] for i in range(args.requests)]
    served_name = args.model
    results: dict[str, dict[str, dict]] = {}
    for label, batch_size in (("batching on", 16), ("batching off", 1)):
        process, base_url = start_server(args.model, batch_size)
        try:
            results[label] = {str(c): measure(base_url, served_name, prompts, c, args.tokens) for c in (1, 4, 16)}
        finally:
            process.terminate()
            process.wait(timeout=60)

    print(f"llmtune serve, {args.model}, {args.requests} chat requests x {args.tokens} new tokens, greedy")
    print(f"{'':<14}" + "".join(f"{'c=' + c:>22}" for c in ("1", "4", "16")))
    for label, rows in results.items():
        cells = "".join(f"{r['requests_per_s']:>9.2f} req/s {r['tokens_per_s']:>6.1f} t/s" for r in rows.values())
        print(f"{label:<14}{cells}")
    ratio = results["batching on"]["16"]["requests_per_s"] / results["batching off"]["16"]["requests_per_s"]
    print(f"at concurrency 16, batching on / off: x{ratio:.2f} requests/s")
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_throughput.json").write_text(json.dumps(
        {"model": args.model, "requests": args.requests, "tokens": args.tokens, "results": results,
         "ratio_batching_at_16": ratio}, indent=2))


if __name__ == "__main__":
    main()
