"""The recompute section: the StreamingLLM paper's "sliding window with re-computation"
baseline (a fresh dense forward over the last K tokens per new token) against one sink decode
step."""

from __future__ import annotations

import jax
import numpy as np
from measure import seconds

from benchmarks.harness import Harness, log
from benchmarks.sizes import SINKS
from jaxsink.config import StreamConfig
from jaxsink.traced import entry

RECOMPUTE_BUDGET_S = 300  # skip a re-computation K estimated to take longer per token


def run(h: Harness) -> dict:
    """The recompute section."""
    sz, net = h.sizes, h.net
    out, skipped, prev = [], [], None
    for K in sz["recompute_ks"]:
        # Re-computation grows about quadratically in K: skip a K whose estimate (from the
        # previous K) is over budget, and time a slow one once, without a warm-up run.
        estimate = prev[1] * (K / prev[0]) ** 2 if prev else 0.0
        if estimate > RECOMPUTE_BUDGET_S:
            skipped.append({"K": K, "estimated_s_per_token": estimate})
            log(f"recompute K={K}: skipped (estimated {estimate:.0f} s per token)")
            continue
        ids = h.tokens(K, seed=2)[None]
        dstream = StreamConfig.for_mode("dense", dense_capacity=K)
        valid = np.ones((1, K), bool)
        exe = h.compiled(
            "prefill",
            entry.last_logits,
            (net.weights, h.init_cache(dstream), ids, valid),
            {"graphdef": net.graphdef},
        )
        slow = estimate > 20
        reps = 1 if slow else h.repeats
        if not slow:
            jax.block_until_ready(exe(net.weights, h.init_cache(dstream), ids, valid))
        times = []
        for _ in range(reps):
            fresh = jax.block_until_ready(h.init_cache(dstream))
            times.append(seconds(exe, net.weights, fresh, ids, valid))
        recompute = min(times)
        prev = (K, recompute)
        sink = sink_step_seconds(h, K)
        out.append(
            {
                "K": K,
                "recompute_ms_per_token": recompute * 1e3,
                "recompute_repeats": reps,
                "sink_ms_per_token": sink * 1e3,
                "speedup": recompute / sink,
            }
        )
        h.row(
            "recompute",
            f"K={K}: window re-computation vs sink step",
            f"{recompute / sink:.1f}x",
            f"{recompute * 1e3:.0f} vs {sink * 1e3:.1f} ms/token",
        )
        log(f"recompute K={K}: {recompute * 1e3:.0f} ms vs sink {sink * 1e3:.1f} ms")
    return {
        "by_K": out,
        "skipped": skipped,
        "note": (
            f"Ks whose estimated re-computation exceeds {RECOMPUTE_BUDGET_S} s per token are "
            "skipped. re-computation = one dense forward over the last K tokens with a fresh cache "
            "(entry.last_logits, chunk C = K), timed per generated token; sink = one decode "
            f"step with S = {SINKS}, W = K - {SINKS} on a full ring (zero contents: the cost "
            "is shape-bound). The StreamingLLM paper reports 22x at K = 4096 on a GPU."
        ),
    }


def sink_step_seconds(h: Harness, K: int) -> float:
    """Best seconds per decode step of a sink cache of K slots on a full ring."""
    net, steps = h.net, h.sizes["recompute_steps"]
    stream = StreamConfig.for_mode("sink", SINKS, K - SINKS)
    cache = h.init_cache(stream)
    cache = cache.replace(pos=cache.pos + 2 * K)  # a full ring (cost is shape-bound)
    exe = h.decode_exe(net, cache, steps)
    logits = np.zeros((1, h.cfg.vocab_size), np.float32)
    h.run_decode(exe, net, cache, logits, steps)
    return min(h.run_decode(exe, net, cache, logits, steps)[0] for _ in range(h.repeats)) / steps
