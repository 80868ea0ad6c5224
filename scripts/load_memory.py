"""Peak host memory while loading a checkpoint: `jaxsink.load` (each tensor read from the
memory-mapped safetensors file straight into its device shards) against reading the whole file
into numpy first and then placing it (the loader before sharded loading).

Each measurement runs in a fresh process: its peak RSS (VmHWM: ru_maxrss would carry the parent's
peak across exec) minus the RSS after importing JAX and jaxsink, next to the weight bytes. On a CPU backend the "devices" are host
memory too, so the floor is one copy of the weights; what matters is what comes on top.

    python scripts/load_memory.py                      # the default model
    python scripts/load_memory.py --synthetic-gb 3     # also a ~3 GB random Llama-shaped one
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import rss

ROOT = Path(__file__).resolve().parent.parent


def measure(path: str, how: str) -> dict:
    """In this (fresh) process: load `path` the way `how` says; RSS figures in bytes."""
    import jax

    import jaxsink
    from jaxsink import layout
    from jaxsink.checkpoint import load_params, read_config

    jax.devices()  # the backend's own memory belongs to the baseline
    base = rss().peak_kib * 1024
    if how == "sharded":
        m = jaxsink.load(path)
        weights = m.weights
    else:  # the whole file in numpy, then on device
        cfg, _ = read_config(path)
        flat = load_params(path, cfg)
        weights = jax.block_until_ready(layout.from_flat(cfg, flat, jax.numpy.float32)[1])
        del flat
    peak = rss().peak_kib * 1024
    return {"baseline_rss": base, "peak_rss": peak, "weight_bytes": layout.param_bytes(weights)}


def synthetic(gb: float, out: Path) -> Path:
    """A random float32 Llama-shaped checkpoint of about `gb` GB, written tensor by tensor's
    worth of memory at most twice (safetensors writes from a dict of the arrays)."""
    import numpy as np

    from jaxsink.checkpoint import save_checkpoint
    from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm, Rotary
    from jaxsink.layout import param_shapes

    D, F, V = 2048, 5632, 32000
    per_layer = 4 * D * D + 3 * D * F
    layers = max(1, round((gb * 1e9 / 4 - 2 * V * D) / per_layer))
    attention = Attention(16, 16, 128, Rotary(10000.0, 128), 128**-0.5)
    layer = LayerSpec(attention, Mlp(F, "silu"), Norm("rms", 1e-5))
    cfg = ModelConfig("llama", V, D, (layer,) * layers, Norm("rms", 1e-5), 2048)
    rng = np.random.default_rng(0)
    flat = {
        name: rng.standard_normal(shape, dtype=np.float32) * 0.02
        for name, shape in param_shapes(cfg).items()
    }
    return save_checkpoint(out, cfg, flat, "float32", {}, overwrite=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the default model)")
    p.add_argument("--synthetic-gb", type=float, default=0.0, help="also a synthetic model")
    p.add_argument("--out", default=str(ROOT / "docs/results/load_memory.json"))
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(*args.worker)))
        return 0
    from jaxsink.default_model import resolve_model

    models = {"default": str(resolve_model(args.model))}
    tmp = tempfile.TemporaryDirectory()
    if args.synthetic_gb:
        models[f"synthetic {args.synthetic_gb:g} GB"] = str(
            synthetic(args.synthetic_gb, Path(tmp.name) / "synthetic")
        )
    results = {}
    for name, path in models.items():
        for how in ("sharded", "whole-file"):
            run = subprocess.run(
                [sys.executable, __file__, "--worker", path, how],
                capture_output=True,
                text=True,
                check=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
            r = json.loads(run.stdout.strip().splitlines()[-1])
            r["above_weights"] = r["peak_rss"] - r["baseline_rss"] - r["weight_bytes"]
            results[f"{name}, {how}"] = r
            print(
                f"{name:>18} {how:>10}: weights {r['weight_bytes'] / 2**20:8.1f} MiB, "
                f"peak RSS above the baseline {(r['peak_rss'] - r['baseline_rss']) / 2**20:8.1f} "
                f"MiB ({r['above_weights'] / 2**20:+.1f} MiB beyond one copy of the weights)"
            )
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
