"""The prefill section: chunked prefill tok/s against the chunk length C (sink mode, K = 1024)."""

from __future__ import annotations

import time

import jax
import numpy as np
from measure import timed

from benchmarks.harness import Harness, log
from benchmarks.sizes import SINKS, WINDOW
from jaxsink.config import StreamConfig


def run(h: Harness) -> dict:
    """The prefill section."""
    sz, net = h.sizes, h.net
    stream = StreamConfig.for_mode("sink", SINKS, WINDOW)
    out = []
    for C in sz["prefill_chunks"]:
        n = {1: sz["prefill_tokens_c1"], 16: sz["prefill_tokens_c16"]}.get(C, sz["prefill_tokens"])
        n = max(n, C)
        ids = h.tokens(n, seed=3)[None]
        jax.block_until_ready(h.prefill(net, h.init_cache(stream), ids[:, :C], C))  # warm-up
        cache = jax.block_until_ready(h.init_cache(stream))
        chunk_s = []
        start = time.perf_counter()
        for i in range(0, n, C):
            (_, cache), seconds = timed(h.prefill, net, cache, ids[:, i : i + C], C)
            chunk_s.append(seconds)
        total = time.perf_counter() - start
        tok_s = n / total
        median_tok_s = C / float(np.median(chunk_s))
        out.append({"chunk": C, "tokens": n, "tok_s": tok_s, "tok_s_median_chunk": median_tok_s})
        h.row(
            "prefill",
            f"chunked prefill, C={C}",
            f"{tok_s:.1f} tok/s",
            f"{n} tokens, sink K=1024; median chunk {median_tok_s:.1f} tok/s",
        )
        log(f"prefill C={C}: {tok_s:.1f} tok/s")
    return {
        "by_chunk": out,
        "note": (
            "sink mode S = 4, W = 1020 from an empty cache; entry.last_logits per chunk "
            f"(vocabulary projection of each chunk's last token only); {sz['prefill_tokens']} "
            f"tokens per chunk length, fewer for C = 1 ({sz['prefill_tokens_c1']}) and C = 16 "
            f"({sz['prefill_tokens_c16']}) to keep the run short; one timed pass per C after a "
            "warm-up chunk (tok_s = tokens / total seconds; tok_s_median_chunk = C / the "
            "median chunk's seconds, less sensitive to other processes)"
        ),
    }
