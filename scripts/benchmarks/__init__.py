"""`scripts/bench.py`'s benchmarks: one module per section (or per pair of close ones) over one
harness.

- `sizes`: the full and the --quick run's sizes, and the stream every section runs.
- `harness`: the model and the network a section runs, the compiled-executable cache, prompt
  tokens, prefill and the engine's decode loop timed, the results table.
- `baseline`: transformers in a child process (`bench.py --hf-worker`), never importing JAX.
- `report`: the targets, the markdown table and the JSON report.
- `run`: the sections run in order, each under a load meter.
- sections: `decode` (decode, bf16), `bounds` (bounds, the memory bandwidth), `flat`,
  `recompute`, `prefill`, `batch`, `memory`, `roofline`, `experts`, `weights`, `policies`.

Only `sizes`, `baseline` and `report` are importable without JAX (the transformers worker and
the argument parser use them); the rest import it.
"""

SECTIONS = (
    "decode",
    "bounds",
    "flat",
    "recompute",
    "prefill",
    "batch",
    "memory",
    "bf16",
    "roofline",
    "experts",
    "weights",
    "policies",
)
