"""The flat section: sink-mode per-token decode latency at stream positions 2k, 16k and 100k,
and dense mode's latency at capacities 2k, 8k and 16k (really allocated)."""

from __future__ import annotations

import numpy as np

from benchmarks.harness import Harness, traces
from benchmarks.sizes import SINKS, WINDOW
from jaxsink.config import StreamConfig

FLAT_POSITIONS = (2_000, 16_000, 100_000)


def run(h: Harness) -> dict:
    """The flat section."""
    sz, net = h.sizes, h.net
    steps, fill = sz["flat_steps"], sz["flat_fill"]
    stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
    cache = h.init_cache(stream)
    logits, cache = h.prefill(net, cache, h.tokens(fill, seed=1)[None], 256)
    exe = h.decode_exe(net, cache, steps)
    h.run_decode(exe, net, cache, logits, steps)  # warm-up
    traced = traces()
    shifts = {p: round((p - fill) / WINDOW) * WINDOW for p in FLAT_POSITIONS}
    caches = {p: cache.replace(pos=cache.pos + shifts[p]) for p in FLAT_POSITIONS}
    runs = {p: [] for p in FLAT_POSITIONS}
    toks = {}
    for _ in range(h.repeats):
        for p in FLAT_POSITIONS:  # interleaved, so machine noise hits every position alike
            secs, out, _ = h.run_decode(exe, net, caches[p], logits, steps)
            runs[p].append(secs / steps)
            toks[p] = out[0]
    sink = []
    base = min(runs[FLAT_POSITIONS[0]])
    for p in FLAT_POSITIONS:
        best = min(runs[p])
        sink.append(
            {
                "target_position": p,
                "stream_position": fill + shifts[p],
                "ms_per_token": best * 1e3,
                "ms_per_token_median": float(np.median(runs[p])) * 1e3,
                "vs_2k": best / base,
                "greedy_tokens_equal_to_2k": bool((toks[p] == toks[FLAT_POSITIONS[0]]).all()),
            }
        )
        h.row(
            "flat",
            f"sink decode at stream position {fill + shifts[p]:,}",
            f"{best * 1e3:.1f} ms/token",
            f"{best / base:.3f}x of 2k",
        )
    res = {
        "sink": sink,
        "steps_timed": steps,
        "compiles_during_positions": traces() - traced,
        "note": (
            f"the cache is filled by {fill} real prefill tokens (chunks of 256); the 16k and "
            f"100k points reuse that cache with pos advanced by a multiple of W = {WINDOW}: "
            "once the ring is full the cache state depends only on pos mod W (the contract, position "
            "precision), so the same contents are valid there; greedy tokens at every position "
            "are compared with the 2k run"
        ),
    }
    res["dense"] = dense(h, logits)
    res["dense_note"] = (
        "dense caches are really allocated at each capacity; the stream position is set just "
        "below capacity on an all-zero cache (every slot is scored and masked whatever it "
        "holds, so the cost is that of a full cache)"
    )
    return res


def dense(h: Harness, logits) -> list[dict]:
    """Dense mode's decode ms/token at each of the run's capacities, from `logits` [1, V]."""
    sz, net = h.sizes, h.net
    out, steps = [], sz["dense_steps"]
    for cap in sz["dense_capacities"]:
        stream = StreamConfig.for_mode("dense", dense_capacity=cap)
        cache = h.init_cache(stream)
        cache = cache.replace(pos=cache.pos + (cap - steps - 1))
        exe = h.decode_exe(net, cache, steps)
        h.run_decode(exe, net, cache, logits, steps)
        best = min(h.run_decode(exe, net, cache, logits, steps)[0] for _ in range(h.repeats))
        out.append(
            {"capacity": cap, "cache_bytes": cache.nbytes, "ms_per_token": best / steps * 1e3}
        )
        del cache
    for d in out:
        d["vs_first"] = d["ms_per_token"] / out[0]["ms_per_token"]
        h.row(
            "flat",
            f"dense decode, capacity {d['capacity']:,}",
            f"{d['ms_per_token']:.1f} ms/token",
            f"{d['vs_first']:.2f}x of {out[0]['capacity']:,}; cache {d['cache_bytes'] / 1e6:.0f} MB",
        )
    return out
