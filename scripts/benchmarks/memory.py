"""The memory section: compilations, RSS, live device bytes and cache bytes at the start and the
end of a long sink stream."""

from __future__ import annotations

import jax
from measure import reset_peak_rss, rss

from benchmarks.harness import Harness, every_row, greedy_rows, no_eos, traces
from benchmarks.sizes import SINKS, WINDOW
from jaxsink.config import StreamConfig


def snapshot(cache) -> dict:
    """The stream's position, compilations so far, cache and live device bytes, and RSS, once
    `cache` is ready."""
    jax.block_until_ready(cache)
    out = {
        "stream_position": int(cache.pos[0]),
        "compiles": traces(),
        "cache_bytes": cache.nbytes,
        "live_device_bytes": sum(a.nbytes for a in jax.live_arrays()),
    }
    now = rss()
    return out | {"rss_kib": now.current_kib, "peak_rss_kib": now.peak_kib}


def run(h: Harness) -> dict:
    """The memory section."""
    sz, net = h.sizes, h.net
    stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
    block, C = sz["memory_decode_block"], 256
    ids = h.tokens(sz["memory_tokens"], seed=5)
    peak_reset = reset_peak_rss()
    cache = h.init_cache(stream)
    exe = h.decode_exe(net, cache, block)
    i, start = 0, None
    while i < len(ids):
        logits, cache = h.prefill(net, cache, ids[None, i : i + C], C)
        i += C
        rows = greedy_rows(net.cfg, 1, block, logits)
        _, cache, _ = exe(net.weights, cache, rows, every_row(1), no_eos())
        if start is None:
            start = snapshot(cache)
        if int(cache.pos[0]) >= sz["memory_tokens"]:
            break
    end = snapshot(cache)
    res = {
        "start": start,
        "end": end,
        "peak_rss_reset": peak_reset,
        "constant": (
            end["compiles"] == start["compiles"]
            and end["cache_bytes"] == start["cache_bytes"]
            and end["live_device_bytes"] == start["live_device_bytes"]
            and end["rss_kib"] - start["rss_kib"] < 32 * 1024
        ),
        "note": (
            f"one sink stream alternating prefill chunks of {C} tokens and decode blocks of "
            f"{block} tokens; 'start' after the first chunk + block (everything compiled), "
            "'end' after the last; constant = same compiles, cache and live device bytes, "
            "and RSS within 32 MiB"
            + (
                ""
                if peak_reset
                else "; peak RSS could not be reset, so it includes earlier sections"
            )
        ),
    }
    for label, s in (("start", start), ("end", end)):
        h.row(
            "memory",
            f"{label} of stream (position {s['stream_position']:,})",
            f"{s['rss_kib'] / 1024:.0f} MiB RSS",
            f"peak {s['peak_rss_kib'] / 1024:.0f} MiB; cache {s['cache_bytes'] / 1e6:.1f} MB; "
            f"live {s['live_device_bytes'] / 1e6:.0f} MB; compiles so far {s['compiles']}",
        )
    return res
