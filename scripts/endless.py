"""Endless generation: 20,000+ tokens in sink mode and in window mode from the same prompt.

Both modes keep K = 1024 cache entries: sink S = 4, W = 1020; window S = 0, W = 1024. The prompt
is a chat turn asking for a very long story; tokens are sampled (temperature 0.7, top-p 0.9,
seed 0 by default) because greedy decoding of a 135M model loops in any mode, which would hide
the difference between the modes.

"Endless": SmolLM2 ends its turn with `<|im_end|>` (id 2). Generation stops at the ids in
`cfg.eos_token_ids` (falling back to the tokenizer's), so this script runs on a copy of the model
whose config and tokenizer declare no EOS id: an `<|im_end|>` is sampled like any other token and
generation goes on; the model then usually opens a new chat turn itself and carries on. The
number of `<|im_end|>` per 1,000 tokens is reported.

Per 1,000 generated tokens the script reports the text's own mean NLL under the model *in the
same mode* (the prompt + generated ids re-scored with `evaluate.stream_nll`, exact per token),
the fraction of repeated 4-grams within the block, and distinct-2 (unique bigrams / bigrams).
Writes `docs/results/endless.json`, the texts as `docs/results/endless_<mode>.txt` and
`docs/figures/endless.png`.

    python scripts/endless.py                 # 20,000 tokens per mode (~40 min on 2 CPU cores)
    python scripts/endless.py --quick         # 600 tokens per mode with K = 128
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's jaxsink, however (or whether) it is installed

import jaxsink  # noqa: E402
from jaxsink import evaluate  # noqa: E402

PROMPT = (
    "Write a very long story, in many chapters, about a lighthouse keeper on a small island, "
    "the ships that pass, and the storms of each season. Do not stop: keep telling it."
)
BLOCK = 1000  # tokens per reported block


def without_eos(model: jaxsink.Model) -> jaxsink.Model:
    """The same model with no EOS id in its config or tokenizer: generation never stops early."""
    tok = copy.copy(model.tokenizer)
    tok.eos_token_ids = ()
    cfg = dataclasses.replace(model.cfg, eos_token_ids=())
    return dataclasses.replace(model, cfg=cfg, tokenizer=tok)


def repetition(ids: list[int]) -> tuple[float, float]:
    """(fraction of the block's 4-grams that already occurred earlier in it, distinct-2)."""
    grams4 = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    grams2 = [tuple(ids[i : i + 2]) for i in range(len(ids) - 1)]
    rep4 = 1 - len(set(grams4)) / len(grams4) if grams4 else 0.0
    distinct2 = len(set(grams2)) / len(grams2) if grams2 else 0.0
    return rep4, distinct2


def generate(model, prompt_ids, mode, args) -> tuple[jaxsink.Generation, list[tuple[int, float]]]:
    """Run one generation, printing progress; returns it and (tokens so far, seconds) marks."""
    gen = jaxsink.Generation(
        model,
        prompt_ids,
        max_new_tokens=args.tokens,
        sampling=jaxsink.Sampling(args.temperature, args.top_k, args.top_p),
        seed=args.seed,
        mode=mode,
        sinks=args.sinks,
        window=args.window,
        block=args.block,
    )
    marks = []
    start = None
    next_report = BLOCK
    for _ in gen:
        now = time.perf_counter()
        start = start or now
        n = len(gen.token_ids)
        marks.append((n, now - start))
        if n >= next_report:
            print(
                f"  {mode}: {n:>6}/{args.tokens} tokens, {n / max(now - start, 1e-9):5.1f} tok/s",
                file=sys.stderr,
                flush=True,
            )
            next_report += BLOCK
    return gen, marks


def block_rate(marks: list[tuple[int, float]], lo: int, hi: int) -> float | None:
    """Decode tokens/s between the marks nearest token counts lo and hi."""
    if not marks:
        return None
    n = np.array([m[0] for m in marks])
    t = np.array([m[1] for m in marks])
    i, j = int(np.searchsorted(n, lo)), int(np.searchsorted(n, hi))
    i, j = min(i, len(n) - 1), min(j, len(n) - 1)
    return float((n[j] - n[i]) / (t[j] - t[i])) if t[j] > t[i] else None


def analyse(model, prompt_ids, gen, marks, mode, args) -> dict:
    """Per-block self-NLL (re-scored in the same mode), repetition and speed."""
    ids = np.asarray([*prompt_ids, *gen.token_ids], np.int32)
    scored = evaluate.stream_nll(
        model, ids, mode, args.sinks, args.window, args.score_chunk, progress=False
    )
    p = len(prompt_ids)
    nll = scored.nll[p - 1 :]  # nll[j]: -log p(generated token j | its view in `mode`)
    toks = gen.token_ids
    blocks = []
    for lo in range(0, len(toks), BLOCK):
        hi = min(lo + BLOCK, len(toks))
        rep4, distinct2 = repetition(toks[lo:hi])
        blocks.append(
            {
                "tokens": [lo, hi],
                "nll_mean": float(nll[lo:hi].mean()),
                "ppl": float(np.exp(nll[lo:hi].mean())),
                "repeated_4gram_fraction": rep4,
                "distinct_2": distinct2,
                "im_end_count": int(sum(t == args.im_end for t in toks[lo:hi])),
                "decode_tokens_per_s": block_rate(marks, lo, hi),
            }
        )
    tail = model.tokenizer.decode(toks[-args.tail_tokens :], skip_special_tokens=False)
    stats = gen.stats.as_dict()
    return {
        "mode": mode,
        "sinks": gen.stream.sinks,
        "window": gen.stream.window,
        "new_tokens": len(toks),
        "nll_mean": float(nll.mean()),
        "ppl": float(np.exp(nll.mean())),
        "im_end_count": int(sum(t == args.im_end for t in toks)),
        "stats": stats,
        "score_compiles": scored.compiles,
        "blocks": blocks,
        "tail": tail,
        "head": model.tokenizer.decode(toks[:200], skip_special_tokens=False),
    }


def plot(runs: dict, path: str, title: str, capacity: int) -> None:
    """Self-NLL, repeated 4-grams and distinct-2 per 1,000-token block, per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sink": "tab:blue", "window": "tab:red", "dense": "tab:green"}
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    keys = [
        ("nll_mean", "mean NLL of the generated\ntext (scored in its mode)"),
        ("repeated_4gram_fraction", "repeated 4-grams\n(fraction within block)"),
        ("distinct_2", "distinct-2\n(unique bigrams / bigrams)"),
    ]
    for mode, r in runs.items():
        x = [b["tokens"][1] for b in r["blocks"]]
        for ax, (key, _) in zip(axes, keys, strict=True):
            ax.plot(
                x,
                [b[key] for b in r["blocks"]],
                marker="o",
                ms=3,
                color=colors.get(mode),
                label=f"{mode} (S={r['sinks']}, W={r['window']})",
            )
    for ax, (_, label) in zip(axes, keys, strict=True):
        ax.set_ylabel(label)
        ax.axvline(capacity, color="gray", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    axes[0].set_title(title)
    axes[-1].set_xlabel(f"generated tokens (end of each {BLOCK}-token block; dashed: K)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model spec for jaxsink.load (default SmolLM2)")
    p.add_argument("--tokens", type=int, default=20_000, help="new tokens per mode")
    p.add_argument("--modes", default="sink,window", help="comma-separated modes")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020, help="W of sink mode; window mode: S + W")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--block", type=int, default=64, help="decode steps per device loop")
    p.add_argument("--score-chunk", type=int, default=256, help="chunk length for re-scoring")
    p.add_argument("--tail-tokens", type=int, default=160, help="tokens shown from the end")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the other modes of an existing --out-json with the same settings",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 600 tokens, K = 128")
    p.add_argument("--out-json", default=str(ROOT / "docs/results/endless.json"))
    p.add_argument("--out-png", default=str(ROOT / "docs/figures/endless.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.window, args.tail_tokens = 600, 124, 80
        args.out_json = args.out_json.replace(".json", "_quick.json")
        args.out_png = args.out_png.replace(".png", "_quick.png")
    wall = time.perf_counter()

    model = jaxsink.load(args.model)
    endless = without_eos(model)
    tok = model.tokenizer
    args.im_end = tok.eos_token_ids[0] if tok.eos_token_ids else -1
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    prompt_ids = tok.encode(text, add_special_tokens=False)
    capacity = args.sinks + args.window
    print(
        f"{model.path.name}: {args.tokens} tokens per mode, K = {capacity}, prompt "
        f"{len(prompt_ids)} tokens, sampling T={args.temperature} top-p={args.top_p} "
        f"top-k={args.top_k} seed={args.seed}",
        file=sys.stderr,
    )

    out_json, out_png = Path(args.out_json), Path(args.out_png)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": model.path.name,
        "dtype": str(model.dtype),
        "prompt": args.prompt,
        "prompt_tokens": len(prompt_ids),
        "sampling": {
            "temperature": args.temperature,
            "top_k": args.top_k,
            "top_p": args.top_p,
            "seed": args.seed,
        },
        "max_new_tokens": args.tokens,
        "capacity": capacity,
    }
    runs = {}
    if args.merge and out_json.is_file():  # keep other modes run earlier with the same settings
        old = json.loads(out_json.read_text())
        if all(old.get(k) == v for k, v in settings.items()):
            runs = {m: r for m, r in old["modes"].items() if m not in args.modes.split(",")}
            print(f"merging with {sorted(runs)} from {out_json}", file=sys.stderr)
    for mode in args.modes.split(","):
        gen, marks = generate(endless, prompt_ids, mode, args)
        runs[mode] = analyse(model, prompt_ids, gen, marks, mode, args)
        text_path = out_json.with_name(f"{out_json.stem}_{mode}.txt")
        text_path.write_text(tok.decode(gen.token_ids, skip_special_tokens=False))
        runs[mode]["text_file"] = text_path.name
        runs[mode]["wall_seconds"] = time.perf_counter() - wall
        summary = {
            **settings,
            "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
            "endless": "model copy with no EOS ids: <|im_end|> is sampled and generation goes on",
            "block_tokens": BLOCK,
            "modes": runs,
            "command": " ".join(["python", "scripts/endless.py", *(argv or sys.argv[1:])]),
        }
        # Written after every mode, so a long run leaves its finished modes behind.
        out_json.write_text(json.dumps(summary, indent=2) + "\n")
        plot(
            runs,
            str(out_png),
            f"{model.path.name}: endless sampling (T={args.temperature}, top-p={args.top_p}), "
            f"K = {capacity}",
            capacity,
        )

    for mode, r in runs.items():
        st = r["stats"]
        print(
            f"\n== {mode} (S={r['sinks']}, W={r['window']}): {r['new_tokens']} tokens, "
            f"self-ppl {r['ppl']:.2f}, decode {st['decode_tokens_per_s']:.1f} tok/s, "
            f"cache {st['cache_bytes'] / 2**20:.1f} MiB, {st['compiles']} compile(s), "
            f"<|im_end|> x{r['im_end_count']}"
        )
        print(f"{'block':<14}{'NLL':>7}{'rep-4g':>8}{'dist-2':>8}{'im_end':>7}{'tok/s':>7}")
        for b in r["blocks"]:
            rate = b["decode_tokens_per_s"]
            span = "{}-{}".format(*b["tokens"])
            print(
                f"{span:<14}{b['nll_mean']:>7.3f}"
                f"{b['repeated_4gram_fraction']:>8.3f}{b['distinct_2']:>8.3f}"
                f"{b['im_end_count']:>7}{(rate or 0):>7.1f}"
            )
        print(f"-- last {args.tail_tokens} tokens of {mode}:")
        print("\n".join("   | " + line for line in r["tail"].splitlines()[-12:]))
    print(f"\nwall time {time.perf_counter() - wall:.0f} s")
    print(f"wrote {out_json}\nwrote {out_png}")
    for r in runs.values():
        print(f"wrote {out_json.with_name(r['text_file'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
