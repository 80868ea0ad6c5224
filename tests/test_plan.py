"""`jaxsink plan`: its figures against a hand computation, its flags, its errors. (Lowering for
cuda and tpu needs 8 devices: `tests/support/sharded_checks.py`.)"""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from jaxsink import plan
from jaxsink.cli import main as cli_main
from jaxsink.sharding import MeshSpec

# Llama 2 7B, by hand (bfloat16, sink cache S + W = 4 + 4092, batch 8, mesh data=1, model=8)
V, D, F, L, N, H = 32000, 4096, 11008, 32, 32, 128
K = 4096  # cache slots
SHARDED = 2 * V * D + L * (4 * D * D + 3 * D * F)  # embed, lm_head, q/k/v/o, gate/up/down
REPLICATED = 2 * L * D + D  # the norms
PARAMS = SHARDED * 2 // 8 + REPLICATED * 2
CACHE = L * 2 * 8 * (N // 8) * H * K * 2 + 8 * 4 * 2  # keys, values of 8 rows; pos, epoch


def run_plan(capsys, *flags) -> dict:
    argv = ["plan", "--model", "llama-2-7b", "--batch", "8", "--sinks", "4", "--window", "4092"]
    assert cli_main([*argv, "--dtype", "bfloat16", "--json", *flags]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


def test_figures_equal_a_hand_computation(capsys):
    p = run_plan(capsys, "--mesh", "data=1,model=8", "--device-memory", "16GiB")
    assert p["params_bytes_per_device"] == PARAMS
    assert abs(PARAMS / (6_738_415_616 * 2 / 8) - 1) < 0.05  # the model's parameter count
    assert p["cache_bytes_per_device"] == CACHE
    # the largest step's working set per row: chunk 256 against one ring block (4092 slots in
    # blocks of 1023) plus itself
    C, T, G = 256, 1023 + 256, 1
    one_row = 2 * D * C * 2 + (N // 8) * (G + 2) * H * C * 2 + (N // 8) * C * G * T * 4
    one_row += 2 * (F // 8) * C * 2 + (V // 8) * C * 4
    assert p["activation_bytes_per_device"] == 8 * one_row
    assert p["total_bytes_per_device"] == PARAMS + CACHE + 8 * one_row
    per_row = CACHE // 8 + one_row  # CACHE // 8: one row's keys, values, position and epoch
    assert p["max_batch"] == (16 * 2**30 - PARAMS) // per_row
    assert p["lowered"] == [] and p["notes"] == []


def test_data_parallel_rows_and_replication_notes(capsys):
    """data = 2 splits the rows, not the weights; 32 kv heads over model = 3 are replicated and
    said so."""
    p = run_plan(capsys, "--mesh", "data=2,model=1")
    assert p["params_bytes_per_device"] == SHARDED * 2 + REPLICATED * 2
    assert p["cache_bytes_per_device"] == (CACHE - 64) * 8 // 2 + 4 * 4 * 2
    p = run_plan(capsys, "--mesh", "data=1,model=3")
    assert any("does not divide model=3" in n for n in p["notes"])


def test_bundled_configs_and_their_sizes():
    """The shipped configs hold the published models' parameter counts."""
    assert plan.bundled() == [
        "llama-2-70b",
        "llama-2-7b",
        "llama-3-8b",
        "mistral-7b",
        "mixtral-8x7b",
    ]
    one_device = plan._sizes(MeshSpec())
    for name, billions in (("llama-3-8b", 8.03), ("llama-2-70b", 68.98), ("mixtral-8x7b", 46.70)):
        cfg = plan.read_model_config(name)
        count = plan.params_bytes(cfg, jnp.float32, one_device) / 4
        assert abs(count / (billions * 1e9) - 1) < 0.01, name
    mistral = plan.read_model_config("mistral-7b")  # v0.1: every layer a native 4096 window
    assert {s.attention.sliding_window for s in mistral.layers} == {4096}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "llama-9b"], "model 'llama-9b' not found"),
        (["--model", "llama-2-7b", "--device-memory", "lots"], "--device-memory 'lots'"),
        (["--model", "llama-2-7b", "--mesh", "data=two"], "--mesh 'data=two'"),
        (["--model", "llama-2-7b", "--batch", "0"], "--batch must be >= 1"),
        (["--model", "llama-2-7b", "--mesh", "model=2", "--lower"], "needs 2 devices"),
    ],
)
def test_bad_plans_exit_2_with_one_line(capsys, flags, message):
    assert cli_main(["plan", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
