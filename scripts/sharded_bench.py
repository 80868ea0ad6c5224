"""Sharded against single-device decode on forced host devices, and the size of the prefill and
decode steps lowered for cuda and tpu.

Each device count runs in its own process (XLA fixes the count at start-up): the default model
loaded over a data=1, model=N mesh, greedy decode of 128 tokens after a ~300-token prompt, best
of 3. Forced host devices share this machine's cores, so no speed-up is expected; the figure is
the overhead of the partitioned program and its collectives. Then `jaxsink plan --lower` exports
the real steps for cuda and tpu over 8 devices and reports their StableHLO sizes.

    python scripts/sharded_bench.py            # JSON to docs/results/sharded.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The quick brown fox jumps over the lazy dog. " * 30


def worker(model: str | None, devices: int) -> dict:
    """Decode tok/s on a data=1, model=`devices` mesh (in a process with that many devices)."""
    import jax

    import jaxsink
    from jaxsink.generate import Generation

    m = jaxsink.load(model, mesh=f"data=1,model={devices}")
    runs = []
    for _ in range(4):  # the first compiles
        gen = Generation(m, PROMPT, max_new_tokens=128)
        list(gen)
        runs.append(gen.stats.as_dict()["decode_tokens_per_s"])
    return {"devices": len(jax.devices()), "mesh_model": devices, "decode_tok_s": max(runs[1:])}


def run(args: list[str], devices: int) -> str:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default=None, help="jaxsink checkpoint (default: SmolLM2)")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--out", default=str(ROOT / "docs/results/sharded.json"))
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.model, args.worker)))
        return 0
    model = ["--model", args.model] if args.model else []
    decode = []
    for n in args.devices:
        r = json.loads(run([sys.executable, __file__, *model, "--worker", str(n)], n))
        decode.append(r)
        print(f"decode over model={n}: {r['decode_tok_s']:.1f} tok/s", flush=True)
    for r in decode:
        r["vs_one_device"] = r["decode_tok_s"] / decode[0]["decode_tok_s"]
    lowered = {}
    from jaxsink.default_model import resolve_model

    for name in (str(resolve_model(args.model)), "llama-2-7b"):
        for platform in ("cuda", "tpu"):
            plan = [sys.executable, "-m", "jaxsink.cli", "plan", "--model", name, "--lower"]
            plan += ["--mesh", "data=1,model=8", "--platform", platform, "--json"]
            sizes = json.loads(run(plan, 8))["lowered_bytes"]
            key = f"{Path(name).name} {platform}"
            lowered[key] = sizes
            print(f"{key}: prefill {sizes['prefill'] / 1e6:.2f} MB, decode "
                  f"{sizes['decode'] / 1e6:.2f} MB of StableHLO", flush=True)  # fmt: skip
    result = {
        "decode": decode,
        "lowered_bytes": lowered,
        "note": "forced host devices share the machine's cores: the ratio is the overhead of "
        "partitioning, not a speed-up; lowered sizes are serialized StableHLO (jax.export)",
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
