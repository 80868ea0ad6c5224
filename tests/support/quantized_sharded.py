"""Sharding checks of quantized weights that need several devices, run in a child process with
4 forced host devices (`tests/test_quantized.py` starts it). Prints one JSON object.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.support.quantized_sharded OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import jax
import numpy as np

import jaxsink
from jaxsink import sharding as sh
from jaxsink.checkpoint import save_checkpoint
from jaxsink.config import StreamConfig
from jaxsink.traced import entry, quant
from jaxsink.traced.entry import EntryPoint
from tests.support.sharded_checks import sharded_step_inputs
from tests.support.tiny import MIXED_KINDS, block_config, quantized_params, random_flat_params

STREAM = StreamConfig(2, 5)
DTYPES = {"s8": "int8", "f32": "float32"}


def fresh_step() -> EntryPoint:
    """`entry.step` traced anew (a new function: `quant.DEQUANT_BYTES` is read at trace time)."""

    def step(weights, cache, tokens, valid, graphdef):
        return entry._step(weights, cache, tokens, valid, graphdef)

    return EntryPoint(step, static=("graphdef",), donate=("cache",))


def step_for(m, batch: int, chunk: int):
    """(a fresh step compiled with the mesh's shardings for [batch, chunk] tokens, a cache)."""
    args, shardings = sharded_step_inputs(m, STREAM, batch, chunk)
    exe = fresh_step().with_shardings(*shardings).lower(*args, m.graphdef).compile()
    return exe, args[1]


def feed(m, tokens: np.ndarray, chunk: int) -> np.ndarray:
    """Logits [B, N, V] of tokens [B, N] (N a multiple of `chunk`) fed through a fresh step."""
    exe, cache = step_for(m, tokens.shape[0], chunk)
    outs = []
    for i in range(0, tokens.shape[1], chunk):
        part = tokens[:, i : i + chunk]
        logits, cache = exe(m.weights, cache, part, np.ones_like(part, bool))
        outs.append(sh.to_host(logits))
    return np.concatenate(outs, axis=1)


def gathered_weights(m) -> dict:
    """All-gathers in the compiled sharded decode step of as many elements, of the same dtype,
    as a weight (or part of one: any reshaped view of it counts)."""
    exe, _ = step_for(m, 1, 1)
    found = re.findall(r"= (s8|f32)\[([\d,]*)\][^=]*? all-gather\(", exe.as_text())
    weights = {(str(v.dtype), v.size) for v in jax.tree.leaves(m.weights)}
    logits = f"1,1,{m.cfg.vocab_size}"  # the step's own logits (as many as int8 embed scales)
    return {
        f"{t}[{dims}]": 1
        for t, dims in found
        if (DTYPES[t], math.prod(map(int, dims.split(",")))) in weights and dims != logits
    }


def main(out_dir: str) -> None:
    out_dir = Path(out_dir)
    cfg = dataclasses.replace(block_config(), vocab_size=96)  # every dimension divides 2
    qcfg, stored, _ = quantized_params(cfg, MIXED_KINDS, seed=13)
    path = save_checkpoint(out_dir / "q", qcfg, stored, "float32", {})
    report: dict = {"devices": len(jax.devices()), "logits_max_diff": {}}
    tokens = np.random.default_rng(14).integers(0, 96, size=(2, 20)).astype(np.int32)
    want = feed(jaxsink.load(path, progress=False), tokens, 5)  # one device, whole products
    report["weights_all_gathered"] = {}
    for bytes_ in (quant.DEQUANT_BYTES, 4096):  # whole products, then sliced ones
        quant.DEQUANT_BYTES = bytes_
        meshes = ("data=1,model=2",) + (("data=2,model=2",) if bytes_ == 4096 else ())
        for mesh in meshes:
            m = jaxsink.load(path, mesh=mesh, progress=False)
            got = feed(m, tokens, 5)
            case = f"{mesh} dequant_bytes={bytes_}"
            report["logits_max_diff"][case] = float(np.abs(got - want).max())
            if mesh == "data=1,model=2":
                report["weights_all_gathered"] |= gathered_weights(m)
    # int8 (one scale per row: codes split, scales whole along the input axis), made as a
    # float checkpoint loads, sharded over model=2
    floats = save_checkpoint(out_dir / "f", cfg, random_flat_params(cfg, 15), "float32", {})
    for kind in ("int8",):
        one = feed(jaxsink.load(floats, progress=False, quantize=kind), tokens, 5)
        m = jaxsink.load(floats, mesh="data=1,model=2", progress=False, quantize=kind)
        report[f"{kind}_max_diff"] = float(np.abs(feed(m, tokens, 5) - one).max())
        report[f"{kind}_weights_all_gathered"] = gathered_weights(m)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
