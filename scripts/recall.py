"""StreamEval-style recall: can the model still read a fact that lies N tokens back?

After the StreamEval test of the StreamingLLM paper: a fact, more text, then a question about
the fact; the answer's digits are decoded greedily and compared with the key. The *distance* of
a query is the number of tokens from the fact's first token to the question's last token (the
one whose logits give the first answer token): the fact lies entirely inside the window iff
distance <= W. Every query is an independent stream (nothing of any other query in it).

Two tasks (`--task`):

- `passkey` (default): one fact, `The pass key is 52586. Remember it. 52586 is the pass key.`,
  after a short instruction and some filler, followed by filler sentences ("The grass is green.
  The sky is blue. ...") and `What is the pass key? The pass key is`. Distance varies with the
  amount of filler after the fact; `--trials` streams with different keys (and offsets).
- `lines`: StreamEval proper, a list of numbered facts (`line 37: the key is 4821.`), then
  `What is the key of line 37? The key is`; which line is asked varies the distance. SmolLM2-135M
  cannot do this even with the whole list in view (dense accuracy ~0-10% at any distance: it
  answers with a number that occurs often), so it measures nothing for the default model; it is
  here for larger models (`--model`).

Configurations (same streams, same queries): sink S = 4, W = 1020; sink S = 4, W = 252 (the cliff
at a smaller window edge); each of them under every eviction policy of `--policies` (`sink`,
the ring; `tova` and `h2o`, eviction by attention at the same K: docs/streaming-contract.md);
dense (no eviction, the ceiling; the streams stay well within SmolLM2's trained 8,192 context).

Attention sinks keep the model *fluent* past the window; they do not let it *remember* what
left the window. The expected, and honest, result is dense-like accuracy inside the window and
chance (~0) outside it.

How it runs: the streams of one trial share prefixes (passkey: the stream for a larger distance
extends the one for a smaller; lines: every query follows the same list), so each configuration
feeds the shared tokens once and every query starts from a copy of that cache (question chunk +
greedy decode with the jitted `entry.last_logits` / `entry.step`). Chunks are exact per token
(docs/streaming-contract.md), so this is the same computation as one `jaxsink.Generation` per query over the
stream + question, at a fraction of the cost; `--verify N` re-runs the first N queries of each
configuration as full `Generation`s and checks that the answer tokens agree.

Writes `docs/results/recall.json` and `docs/figures/recall.png`.

    python scripts/recall.py                # passkey, distances to 2,048, 3 x 32 queries/config
    python scripts/recall.py --task lines   # numbered facts (for larger models)
    python scripts/recall.py --quick        # a smoke run with small windows
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's jaxsink, however (or whether) it is installed

import jaxsink  # noqa: E402
from jaxsink.config import StreamConfig  # noqa: E402
from jaxsink.engine import padded_chunks  # noqa: E402
from jaxsink.traced import cache as kv  # noqa: E402
from jaxsink.traced import entry  # noqa: E402

LINES_HEADER = (
    "Below is a long list of lines. Each line has a number and a key. Remember the key of every "
    "line: you will be asked about one of them.\n\n"
)
LINES_QUESTION = "\nWhat is the key of line {line}? The key is"
PASSKEY_HEADER = (
    "There is an important pass key hidden inside a lot of irrelevant text. Find it and "
    "memorize it. I will quiz you about the pass key.\n"
)
PASSKEY_FACT = "The pass key is {key}. Remember it. {key} is the pass key.\n"
FILLER = [
    "The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.\n",
]
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclasses.dataclass
class Trial:
    """One stream of facts and the queries asked at cut points of it.

    ids: the stream's tokens; cuts: ascending stream lengths after which a question is asked
    (one per query); questions: the question ids of each query; keys: the expected key of each
    query; fact_starts / key_starts: the stream index of the asked fact's first token / its key's
    first token.
    """

    ids: np.ndarray
    cuts: list[int]
    questions: list[list[int]]
    keys: list[int]
    fact_starts: list[int]
    key_starts: list[int]
    labels: list[str]


def lines_trial(tokenizer, n_tokens: int, n_queries: int, seed: int) -> Trial:
    """StreamEval: numbered facts up to about n_tokens, then one question about a line; the
    asked lines are spread evenly over the list (all queries cut at the list's end)."""
    rng = np.random.default_rng(seed)
    ids = list(tokenizer.encode(LINES_HEADER, add_special_tokens=True))
    lines = []
    i = 1
    while len(ids) < n_tokens:
        key = int(rng.integers(1000, 10000))
        prefix = tokenizer.encode(f"line {i}: the key is ", add_special_tokens=False)
        lines.append((i, key, len(ids), len(ids) + len(prefix)))
        ids += tokenizer.encode(f"line {i}: the key is {key}.\n", add_special_tokens=False)
        i += 1
    asked = np.unique(np.linspace(0, len(lines) - 1, n_queries).round().astype(int))
    q = [
        tokenizer.encode(LINES_QUESTION.format(line=lines[a][0]), add_special_tokens=False)
        for a in asked
    ]
    return Trial(
        ids=np.asarray(ids, np.int32),
        cuts=[len(ids)] * len(asked),
        questions=q,
        keys=[lines[a][1] for a in asked],
        fact_starts=[lines[a][2] for a in asked],
        key_starts=[lines[a][3] for a in asked],
        labels=[f"line {lines[a][0]}" for a in asked],
    )


def passkey_trial(
    tokenizer, max_distance: int, spacing: int, trial: int, n_trials: int, seed: int
) -> Trial:
    """One pass key after a header and some filler, then filler up to max_distance; questions
    at distances spacing apart (offset by trial / n_trials of a spacing), cut at sentence ends."""
    rng = np.random.default_rng([seed, trial])
    key = int(rng.integers(10000, 100000))
    ids = list(tokenizer.encode(PASSKEY_HEADER, add_special_tokens=True))
    sentences = [tokenizer.encode(f, add_special_tokens=False) for f in FILLER]
    for j in range(len(FILLER) * 2 + trial):  # a trial-dependent amount of filler before
        ids += sentences[j % len(FILLER)]
    fact_start = len(ids)
    fact = PASSKEY_FACT.format(key=key)
    key_start = fact_start + len(
        tokenizer.encode(fact[: fact.index(str(key))], add_special_tokens=False)
    )
    ids += tokenizer.encode(fact, add_special_tokens=False)
    question = tokenizer.encode(PASSKEY_QUESTION, add_special_tokens=False)
    ends = [len(ids)]  # stream lengths at sentence ends, where a question may be asked
    j = 0
    while ends[-1] + len(question) - 1 - fact_start < max_distance + spacing:
        ids += sentences[j % len(FILLER)]
        ends.append(len(ids))
        j += 1
    distance_at = np.asarray(ends) + len(question) - 1 - fact_start
    cuts = []
    target = spacing // 2 + trial * spacing // n_trials
    while target <= max_distance:
        cut = ends[int(np.argmin(np.abs(distance_at - target)))]
        if not cuts or cut > cuts[-1]:
            cuts.append(cut)
        target += spacing
    n = len(cuts)
    return Trial(
        ids=np.asarray(ids[: cuts[-1]], np.int32),
        cuts=cuts,
        questions=[question] * n,
        keys=[key] * n,
        fact_starts=[fact_start] * n,
        key_starts=[key_start] * n,
        labels=[f"trial {trial}"] * n,
    )


def copy_cache(cache: kv.KVCache) -> kv.KVCache:
    """A fresh copy (the jitted steps donate the cache they are given)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), cache)


def feed(model, cache: kv.KVCache, ids: np.ndarray, chunk: int) -> kv.KVCache:
    """The cache after feeding `ids` in chunks of `chunk` (the last one padded and masked)."""
    for tokens, valid, _ in padded_chunks(ids, chunk):
        _, cache = entry.last_logits(model.weights, cache, tokens, valid, graphdef=model.graphdef)
    return jax.block_until_ready(cache)


def answer(model, cache: kv.KVCache, q_ids: list[int], q_len: int, n_answer: int) -> list[int]:
    """Greedy answer tokens for one question asked on a copy of `cache` (an independent stream)."""
    cache = copy_cache(cache)
    tokens, valid, _ = next(padded_chunks(q_ids, q_len))
    logits, cache = entry.last_logits(model.weights, cache, tokens, valid, graphdef=model.graphdef)
    out = [int(np.argmax(np.asarray(logits)[0]))]
    one = np.ones((1, 1), bool)
    for _ in range(n_answer - 1):
        token = np.asarray([[out[-1]]], np.int32)
        logits, cache = entry.step(model.weights, cache, token, one, graphdef=model.graphdef)
        out.append(int(np.argmax(np.asarray(logits)[0, 0])))
    return out


def parse_key(text: str) -> int | None:
    m = re.search(r"\d+", text)
    return int(m.group()) if m else None


def verify(model, prompt_ids, stream: StreamConfig, n_answer, expected) -> bool:
    """The same query as a plain `jaxsink.Generation` over stream + question: same tokens?"""
    gen = jaxsink.Generation(
        model,
        prompt_ids,
        max_new_tokens=n_answer,
        mode=stream.mode,
        sinks=stream.sinks,
        window=stream.window,
        policy=stream.policy,
        recent=stream.recent or None,
        chunk=64,
    )
    for _ in gen:
        pass
    return gen.token_ids == expected[: len(gen.token_ids)]


def run_config(model, trials, stream, q_len, n_answer, chunk, verify_n) -> list[dict]:
    """Every query of every trial under one cache configuration."""
    tok = model.tokenizer
    queries = []
    for trial in trials:
        cache = kv.init_cache(model.cfg, stream, 1, model.dtype)
        fed = 0
        for cut, q_ids, key, fact_start, key_start, label in zip(
            trial.cuts,
            trial.questions,
            trial.keys,
            trial.fact_starts,
            trial.key_starts,
            trial.labels,
            strict=True,
        ):
            if cut > fed:
                cache = feed(model, cache, trial.ids[fed:cut], chunk)
                fed = cut
            out = answer(model, cache, q_ids, q_len, n_answer)
            text = tok.decode(out, skip_special_tokens=True)
            t_query = cut + len(q_ids) - 1
            got = parse_key(text)
            q = {
                "asked": label,
                "key": key,
                "answer_text": text,
                "answer": got,
                "correct": got == key,
                "distance": t_query - fact_start,
                "key_distance": t_query - key_start,
                "stream_tokens": t_query + 1,
            }
            if len(queries) < verify_n:
                prompt = [*trial.ids[:cut].tolist(), *q_ids]
                q["verified_as_generation"] = verify(model, prompt, stream, n_answer, out)
            queries.append(q)
    return queries


def plot(results: dict, path: str, title: str, bin_tokens: int) -> None:
    """Accuracy per distance bin for each configuration; each query as a tick at 0 or 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = [
        f"tab:{c}"
        for c in (
            "blue",
            "orange",
            "green",
            "red",
            "purple",
            "brown",
            "pink",
            "gray",
            "olive",
            "cyan",
        )
    ]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for n, ((label, r), c) in enumerate(zip(results.items(), colors, strict=False)):
        d = np.array([q["distance"] for q in r["queries"]])
        ok = np.array([q["correct"] for q in r["queries"]], float)
        bins = [b for b in r["bins"] if b["n"]]
        x = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.plot(x, [b["accuracy"] for b in bins], marker="o", ms=4, color=c, label=label)
        offset = 0.025 * (n - 1)  # keep the configurations' ticks apart
        ax.scatter(d, ok + offset, s=14, color=c, alpha=0.5, marker="|")
        if r["mode"] == "sink":
            ax.axvline(r["window"], color=c, ls="--", lw=1)
            ax.text(r["window"], 0.45, f" W = {r['window']}", color=c, fontsize=8, rotation=90)
    ax.set_xlabel("distance: tokens from the fact's first token to the question's last")
    ax.set_ylabel(f"accuracy (per {bin_tokens}-token bin)\nticks at 0 / 1: single queries")
    ax.set_ylim(-0.1, 1.1)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model spec for jaxsink.load (default SmolLM2)")
    p.add_argument("--task", choices=("passkey", "lines"), default="passkey")
    p.add_argument("--max-distance", type=int, default=2048, help="passkey: largest distance")
    p.add_argument("--spacing", type=int, default=64, help="passkey: distance between queries")
    p.add_argument("--trials", type=int, default=3, help="passkey: streams (keys) per config")
    p.add_argument("--stream-tokens", type=int, default=3072, help="lines: length of the list")
    p.add_argument("--queries", type=int, default=96, help="lines: queries per configuration")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--windows", default="1020,252", help="W of each sink-mode configuration")
    p.add_argument(
        "--policies", default="sink,tova,h2o", help="eviction policies of each sink configuration"
    )
    p.add_argument("--no-dense", action="store_true", help="skip the dense ceiling")
    p.add_argument("--chunk", type=int, default=64, help="prefill chunk length")
    p.add_argument("--bin", type=int, default=128, help="distance bin width (tokens)")
    p.add_argument("--verify", type=int, default=1, help="queries per config re-run as Generation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: distances to 400, W 124 / 60")
    p.add_argument("--out-json", default=None, help="default docs/results/recall[_lines].json")
    p.add_argument("--out-png", default=None, help="default docs/figures/recall[_lines].png")
    args = p.parse_args(argv)
    stem = "recall" if args.task == "passkey" else "recall_lines"
    if args.quick:
        args.max_distance, args.spacing, args.trials, args.windows = 400, 48, 2, "124,60"
        args.stream_tokens, args.queries, args.bin = 600, 12, 32
        stem += "_quick"
    out_json = Path(args.out_json or ROOT / f"docs/results/{stem}.json")
    out_png = Path(args.out_png or ROOT / f"docs/figures/{stem}.png")
    wall = time.perf_counter()

    model = jaxsink.load(args.model)
    tok = model.tokenizer
    if args.task == "passkey":
        trials = [
            passkey_trial(tok, args.max_distance, args.spacing, j, args.trials, args.seed)
            for j in range(args.trials)
        ]
        n_answer = 7  # " " + 5 digits + "."
    else:
        trials = [lines_trial(tok, args.stream_tokens, args.queries, args.seed)]
        n_answer = 6  # " " + 4 digits + "."
    q_len = -(-max(len(q) for t in trials for q in t.questions) // 8) * 8
    longest = max(t.cuts[-1] for t in trials) + q_len + n_answer
    configs = [
        (
            f"{policy} S={args.sinks} W={int(w)}",
            StreamConfig.for_mode("sink", args.sinks, int(w), policy=policy),
        )
        for w in args.windows.split(",")
        for policy in args.policies.split(",")
    ]
    if not args.no_dense:
        capacity = -(-longest // args.chunk) * args.chunk
        configs.append(("dense", StreamConfig.for_mode("dense", dense_capacity=capacity)))
    n_queries = sum(len(t.cuts) for t in trials)
    print(
        f"{model.path.name}: task {args.task}, {len(trials)} stream(s) of up to "
        f"{max(len(t.ids) for t in trials)} tokens, {n_queries} queries per configuration",
        file=sys.stderr,
    )

    results = {}
    for label, stream in configs:
        t0 = time.perf_counter()
        traces = sum(entry.TRACES.values())
        queries = run_config(model, trials, stream, q_len, n_answer, args.chunk, args.verify)
        seconds = time.perf_counter() - t0
        edges = np.arange(0, max(q["distance"] for q in queries) + args.bin, args.bin)
        bins = []
        for lo, hi in itertools.pairwise(edges):
            sel = [q["correct"] for q in queries if lo <= q["distance"] < hi]
            bins.append(
                {
                    "lo": int(lo),
                    "hi": int(hi),
                    "n": len(sel),
                    "accuracy": float(np.mean(sel)) if sel else None,
                }
            )
        edge = stream.window if stream.mode == "sink" else None
        inside = [q["correct"] for q in queries if edge is None or q["distance"] <= edge]
        outside = [q["correct"] for q in queries if edge is not None and q["distance"] > edge]
        results[label] = {
            "mode": stream.mode,
            "sinks": stream.sinks,
            "window": stream.window,
            "policy": stream.policy,
            "recent": stream.recent,
            "cache_bytes": kv.cache_bytes(model.cfg, stream, 1, model.dtype),
            "accuracy": float(np.mean([q["correct"] for q in queries])),
            "accuracy_inside_window": float(np.mean(inside)) if inside else None,
            "accuracy_outside_window": float(np.mean(outside)) if outside else None,
            "n_inside": len(inside),
            "n_outside": len(outside),
            "seconds": seconds,
            "compiles": sum(entry.TRACES.values()) - traces,
            "bins": bins,
            "queries": queries,
        }
        print(
            f"  {label}: accuracy {results[label]['accuracy']:.2f} in {seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    t0 = trials[0]
    summary = {
        "model": model.path.name,
        "dtype": str(model.dtype),
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "task": args.task,
        "streams": len(trials),
        "queries_per_config": n_queries,
        "example_stream_start": tok.decode(t0.ids[: t0.fact_starts[0] + 40]),
        "example_question": tok.decode(t0.questions[0]),
        "decoding": f"greedy, {n_answer} tokens, the first integer in the text is the answer",
        "distance": "question's last token index - the fact's first token index",
        "bin_tokens": args.bin,
        "configs": results,
        "wall_seconds": time.perf_counter() - wall,
        "command": " ".join(["python", "scripts/recall.py", *(argv or sys.argv[1:])]),
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(summary, indent=2) + "\n")
    plot(
        results,
        str(out_png),
        f"{model.path.name}: {args.task} recall against distance "
        f"({len(trials)} stream(s), {n_queries} queries per configuration)",
        args.bin,
    )

    labels = list(results)
    coarse = 128 if not args.quick else 32
    print(f"\naccuracy (n queries) per {coarse}-token distance span")
    print(f"{'distance':<12}" + "".join(f"{lab:>18}" for lab in labels))
    top = max(q["distance"] for r in results.values() for q in r["queries"])
    for lo in range(0, top + 1, coarse):
        cells = []
        for lab in labels:
            sel = [
                q["correct"] for q in results[lab]["queries"] if lo <= q["distance"] < lo + coarse
            ]
            cells.append(f"{np.mean(sel):>12.2f} (n={len(sel):>2})" if sel else f"{'':>18}")
        if any(c.strip() for c in cells):
            print(f"{f'{lo}-{lo + coarse}':<12}" + "".join(cells))
    print(f"\n{'config':<20}{'inside W':>10}{'outside W':>11}{'all':>7}{'cache MiB':>11}{'s':>6}")
    for lab, r in results.items():
        ins, outs = r["accuracy_inside_window"], r["accuracy_outside_window"]
        print(
            f"{lab:<20}{'-' if ins is None else f'{ins:.2f}':>10}"
            f"{'-' if outs is None else f'{outs:.2f}':>11}{r['accuracy']:>7.2f}"
            f"{r['cache_bytes'] / 2**20:>11.1f}{r['seconds']:>6.0f}"
        )
    checks = [
        q["verified_as_generation"]
        for r in results.values()
        for q in r["queries"]
        if "verified_as_generation" in q
    ]
    if checks:
        print(f"\nqueries re-run as jaxsink.Generation: {sum(checks)}/{len(checks)} identical")
    print(f"wall time {summary['wall_seconds']:.0f} s")
    print(f"wrote {out_json}\nwrote {out_png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
