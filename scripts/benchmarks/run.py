"""A benchmark run: the model loaded, the transformers worker started when the decode section
compares with it, the chosen sections run in order (each after an optional wait for a quiet
machine, under a load meter), then the report written and printed."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import jax
import jaxlib
from measure import SHARED_BUSY_CORES, LoadMeter, cpu_model, wait_quiet

import jaxsink
from benchmarks import (
    SECTIONS,
    batch,
    bounds,
    decode,
    experts,
    flat,
    memory,
    policies,
    prefill,
    recompute,
    report,
    roofline,
    weights,
)
from benchmarks.baseline import HFBaseline
from benchmarks.harness import Harness, log, traces
from benchmarks.sizes import FULL, QUICK

RUNS = {
    "decode": decode.run,
    "bounds": bounds.run,
    "flat": flat.run,
    "recompute": recompute.run,
    "prefill": prefill.run,
    "batch": batch.run,
    "memory": memory.run,
    "bf16": decode.run_bf16,
    "roofline": roofline.run,
    "experts": experts.run,
    "weights": weights.run,
    "policies": policies.run,
}


def run(args, start: float, loadavg_start: tuple) -> int:
    """Run `args.sections` (bench.py's arguments); `start` (perf_counter) and `loadavg_start`
    were read before JAX was imported. Writes `args.out` and prints the tables."""
    sizes = QUICK if args.quick else FULL
    model = jaxsink.load(args.model, dtype=args.dtype)
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
    h = Harness(args, model, sizes, worker)
    if worker:
        worker.wait_ready()  # its imports must not overlap any timing
    try:
        warnings = run_sections(h, args.sections, args.wait_quiet)
    finally:
        if worker:
            worker.close()
    out = Path(args.out)
    result = {
        "device": device(loadavg_start, worker),
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
        "sections": h.results,
        "targets": report.targets(h.results),
        "warnings": warnings
        + (["--quick: smoke-test sizes; judge the targets on a full run"] if args.quick else []),
        "compiles_total": traces(),
        "compile_seconds_total": h.compile_s,
        "wall_seconds": time.perf_counter() - start,
    }
    report.write(result, out)
    print(report.summary(result, h.rows, out))
    return 0


def run_sections(h: Harness, sections: list[str], quiet_s: float) -> list[str]:
    """Run `sections` in the run's order into `h.results`, each with its load figures as
    `run`; returns the warnings about sections timed on a busy machine."""
    warnings = []
    for name in [s for s in SECTIONS if s in sections]:
        waited = wait_quiet(quiet_s, h.worker, log)
        log(
            f"section {name}"
            + (f" (waited {waited:.0f} s for a quiet machine)" if waited > 3 else "")
        )
        meter = LoadMeter(h.worker)
        h.results[name] = RUNS[name](h)
        load = meter.result() | {"waited_for_quiet_s": round(waited, 1)}
        busy = load["others_busy_cores"]
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
        h.results[name]["run"] = load
        log(
            f"section {name} done in {load['seconds']} s "
            f"(other processes kept {load['others_busy_cores']} cores busy)"
        )
    return warnings


def device(loadavg_start: tuple, worker: HFBaseline | None) -> dict:
    """The machine and the software versions the run measured."""
    dev = jax.devices()[0]
    out = {
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
    }
    if worker and worker.info:
        out["torch"] = worker.info["torch"]
        out["transformers"] = worker.info["transformers"]
    return out
