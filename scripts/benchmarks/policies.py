"""The policies section: decode tok/s of B = 1 and B = 16 streams under each eviction policy
(`--policy sink|tova|h2o`) at the same K, interleaved; the ratios to `sink` are the figures."""

from __future__ import annotations

from benchmarks.harness import Harness, log
from benchmarks.sizes import SINKS, WINDOW
from jaxsink.config import POLICIES, StreamConfig
from jaxsink.traced import cache as kv


def run(h: Harness) -> dict:
    """The policies section."""
    sz, net = h.sizes, h.net
    steps = sz["batch_steps"]
    streams = {p: StreamConfig.for_mode("sink", SINKS, WINDOW, policy=p) for p in POLICIES}
    batches = (1, max(sz["batches"]))
    setups = {
        (B, p): h.decode_setup(net, stream, B, sz["batch_prompt"], steps, net.dtype)
        for B in batches
        for p, stream in streams.items()
    }
    runs: dict = {key: [] for key in setups}
    for _ in range(2 * h.repeats):  # every setup in each round: ratios of the same load
        for key, timer in setups.items():
            runs[key].append(timer())
    out = []
    for B in batches:
        sink = min(runs[B, "sink"])
        for p, stream in streams.items():
            best = min(runs[B, p])
            out.append(
                {
                    "batch": B,
                    "policy": p,
                    "aggregate_tok_s": B * steps / best,
                    "ms_per_step": best / steps * 1e3,
                    "vs_sink": sink / best,
                    "cache_bytes": kv.cache_bytes(net.cfg, stream, B, net.dtype),
                }
            )
            log(f"policies B={B} {p}: {B * steps / best:.1f} tok/s, {sink / best:.2f}x sink")
            h.row(
                "policies",
                f"decode, B={B}, --policy {p}",
                f"{B * steps / best:.1f} tok/s",
                f"{best / steps * 1e3:.1f} ms/step; {sink / best:.2f}x sink",
            )
    return {
        "by_policy": out,
        "steps_timed": steps,
        "note": f"sink mode K = {SINKS + WINDOW}, each row prefilled with its own "
        f"{sz['batch_prompt']} random tokens (a decode step's cost does not depend on whether "
        "the cache is full: every slot is read and the eviction computed either way); every "
        "setup timed in each round, best round",
    }
