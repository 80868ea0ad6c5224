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
- policies:  decode tok/s of B = 1 and B = 16 streams under each eviction policy (`--policy
             sink|tova|h2o`, K = 1024), interleaved, and each one's ratio to sink; then one
             layer's cache at B = 16 timed alone: the attention read, the rotation by ranks an
             evicting layer adds, and a re-rotation's passes, against the per-layer time the
             0.8x target leaves.
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

This file parses the arguments; the sections and their harness are the `benchmarks` package
beside it (scripts/benchmarks/).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's jaxsink, however (or whether) it is installed
sys.path.insert(0, str(ROOT / "scripts"))  # the benchmarks package, however this file is run

from benchmarks import SECTIONS  # noqa: E402  (stdlib only at import: no JAX yet)


def parse_args(argv=None):
    """The command line (`--help`), sections checked, `--out` defaulted."""
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
    """Run the chosen sections, or serve as the transformers worker (`--hf-worker`)."""
    args = parse_args(argv)
    if args.hf_worker:
        from benchmarks.baseline import serve

        serve(args.hf_model, args.model, args.threads)
        return 0
    start, loadavg = time.perf_counter(), os.getloadavg()  # before JAX is imported
    from benchmarks.run import run

    return run(args, start, loadavg)


if __name__ == "__main__":
    sys.exit(main())
