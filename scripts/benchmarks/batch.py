"""The batch section: aggregate decode tok/s of B = 1, 4, 16 independent streams, with the run's
cache dtype and with the int8 cache, interleaved."""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Harness, log
from benchmarks.sizes import SINKS, WINDOW
from jaxsink.config import StreamConfig
from jaxsink.traced import cache as kv


def run(h: Harness) -> dict:
    """The batch section."""
    sz, net = h.sizes, h.net
    stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
    steps = sz["batch_steps"]
    caches = {"": net.dtype, "_int8": kv.INT8}  # result key suffix: cache dtype
    out: dict = {suffix: [] for suffix in caches}
    setups = {
        (B, suffix): h.decode_setup(net, stream, B, sz["batch_prompt"], steps, dtype)
        for B in sz["batches"]
        for suffix, dtype in caches.items()
    }
    # Every batch size and cache timed in each round, so that the ratios compare runs of
    # the same machine load (the machine may be shared); the best round of each counts.
    runs: dict = {key: [] for key in setups}
    for _ in range(2 * h.repeats):
        for key, timer in setups.items():
            runs[key].append(timer())
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
            h.row(
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
