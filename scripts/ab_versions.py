"""Before / after speed of whole commands across checkouts of jaxsink, alternated in rounds.

Each round runs, for every version in turn, `jaxsink generate` (a ~600-token prompt, 256 new
tokens: decode and prefill tok/s as it reports them) and `jaxsink ppl` (4,096 tokens, sink
mode: its tok/s, NLL and wall time), each in a fresh process with the version's checkout first
on PYTHONPATH. Alternating in rounds spreads a noisy machine's swings over every version.

    python scripts/ab_versions.py before=/tmp/before:/tmp/home_before now=. --rounds 3

A version is `name=CHECKOUT[:JAXSINK_HOME]` (a home per checkpoint format: older checkouts
convert the default model into a format of their own). Prints one JSON row per run and the
per-version means; writes every row to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = ("The quick brown fox jumps over the lazy dog. " * 60).strip()
FIGURES = ("decode", "prefill", "ppl_tok_s", "ppl_wall_s")


def run_version(root: Path, home: str | None) -> dict:
    """One generate and one ppl run of the checkout at `root`."""
    env = dict(os.environ, PYTHONPATH=str(root))
    if home:
        env["JAXSINK_HOME"] = home
    cmd = [sys.executable, "-m", "jaxsink.cli"]
    gen = subprocess.run(
        [*cmd, "generate", "--prompt", PROMPT, "--max-new-tokens", "256", "--json"],
        capture_output=True, text=True, env=env, cwd=root, check=True,
    )  # fmt: skip
    stats = json.loads(gen.stdout.strip().splitlines()[-1])
    start = time.perf_counter()
    ppl = subprocess.run(
        [*cmd, "ppl", "--n-tokens", "4096", "--mode", "sink", "--quiet", "--json"],
        capture_output=True, text=True, env=env, cwd=root, check=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    sink = json.loads(ppl.stdout.strip().splitlines()[-1])["modes"]["sink"]
    return {
        "decode": stats["decode_tokens_per_s"],
        "prefill": stats["prefill_tokens_per_s"],
        "ppl_tok_s": sink["tokens_per_s"],
        "ppl_nll": sink["nll_mean"],
        "ppl_wall_s": wall,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("versions", nargs="+", help="name=CHECKOUT[:JAXSINK_HOME]")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="docs/results/ab_versions.json")
    args = p.parse_args(argv)
    versions = {}
    for spec in args.versions:
        name, _, where = spec.partition("=")
        root, _, home = where.partition(":")
        versions[name] = (Path(root).resolve(), home or None)
    rows = []
    for r in range(args.rounds):
        for name, (root, home) in versions.items():
            row = {"round": r, "version": name, **run_version(root, home)}
            row["load"] = os.getloadavg()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    for name in versions:
        mine = [row for row in rows if row["version"] == name]
        means = {k: round(statistics.mean(row[k] for row in mine), 1) for k in FIGURES}
        print(f"{name}: mean {means}")
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
