"""The decode section: batch-1 greedy decode tok/s of jaxsink's on-device loop against
transformers on the same weights and prompt; and the bf16 section, the same jaxsink run with
bfloat16 weights and cache."""

from __future__ import annotations

import base64
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import Harness, Net, log
from benchmarks.sizes import SINKS, WINDOW
from jaxsink.config import StreamConfig


def run(h: Harness) -> dict:
    """The decode section (float weights, against the transformers worker when there is one)."""
    return decode(h, h.net, "decode", h.sizes["new"], h.worker)


def run_bf16(h: Harness) -> dict:
    """The bf16 section: `decode` with the weights cast to bfloat16, no transformers."""
    if h.model.dtype == jnp.bfloat16:
        return {"skipped": "the whole run is bfloat16 (--dtype): see the decode section"}
    weights = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), h.net.weights)
    net = dataclasses.replace(h.net, weights=weights)
    res = decode(h, net, "bf16", h.sizes["bf16_new"], None)
    del weights, net
    f32 = h.results.get("decode", {}).get("jaxsink_tok_s")
    if f32:
        res["vs_float32"] = res["jaxsink_tok_s"] / f32
        h.row(
            "bf16",
            "bf16 / f32 decode",
            f"{res['vs_float32']:.2f}x",
            "half the weight bytes; speed depends on XLA:CPU's bf16 dot kernels",
        )
    res["note"] = (
        res["note"] + "; weights and cache in bfloat16 (fewer new tokens, to keep the run short)"
    )
    return res


def decode(h: Harness, net: Net, label: str, n: int, hf) -> dict:
    """B = 1 greedy decode of `n` new tokens by `net` after the run's prompt, rows labelled
    `label`. hf: the transformers worker (`baseline.HFBaseline`) timed in turn with jaxsink, or
    None."""
    sz = h.sizes
    P = sz["prompt"]
    ids = h.tokens(P)
    stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
    dtype = net.dtype
    cache = h.init_cache(stream, 1, dtype)
    logits, cache = h.prefill(net, cache, ids[None], 256)
    exe = h.decode_exe(net, cache, n)
    h.run_decode(exe, net, cache, logits, min(n, 4))  # warm-up
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
        secs, toks, _ = h.run_decode(exe, net, cache, logits, n)
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
    h.row(
        label,
        f"jaxsink decode, B=1, {dtype}",
        f"{res['jaxsink_tok_s']:.2f} tok/s",
        f"{res['jaxsink_ms_per_token']:.1f} ms/token; prompt {P}, {n} new",
    )
    if hf:
        compare(h, res, hf, js_tokens, loop, label, n)
    return res


def compare(h: Harness, res: dict, hf, js_tokens, loop: dict, label: str, n: int) -> None:
    """Add the transformers figures to `res` (and rows): the best of its loop and generate()
    runs, jaxsink's ratio to it, and how many greedy tokens agree with its last loop run."""
    sz = h.sizes
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
    h.row(
        label,
        "transformers loop (DynamicCache)",
        f"{loop_tok_s:.2f} tok/s",
        f"torch threads {hf.info['threads']}",
    )
    h.row(
        label,
        "transformers generate()",
        f"{gen_tok_s:.2f} tok/s",
        "(generate(n) - generate(1)) / (n - 1)"
        + (f"; some runs stopped at the {sz['hf_max_s']} s cap" if capped else ""),
    )
    h.row(
        label,
        "jaxsink / best transformers",
        f"{res['ratio_vs_baseline']:.2f}x",
        f"target >= 1.1x (goal 1.25x); parity max |dlogit| "
        f"{res['parity_max_abs_logit_diff']:.1e}; greedy agree {same}/{compared}",
    )
