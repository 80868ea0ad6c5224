"""Sharding checks that need many devices, run in a child process started with 8 forced host
devices (`tests/test_sharding.py` starts it with `forced_devices_report`; JAX fixes its device
count at start-up). Prints one JSON object of measured values; the tests assert on them.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.support.sharded_checks OUT_DIR

`forced_devices_report` and `sharded_step_inputs` also serve `tests/support/quantized_sharded.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import jaxsink
from jaxsink import layout
from jaxsink import sharding as sh
from jaxsink.checkpoint import save_checkpoint
from jaxsink.cli import main as cli_main
from jaxsink.config import ConfigError, StreamConfig
from jaxsink.evaluate import stream_nll
from jaxsink.executables import compiled
from jaxsink.generate import Generation
from jaxsink.traced import entry
from tests.support.tiny import random_flat_params, tiny_config, write_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MESHES = ("data=1,model=2", "data=2,model=2", "data=4,model=2")
STREAMS = {"sink": StreamConfig(2, 5), "dense": StreamConfig(0, 32, "dense")}


def forced_devices_report(module: str, devices: int, out_dir: Path) -> dict:
    """Run `python -m <module> <out_dir>` in a child process with `devices` forced host devices
    and return the JSON object its last stdout line holds (its stderr's tail if it fails)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    run = subprocess.run(
        [sys.executable, "-m", module, str(out_dir)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def sharded_step_inputs(m, stream, batch: int, chunk: int, cache_dtype=None):
    """What a step sharded over the model's mesh is compiled from, for tokens [batch, chunk].

    Returns (args, shardings): args = (weights, cache, tokens [batch, chunk] int32 zeros, valid
    [batch, chunk] bool), the cache a fresh sharded one in `cache_dtype` (default the model's);
    shardings = (in: weights, cache, tokens, valid; out: logits [batch, chunk, V], cache).
    """
    cache = sh.sharded_cache(m.cfg, stream, batch, cache_dtype or m.dtype, m.mesh)
    cache_sharding = sh.cache_shardings(cache, m.mesh)
    row = sh.rows(m.mesh, (batch, chunk))
    shardings = (
        (m.weight_shardings, cache_sharding, row, row),
        (sh.rows(m.mesh, (batch, chunk, m.cfg.vocab_size)), cache_sharding),
    )
    zeros = np.zeros((batch, chunk), np.int32)
    return (m.weights, cache, zeros, zeros.astype(bool)), shardings


def sharded_feed(m, stream, tokens: np.ndarray, chunk: int, cache_dtype=None) -> np.ndarray:
    """Logits [B, N, V] of feeding tokens [B, N] in chunks through `entry.step` compiled with the
    model mesh's shardings (the cache in `cache_dtype`, default the model's)."""
    B, N = tokens.shape
    args, shardings = sharded_step_inputs(m, stream, B, chunk, cache_dtype)
    exe, _ = compiled(entry.step, "step", args, {"graphdef": m.graphdef}, shardings)
    cache = args[1]
    outs = []
    for i in range(0, N, chunk):
        part = tokens[:, i : i + chunk]
        padded, valid = np.zeros((B, chunk), np.int32), np.zeros((B, chunk), bool)
        padded[:, : part.shape[1]], valid[:, : part.shape[1]] = part, True
        logits, cache = exe(m.weights, cache, padded, valid)
        outs.append(sh.to_host(logits)[:, : part.shape[1]])
    return np.concatenate(outs, axis=1)


def spec_of(x) -> list:
    return [None if a is None else str(a) for a in x.sharding.spec]


def main(out_dir: str) -> None:
    out_dir = Path(out_dir)
    cfg = dataclasses.replace(tiny_config(), vocab_size=96)  # every dimension divides 2
    flat = random_flat_params(cfg, seed=1)
    write_tokenizer(out_dir, 96)  # word-level: enough for generation to detokenize
    tokenizer = {"tokenizer.json": (out_dir / "tokenizer.json").read_bytes()}
    path = save_checkpoint(out_dir / "tiny", cfg, flat, "float32", tokenizer)
    report: dict = {"devices": len(jax.devices())}

    # Sharded equals single-device, every mesh, sink and dense, a batch of 4 streams.
    single = jaxsink.load(path)
    tokens = np.random.default_rng(0).integers(0, 96, size=(4, 30)).astype(np.int32)
    want = {name: sharded_feed(single, s, tokens, 8) for name, s in STREAMS.items()}
    report["logits_max_diff"] = {}
    for mesh in MESHES:
        m = jaxsink.load(path, mesh=mesh)
        for name, stream in STREAMS.items():
            got = sharded_feed(m, stream, tokens, 8)
            report["logits_max_diff"][f"{mesh} {name}"] = float(np.abs(got - want[name]).max())

    # The rules on every leaf (data=2, model=2).
    m = jaxsink.load(path, mesh="data=2,model=2")

    # An int8 cache (codes and scales sharded like float buffers) equals its single-device run.
    one, many = (sharded_feed(x, STREAMS["sink"], tokens, 8, np.int8) for x in (single, m))
    report["int8_logits_max_diff"] = float(np.abs(one - many).max())
    cache = sh.sharded_cache(cfg, STREAMS["sink"], 4, np.int8, m.mesh)
    report["int8_cache_specs"] = sorted({json.dumps(spec_of(x)) for x in jax.tree.leaves(cache)})
    report["weight_specs"] = {
        layout.name_of(k): spec_of(v.get_value()) for k, v in nnx.to_flat_state(m.weights)
    }
    report["weight_names"] = {
        layout.name_of(k): list(v.get_value())
        for k, v in nnx.to_flat_state(nnx.get_partition_spec(layout.abstract(cfg)[1]))
    }
    cache = sh.sharded_cache(cfg, STREAMS["sink"], 4, m.dtype, m.mesh)
    report["cache_specs"] = sorted({json.dumps(spec_of(x)) for x in jax.tree.leaves(cache)})

    # No weight is all-gathered in a sharded decode step (model = 2).
    m2 = jaxsink.load(path, mesh="data=1,model=2")
    args, shardings = sharded_step_inputs(m2, STREAMS["sink"], 1, 1)
    exe, _ = compiled(entry.step, "step", args, {"graphdef": m2.graphdef}, shardings)
    hlo = exe.as_text()
    gathered = re.findall(r"= f32\[([\d,]*)\][^=]*? all-gather\(", hlo)
    weight_shapes = {",".join(map(str, v.shape)) for v in jax.tree.leaves(m2.weights)}
    report["all_gathers"] = gathered
    report["weights_all_gathered"] = sorted(set(gathered) & weight_shapes)

    # Whole commands and APIs: ppl through the CLI, perplexity and greedy generation.
    ids = np.random.default_rng(2).integers(0, 96, size=200)
    np.save(out_dir / "ids.npy", ids)
    nll = {}
    for name, flags in (("single", []), ("mesh", ["--mesh", "data=1,model=2"])):
        argv = ["ppl", "--model", str(path), "--tokens", str(out_dir / "ids.npy")]
        argv += ["--n-tokens", "199", "--mode", "sink", "--sinks", "2", "--window", "5"]
        assert cli_main([*argv, "--quiet", "--out", str(out_dir / name), *flags]) == 0
        nll[name] = np.load(out_dir / name / "nll_sink.npy")
    report["cli_ppl_max_diff"] = float(np.abs(nll["single"] - nll["mesh"]).max())
    dense = [stream_nll(x, ids[:60], "dense", progress=False).nll for x in (single, m)]
    report["api_dense_nll_max_diff"] = float(np.abs(dense[0] - dense[1]).max())
    tokens_of = {}
    for name, x in (("single", single), ("mesh", m)):
        gen = Generation(x, ids[:20].tolist(), max_new_tokens=12, sinks=2, window=5)
        list(gen)
        tokens_of[name] = gen.token_ids
    report["greedy_tokens"] = tokens_of

    # jaxsink plan lowers the real prefill and decode steps for tpu and cuda over 8 devices.
    argv = ["plan", "--model", "llama-2-7b", "--batch", "8", "--sinks", "4", "--window", "4092"]
    argv += ["--dtype", "bfloat16", "--lower", "--json"]
    report["plan"] = {}
    for platform in ("tpu", "cuda"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = cli_main([*argv, "--mesh", "data=1,model=8", "--platform", platform])
        report["plan"][platform] = {"rc": rc, "json": json.loads(out.getvalue())}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli_main([*argv, "--mesh", "data=1,model=16", "--platform", "tpu"])
    report["plan_too_big"] = {"rc": rc, "stderr": err.getvalue()}

    # A mesh larger than the machine is a clear error.
    try:
        sh.make_mesh("data=4,model=4")
        report["too_big"] = None
    except ConfigError as e:
        report["too_big"] = str(e)

    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
