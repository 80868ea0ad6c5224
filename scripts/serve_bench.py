"""`jaxsink serve` under 1, 4 and 16 concurrent streaming clients, next to `jaxsink generate`.

Starts `jaxsink serve --max-batch 16` on the default model (or --model) as a real process, then
for each client count runs a round in which every client sends one streaming completion (a
different prompt each, greedy, `--max-tokens` new tokens, no early stop) at once. Per round:
aggregate tok/s (all completion tokens / the round's wall time), time to first token (request
sent to first text event; median and max) and each client's own tok/s after its first token.
The single-stream figure is `jaxsink generate --json` on the same machine, in the same run.

    python scripts/serve_bench.py                  # writes docs/results/serve_bench.json
    python scripts/serve_bench.py --clients 1 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The lighthouse keeper climbed the stairs and",
    "Explain how a steam engine works.",
    "The history of the Roman Empire began",
    "List some facts about octopuses:",
    "A recipe for bread starts with",
    "The most important invention of the 20th century was",
    "Describe the water cycle.",
    "In the year 3000, cities will",
    "The rules of chess are",
    "The sky is blue because",
    "A letter to a friend who moved away:",
    "The best advice I ever received was",
    "How do vaccines work?",
    "Once upon a time in a small village,",
    "The planets of the solar system are",
    "To learn to play the guitar, you should",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jaxsink_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxsink.cli", *args]


def start_server(model: str | None, max_batch: int, port: int) -> subprocess.Popen:
    argv = jaxsink_argv("serve", "--port", str(port), "--max-batch", str(max_batch), "--quiet")
    if model:
        argv += ["--model", model]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"serve_bench: the server exited: {proc.stderr.read().strip()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("serve_bench: the server did not start within 600 s")


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: its tokens, time to first token and end, from sending."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "logprobs": 0,  # the events carry their tokens: count them exactly
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            got = len((choice.get("logprobs") or {}).get("tokens") or [])
            if got and first is None:
                first = time.perf_counter() - start
            tokens += got
    return {"tokens": tokens, "ttft_s": first, "total_s": time.perf_counter() - start}


def run_round(url: str, clients: int, max_tokens: int) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: one_request(url, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_s"] for r in results]
    per_client = [
        (r["tokens"] - 1) / (r["total_s"] - r["ttft_s"]) for r in results if r["tokens"] > 1
    ]
    return {
        "clients": clients,
        "completion_tokens": tokens,
        "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(ttft),
        "ttft_max_s": max(ttft),
        "per_client_tokens_per_s_median": statistics.median(per_client),
    }


def generate_figure(model: str | None, max_tokens: int) -> dict:
    argv = jaxsink_argv("generate", "--prompt", PROMPTS[0], "--max-new-tokens", str(max_tokens))
    argv += ["--json", "--quiet"]
    if model:
        argv += ["--model", model]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    return {
        "decode_tokens_per_s": report["decode_tokens_per_s"],
        "time_to_first_token_s": report["time_to_first_token_s"],
        "new_tokens": report["new_tokens"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="default: the default model")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "docs/results/serve_bench.json"))
    args = p.parse_args()

    single = generate_figure(args.model, args.max_tokens)
    print(
        f"jaxsink generate (one stream): {single['decode_tokens_per_s']:.1f} tok/s, "
        f"first token {single['time_to_first_token_s'] * 1000:.0f} ms"
    )
    port = free_port()
    server = start_server(args.model, args.max_batch, port)
    url = f"http://127.0.0.1:{port}"
    try:
        one_request(url, PROMPTS[0], 4)  # the first request pays any remaining warm-up
        rounds = []
        for clients in args.clients:
            r = run_round(url, clients, args.max_tokens)
            rounds.append(r)
            print(
                f"{clients:>3} clients: {r['aggregate_tokens_per_s']:7.1f} tok/s aggregate, "
                f"first token median {r['ttft_median_s'] * 1000:6.0f} ms "
                f"(max {r['ttft_max_s'] * 1000:.0f}), per client "
                f"{r['per_client_tokens_per_s_median']:.1f} tok/s"
            )
    finally:
        server.terminate()
        server.wait(60)
    result = {
        "model": args.model or "SmolLM2-135M-Instruct (default)",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min_at_end": os.getloadavg()[0],  # other work on a shared machine
        "max_batch": args.max_batch,
        "max_tokens": args.max_tokens,
        "generate_single_stream": single,
        "serve": rounds,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
