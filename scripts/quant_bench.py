"""GGUF weights kept as they are (`--quantize keep`) against the float32 conversion, on the
default model (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding), in one run.

Sections (select with `--sections layouts,head,step,outside,ppl,disk`; all by default):

- layouts: the in-memory layouts and product forms a quantized decode could use, on SmolLM2's
           30 layers of matrices (q/k/v, o, gate/up, down) with random codes, one token per
           pass, against float32 weights: per-block int8 codes with float32 scales, dequantized
           then multiplied (what `jaxsink.traced.quant` does); the same with float16 scales; 4-bit
           codes packed two per byte (each half dequantized, two products); `jnp.uint4` codes;
           one fused multiply-and-sum (no matrix product); the group-wise decomposition
           y = sum_b d_b (q_b . x_b) + m_b sum(x_b). Also the float32 products of one matrix per
           shape, read from cache: the chosen form's time minus that one is its dequantization
           (where the time goes).
- head:    the LM head [49152, 576] (Q8_0) alone: float32, dequantized whole, and in slices of
           2 / 4 / 8 / 16 MB of float (`quant.DEQUANT_BYTES`).
- step:    the real models' decode step (B = 1, C = 1, sink cache of 1024), float32 against
           keep, interleaved in-process, per-token milliseconds.
- generate: `jaxsink.generate` in-process (its decode loop on device, a ~600-token prompt, 256
           new tokens, greedy), float32 and keep alternated: `decode_tokens_per_s` as it reports.
- outside: `jaxsink generate` from outside, as a user runs it: the wall time of 1,040 and of 16
           new tokens (a ~600-token prompt, greedy), interleaved with the float32 model, median
           of 3 rounds; decode tok/s = 1,024 / (wall(1040) - wall(16)). Each run's peak RSS
           (the kernel's, per child), with a warm compilation cache, and once each cold.
- ppl:     `jaxsink ppl` over 4,096 tokens of the default text in sink mode: per-token NLL of
           keep against float32 (max absolute difference), perplexity, tok/s.
- disk:    the checkpoint folders' sizes.

Every in-process timing excludes compilation, follows a warm-up, blocks on the results and
keeps the best of several rounds; variants run interleaved, round by round, so that a shared
machine's swings hit them alike: compare the ratios, not the absolute figures. Each section
records how many cores other processes kept busy meanwhile (`others_busy_cores`).

    python scripts/quant_bench.py                          # everything (~25 min on 2 cores)
    python scripts/quant_bench.py --sections layouts,head --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's jaxsink, however (or whether) it is installed
sys.path.insert(0, str(ROOT / "scripts"))

from measure import LoadMeter, cpu_model  # noqa: E402  (stdlib only at import)

SECTIONS = ("layouts", "head", "step", "generate", "outside", "ppl", "disk")
PROMPT = ("The quick brown fox jumps over the lazy dog. " * 60).strip()
L, D, F, V, QKV = 30, 576, 1536, 49152, 960  # SmolLM2-135M's shapes
BLOCK = 32


def log(msg: str) -> None:
    print(f"[quant_bench] {msg}", file=sys.stderr, flush=True)


def interleaved(runs: dict, rounds: int, per: int = 1) -> dict:
    """name -> callable (blocks until done); every round runs each once, in turn. Returns
    name -> sorted seconds per call (divided by `per`)."""
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / per)
    return {name: sorted(ts) for name, ts in times.items()}


# --- layouts ---------------------------------------------------------------------------------


def layout_forms():
    """name -> (weight maker (out, in, rng) -> tuple of arrays, one-token product (w, x) -> y)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxsink.traced import quant

    f32 = jnp.float32

    def codes(o, i, rng):
        nb = i // BLOCK
        q = rng.integers(0, 16, (o, nb, BLOCK)).astype(np.int8)
        d = (rng.random((o, nb)) * 0.01 + 1e-3).astype(np.float16)
        m = (-rng.random((o, nb)) * 0.05).astype(np.float16)
        return q, d, m

    def make(kind):
        def maker(o, i, rng):
            q, d, m = codes(o, i, rng)
            if kind == "f32":
                return (jnp.asarray((q * d[..., None].astype(f32) + m[..., None]).reshape(o, i)),)
            if kind == "int8":
                return tuple(map(jnp.asarray, (q, d.astype(f32), m.astype(f32))))
            if kind == "int8_f16":
                return tuple(map(jnp.asarray, (q, d, m)))
            if kind == "nibbles":  # byte j: value j (low), value j + 16 (high), as GGUF
                packed = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
                return tuple(map(jnp.asarray, (packed, d.astype(f32), m.astype(f32))))
            if kind == "uint4":
                return (jnp.asarray(q.astype(np.uint8), jnp.uint4), *map(jnp.asarray, (d, m)))
            raise ValueError(kind)

        return maker

    def dense(q, d, m, x):  # codes [o, nb, k] -> [o, nb * k] float32 (k per block), after x
        o, nb, k = q.shape
        return quant._dequantize(q.reshape(o, nb * k), d, m, k, f32, x)  # as jaxsink does

    def f32_product(w, x):
        return w[0] @ x

    def dequant_product(w, x):
        return dense(*w, x) @ x

    def nibble_product(w, x):
        q, d, m = w
        xb = x.reshape(-1, 2, BLOCK // 2)
        halves = ((q & 15, xb[:, 0]), (q >> 4, xb[:, 1]))
        return sum(dense(c, d, m, x) @ xs.reshape(-1) for c, xs in halves)

    def fused_sum(w, x):
        q, d, m = w
        w = q.astype(f32) * d[..., None].astype(f32) + m[..., None].astype(f32)
        return jnp.sum(w * x.reshape(-1, BLOCK), axis=(1, 2))

    def groupwise(w, x):
        q, d, m = w
        xb = x.reshape(-1, BLOCK)
        s = jnp.sum(q.astype(f32) * xb, axis=2)  # [o, nb]: q_b . x_b
        return jnp.sum(s * d.astype(f32) + m.astype(f32) * xb.sum(1), axis=1)

    def product_only(w, x):  # a float32 product of a cache-resident matrix of the same shape
        return w[0] @ x

    def resident(o, i, rng):  # one shared float32 matrix per shape: stays in cache
        return (jnp.asarray(rng.standard_normal((o, i)).astype(np.float32)),)

    return {
        "float32": (make("f32"), f32_product),
        "int8 codes, float32 scales: dequantize then product (jaxsink)": (
            make("int8"),
            dequant_product,
        ),
        "int8 codes, float16 scales: dequantize then product": (make("int8_f16"), dequant_product),
        "4-bit codes packed two per byte: two half products": (make("nibbles"), nibble_product),
        "jnp.uint4 codes: dequantize then product": (make("uint4"), dequant_product),
        "int8 codes: one fused multiply-and-sum (no product)": (make("int8"), fused_sum),
        "int8 codes: group-wise sum_b d_b (q_b . x_b) + m_b sum(x_b)": (make("int8"), groupwise),
        "float32 product of a cache-resident matrix (where time goes)": (resident, product_only),
    }


def section_layouts(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    shapes = [(QKV, D), (D, D), (2 * F, D), (D, F)]
    runs, made = {}, {}
    for name, (maker, product) in layout_forms().items():
        rng = np.random.default_rng(0)
        if maker.__name__ == "resident":
            shared = [maker(o, i, rng) for o, i in shapes]
            layers = [shared] * L
        else:
            layers = [[maker(o, i, rng) for o, i in shapes] for _ in range(L)]

        def one_pass(layers, x, product=product):
            for w1, w2, w3, w4 in layers:  # as the model: every product's output is used
                a = product(w1, x)
                o = product(w2, a[:D] + 1e-6 * a.sum())
                u = product(w3, x + o)
                x = jnp.tanh(x + 1e-3 * product(w4, jax.nn.silu(u[:F]) * u[F:]))
            return x

        x = jnp.full((D,), 0.1, jnp.float32)
        exe = jax.jit(one_pass).lower(layers, x).compile()
        exe(layers, x).block_until_ready()
        made[name] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(layers[:1])) * L
        runs[name] = functools.partial(lambda e, w, x: e(w, x).block_until_ready(), exe, layers, x)
    times = interleaved(runs, args.rounds)
    base = times["float32"][0]
    chosen = times["int8 codes, float32 scales: dequantize then product (jaxsink)"][0]
    cached = times["float32 product of a cache-resident matrix (where time goes)"][0]
    return {
        "what": "30 SmolLM2 layers of products (q/k/v, o, gate/up, down), one token, random codes",
        "jaxsink_ms_dequantizing": round((chosen - cached) * 1e3, 2),
        "jaxsink_ms_multiplying_from_cache": round(cached * 1e3, 2),
        "forms": {
            name: {
                "ms_per_pass": round(ts[0] * 1e3, 2),
                "median_ms": round(statistics.median(ts) * 1e3, 2),
                "speed_vs_float32": round(base / ts[0], 2),
                "weight_bytes": made[name],
            }
            for name, ts in times.items()
        },
    }


# --- head ------------------------------------------------------------------------------------


def section_head(args) -> dict:
    import gguf
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxsink.config import Quant
    from jaxsink.traced import quant

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((V, D)) * 0.02).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    from jaxsink.convert.gguf import gguf_blocks

    blocks = gguf_blocks(raw, "q8_0")
    copies = 2  # two heads, read in turn: 57 MB of codes do not stay in the 32 MB cache
    heads = []
    for _ in range(copies):
        q = quant.QuantizedWeight(Quant("q8_0"), (V, D), ("vocab", "embed"))
        q.codes.set_value(jnp.asarray(blocks.codes))
        q.scales.set_value(jnp.asarray(blocks.scales.astype(np.float32)))
        heads.append(nnx.split(q))
    floats = [jnp.asarray(blocks.dequantize()) for _ in range(copies)]
    x = jnp.full((D, 1), 0.1, jnp.float32)
    runs = {}

    def float_pass(ws, x):
        for w in ws:
            x = x + 1e-6 * (w @ x).sum()
        return x

    runs["float32"] = jax.jit(float_pass).lower(floats, x).compile()
    variants = {"dequantized whole": 1 << 40} | {
        f"slices of {mb} MB": mb << 20 for mb in (2, 4, 8, 16)
    }
    old = quant.DEQUANT_BYTES
    for name, size in variants.items():
        quant.DEQUANT_BYTES = size

        def quant_pass(states, x, graphdef=heads[0][0]):
            for state in states:
                x = x + 1e-6 * quant.product(nnx.merge(graphdef, state), x).sum()
            return x

        states = [s for _, s in heads]
        runs[name] = jax.jit(quant_pass).lower(states, x).compile()
    quant.DEQUANT_BYTES = old
    args_of = {name: (floats if name == "float32" else [s for _, s in heads], x) for name in runs}
    calls = {n: functools.partial(lambda e, a: e(*a).block_until_ready(), e, args_of[n])
             for n, e in runs.items()}  # fmt: skip
    for call in calls.values():
        call()
    times = interleaved(calls, args.rounds, per=copies)
    base = times["float32"][0]
    return {
        "what": "LM head [49152, 576] Q8_0 (float32 113 MB, codes 28 MB), one token",
        "chosen_dequant_bytes": old,
        "forms": {
            name: {
                "ms": round(ts[0] * 1e3, 2),
                "speed_vs_float32": round(base / ts[0], 2),
                "temp_bytes": runs[name].memory_analysis().temp_size_in_bytes,
            }
            for name, ts in times.items()
        },
    }


# --- the real models -------------------------------------------------------------------------


def models(args) -> dict[str, Path]:
    """The float32 and keep checkpoints of the default model (converted on first use), or of
    `--gguf` (converted into the jaxsink home's cache)."""
    from jaxsink.default_model import default_model_dir, resolve_model

    if args.gguf:
        return {q or "float32": resolve_model(args.gguf, quantize=q) for q in (None, "keep")}
    return {
        "float32": default_model_dir(progress=True),
        "keep": default_model_dir(progress=True, quantize="keep"),
    }


def section_step(args) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxsink
    from jaxsink import layout
    from jaxsink.config import StreamConfig
    from jaxsink.traced import cache as kv
    from jaxsink.traced import entry

    stream = StreamConfig(4, 1020)
    calls, out = {}, {}
    for name, path in models(args).items():
        m = jaxsink.load(path, progress=False)
        cache = [kv.init_cache(m.cfg, stream, 1, m.dtype)]
        token, valid = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool)
        step = jax.jit(functools.partial(entry._step, graphdef=m.graphdef), donate_argnums=1)
        exe = step.lower(m.weights, cache[0], token, valid).compile()
        out[name] = {
            "weight_bytes": layout.param_bytes(m.weights),
            "temp_bytes": exe.memory_analysis().temp_size_in_bytes,
        }

        def run(exe=exe, m=m, cache=cache, token=token, valid=valid):
            for _ in range(args.steps):
                logits, cache[0] = exe(m.weights, cache[0], token, valid)
            logits.block_until_ready()

        run()
        calls[name] = run
    times = interleaved(calls, args.rounds, per=args.steps)
    for name, ts in times.items():
        out[name] |= {
            "ms_per_token": round(ts[0] * 1e3, 2),
            "median_ms": round(statistics.median(ts) * 1e3, 2),
        }
    out["keep_speed_vs_float32"] = round(times["float32"][0] / times["keep"][0], 2)
    return {"what": "model.step, B = 1, C = 1, sink cache 1024, in-process", "models": out}


def section_generate(args) -> dict:
    import jaxsink

    loaded = {name: jaxsink.load(path, progress=False) for name, path in models(args).items()}
    rates: dict[str, list] = {name: [] for name in loaded}
    for m in loaded.values():  # compile
        "".join(jaxsink.generate(m, PROMPT, max_new_tokens=32))
    for _ in range(args.rounds):
        for name, m in loaded.items():
            gen = jaxsink.generate(m, PROMPT, max_new_tokens=256)
            "".join(gen)
            rates[name].append(gen.stats.as_dict()["decode_tokens_per_s"])
    out = {name: {"decode_tok_s": sorted(round(r, 1) for r in rs)} for name, rs in rates.items()}
    best = {name: max(rs) for name, rs in rates.items()}
    out["keep_decode_vs_float32_best"] = round(best["keep"] / best["float32"], 2)
    medians = {name: statistics.median(rs) for name, rs in rates.items()}
    out["keep_decode_vs_float32_median"] = round(medians["keep"] / medians["float32"], 2)
    out["what"] = "jaxsink.generate, 256 new tokens after a ~600-token prompt, greedy, B = 1"
    return out


def run_cli(argv: list[str], env=None) -> tuple[float, int, str]:
    """(wall seconds, the command's own peak RSS in bytes, its stdout) of `jaxsink argv`, run
    under /usr/bin/time (a child's ru_maxrss counts its parent's pages from before the exec)."""
    with tempfile.TemporaryDirectory() as tmp:
        rss = Path(tmp) / "rss"
        cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss), sys.executable, "-m", "jaxsink.cli"]
        start = time.perf_counter()
        proc = subprocess.run(
            [*cmd, *argv],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)) | (env or {}),
            cwd=ROOT,
            check=False,
        )
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"jaxsink {argv[0]} failed: {proc.stderr[-2000:]}")
        return wall, int(rss.read_text().split()[-1]) * 1024, proc.stdout


def generate(path: Path, new: int, env=None) -> dict:
    """One `jaxsink generate` run (greedy): wall seconds, peak RSS, tokens made."""
    argv = ["generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", str(new)]
    wall, rss, out = run_cli([*argv, "--quiet", "--json"], env)
    report = json.loads(out.strip().splitlines()[-1])
    return {"wall_s": wall, "peak_rss_bytes": rss, "new_tokens": report["new_tokens"]}


def section_outside(args) -> dict:
    paths = models(args)
    for path in paths.values():  # warm the compilation cache (and the page cache)
        generate(path, 16)
    rows = {name: {"1040": [], "16": []} for name in paths}
    for r in range(args.outside_rounds):
        for new in ("1040", "16"):
            for name, path in paths.items():
                rows[name][new].append(generate(path, int(new)))
                log(f"outside round {r}: {name} {new} new tokens {rows[name][new][-1]}")
    out = {}
    for name, runs in rows.items():
        long = statistics.median(x["wall_s"] for x in runs["1040"])
        short = statistics.median(x["wall_s"] for x in runs["16"])
        made = {x["new_tokens"] for x in runs["1040"]} | {x["new_tokens"] for x in runs["16"]}
        out[name] = {
            "wall_1040_s": [round(x["wall_s"], 2) for x in runs["1040"]],
            "wall_16_s": [round(x["wall_s"], 2) for x in runs["16"]],
            "decode_tok_s": round(1024 / (long - short), 2),
            "new_tokens_made": sorted(made),
            "peak_rss_mb": sorted(
                round(x["peak_rss_bytes"] / 1e6) for x in runs["1040"] + runs["16"]
            ),
        }
    out["keep_decode_vs_float32"] = round(
        out["keep"]["decode_tok_s"] / out["float32"]["decode_tok_s"], 2
    )
    out["keep_peak_rss_below_float32_mb"] = round(
        statistics.median(out["float32"]["peak_rss_mb"])
        - statistics.median(out["keep"]["peak_rss_mb"])
    )
    cold = {}
    for name, path in paths.items():  # an empty compilation cache: compiling costs memory too
        with tempfile.TemporaryDirectory() as tmp:
            cold[name] = generate(path, 16, env={"JAX_COMPILATION_CACHE_DIR": tmp})
    out["cold_cache_peak_rss_mb"] = {n: round(c["peak_rss_bytes"] / 1e6) for n, c in cold.items()}
    out["what"] = (
        "jaxsink generate (greedy, ~600-token prompt), wall time of 1040 and 16 new tokens, "
        "median of the rounds; decode tok/s = 1024 / (wall(1040) - wall(16)); peak RSS per "
        "child with a warm compilation cache, and once each with an empty one"
    )
    return out


def section_ppl(args) -> dict:
    import numpy as np

    from jaxsink.default_model import default_text_ids
    from jaxsink.tokenizer import Tokenizer

    paths = models(args)
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "ids.npy"
        np.save(ids, default_text_ids(Tokenizer(paths["float32"]), 4097))
        out, nll = {}, {}
        for name, path in paths.items():
            folder = Path(tmp) / name
            argv = ["ppl", "--model", str(path), "--tokens", str(ids), "--n-tokens", "4096"]
            argv += ["--mode", "sink", "--out", str(folder), "--quiet", "--json"]
            wall, _, stdout = run_cli(argv)
            sink = json.loads(stdout.strip().splitlines()[-1])["modes"]["sink"]
            nll[name] = np.load(folder / "nll_sink.npy")
            out[name] = {"ppl": sink["ppl"], "tokens_per_s": round(sink["tokens_per_s"], 1),
                         "wall_s": round(wall, 1)}  # fmt: skip
    diff = np.abs(nll["keep"] - nll["float32"])
    out["nll_max_abs_diff"] = float(diff.max())
    out["nll_mean_abs_diff"] = float(diff.mean())
    out["what"] = "jaxsink ppl --n-tokens 4096 --mode sink (S=4, W=1020) over the default text"
    return out


def section_disk(args) -> dict:
    out = {}
    for name, path in models(args).items():
        out[f"{name}_bytes"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    out["keep_vs_float32"] = round(out["keep_bytes"] / out["float32_bytes"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--rounds", type=int, default=7, help="rounds of in-process timings")
    p.add_argument("--steps", type=int, default=32, help="decode steps per timed call (step)")
    p.add_argument("--outside-rounds", type=int, default=3)
    p.add_argument("--gguf", help="a GGUF file instead of the default model's")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "quant.json"))
    args = p.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections: {', '.join(unknown)}")
    import jax

    result = {
        "device": {
            "cpu_model": cpu_model(),
            "cores": os.cpu_count(),
            "jax": jax.__version__,
            "loadavg_start": list(os.getloadavg()),
        },
        "sections": {},
    }
    for name in sections:
        log(f"section {name}")
        meter = LoadMeter(None)
        result["sections"][name] = globals()[f"section_{name}"](args) | {"run": meter.result()}
        log(json.dumps(result["sections"][name])[:2000])
    result["device"]["loadavg_end"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
