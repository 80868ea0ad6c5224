"""scripts/soak.py: a short soak of the real default model, and its on-device finiteness check.

The short soak runs the script itself (a child process, so that its RSS is its own) for a few
thousand tokens of Shakespeare through the real SmolLM2, prefill then decode, and asserts every
logit finite and the cache bytes constant; it prints RSS but never asserts on it (memory is
measured by the script's full runs, not in tests). The check's two paths (the bound that proves
a chunk's logits finite, and the full count when it cannot) are tested on a tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsink.config import StreamConfig
from jaxsink.traced import cache as kv
from jaxsink.traced import entry
from tests.support.tiny import random_flat_params, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_soak_of_the_default_model(smollm2_dir, jaxsink_test_home, tmp_path):
    out = tmp_path / "soak.json"
    tokens, decode, every = 1500, 40, 500
    env = {**os.environ, "JAXSINK_HOME": str(jaxsink_test_home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--model",
            str(smollm2_dir),
            "--tokens",
            str(tokens),
            "--decode",
            str(decode),
            "--sample-every",
            str(every),
            "--print-every",
            str(every),
            "--max-rss-growth",
            "inf",  # reported, not asserted
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads(out.read_text())
    assert s["ok"] and s["complete"] and s["failure"] is None
    assert s["tokens_streamed"] == s["stream_position"] == tokens
    assert s["decode_steps"] == decode
    assert s["non_finite_logits"] == 0
    assert [x["tokens"] for x in s["samples"]] == [0, 500, 1000, 1500]
    assert all(x["non_finite_logits"] == 0 for x in s["samples"])
    assert s["cache_bytes_constant"]
    assert len({x["cache_bytes"] for x in s["samples"]}) == 1
    assert s["compiles"] == 2 and s["compiles_during_stream"] == 0
    assert (tmp_path / "soak.png").is_file()
    rss = [x["rss_kib"] // 1024 for x in s["samples"]]
    print(f"short soak RSS (MiB) at {[x['tokens'] for x in s['samples']]}: {rss}")


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, random_flat_params(cfg, seed=3)


def _run_chunk(soak, m, tokens, valid):
    stream = StreamConfig(sinks=2, window=6)
    cache = kv.init_cache(m.cfg, stream, 1, jnp.float32)
    bound = soak.head_bound(m.weights, graphdef=m.graphdef)
    counts = jnp.zeros(2, jnp.int32)
    counts, nxt, _ = soak.soak_chunk(
        m.weights, cache, tokens, valid, bound, counts, graphdef=m.graphdef
    )
    return np.asarray(counts), np.asarray(nxt), np.asarray(bound)


def test_finite_chunk_is_proven_and_next_token_is_greedy(tiny):
    soak = _soak_module()
    cfg, flat = tiny
    m = tiny_model(cfg, flat)
    tokens = np.array([[5, 9, 11, 2, 40, 0, 0, 0]], np.int32)
    valid = np.array([[True] * 5 + [False] * 3])
    counts, nxt, bound = _run_chunk(soak, m, tokens, valid)
    assert counts.tolist() == [0, 0]  # the bound proved every logit finite
    head = flat["embed"]
    assert bound[0] == pytest.approx(np.abs(head).sum(axis=1).max(), rel=1e-5)
    cache = kv.init_cache(m.cfg, StreamConfig(sinks=2, window=6), 1, jnp.float32)
    logits, _ = entry.step(m.weights, cache, tokens, valid, graphdef=m.graphdef)
    assert nxt.tolist() == [[int(np.argmax(np.asarray(logits)[0, 4]))]]  # last valid token's


def test_non_finite_logits_are_counted_in_full(tiny):
    soak = _soak_module()
    cfg, flat = tiny
    flat = {**flat, "embed": flat["embed"].copy()}
    flat["embed"][7] = np.inf  # a head row of inf (tied): its logit is inf at every position
    m = tiny_model(cfg, flat)
    tokens = np.array([[5, 9, 11, 2, 40, 0, 0, 0]], np.int32)
    valid = np.array([[True] * 5 + [False] * 3])
    counts, _, _ = _run_chunk(soak, m, tokens, valid)
    # The bound is inf, so all the chunk's logits were computed: token 7's logit is non-finite
    # at each of the 5 valid positions (the padded ones are not counted).
    assert counts[1] == 1
    assert counts[0] >= 5
    logits, _ = entry.step(
        m.weights,
        kv.init_cache(m.cfg, StreamConfig(sinks=2, window=6), 1, jnp.float32),
        tokens,
        valid,
        graphdef=m.graphdef,
    )
    assert counts[0] == int((~np.isfinite(np.asarray(logits)[0, :5])).sum())
