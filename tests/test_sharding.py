"""Sharding over a device mesh: sharded runs equal the single-device run, the logical axis rules
on every leaf, no weight all-gathered in a decode step, the CLI's --mesh, a mesh too large.

The checks that need many devices run once in a child process with 8 forced host devices
(`tests/support/sharded_checks.py`): JAX fixes its device count when it starts."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from jaxsink import sharding as sh
from jaxsink.config import ConfigError
from tests.support.sharded_checks import forced_devices_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checks_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def report(checks_dir) -> dict:
    return forced_devices_report("tests.support.sharded_checks", 8, checks_dir)


@pytest.mark.devices
def test_sharded_equals_single_device(report):
    """data=1/model=2, data=2/model=2, data=4/model=2 over 4 streams, sink and dense."""
    assert report["devices"] == 8
    assert len(report["logits_max_diff"]) == 6
    for case, diff in report["logits_max_diff"].items():
        assert diff < 1e-4, case


@pytest.mark.devices
def test_an_int8_cache_sharded_equals_single_device(report):
    """data=2, model=2: an int8 cache's codes and scales over batch rows and kv heads, the
    same logits as on one device."""
    assert report["int8_logits_max_diff"] < 1e-4
    assert report["int8_cache_specs"] == ['["data", "model", null, null]', '["data"]']


@pytest.mark.devices
def test_commands_and_apis_equal_single_device(report):
    assert report["cli_ppl_max_diff"] < 1e-4  # jaxsink ppl --mesh data=1,model=2
    assert report["api_dense_nll_max_diff"] < 1e-4
    tokens = report["greedy_tokens"]
    assert tokens["single"] == tokens["mesh"] and len(tokens["single"]) == 12


@pytest.mark.devices
def test_every_leaf_is_sharded_as_the_rules_say(report):
    mesh = types.SimpleNamespace(shape={"data": 2, "model": 2})
    for name, names in report["weight_names"].items():
        want = sh.partition(tuple(names), _shape_of(name), mesh)
        assert report["weight_specs"][name] == list(want), name
    assert any("model" in spec for spec in report["weight_specs"].values())
    assert report["cache_specs"] == ['["data", "model", null, null]', '["data"]']


def _shape_of(name: str) -> tuple[int, ...]:
    """Shapes of the checks' tiny model (vocab 96, D 32, 4 heads of 8, 2 kv heads, MLP 48)."""
    import dataclasses

    from jaxsink.layout import param_shapes
    from tests.support.tiny import tiny_config

    return param_shapes(dataclasses.replace(tiny_config(), vocab_size=96))[name]


@pytest.mark.devices
def test_no_weight_is_all_gathered_in_a_decode_step(report):
    """Attention and MLP layouts let XLA reduce partial sums instead of gathering weights: the
    compiled sharded step's all-gathers (if any) are activations, never a weight."""
    assert report["weights_all_gathered"] == []


@pytest.mark.devices
def test_a_mesh_larger_than_the_machine_is_a_clear_error(report):
    assert "needs 16 devices, this machine has 8" in report["too_big"]
    with pytest.raises(ConfigError, match="needs 4 devices"):
        sh.make_mesh("data=2,model=2")  # this process has one device


@pytest.mark.devices
def test_plan_lowers_prefill_and_decode_for_tpu_and_cuda(report):
    """`jaxsink plan --model llama-2-7b ... --mesh data=1,model=8 --lower` exports the three steps
    for each platform; its parameter bytes per device are the model's / 8 within 5%."""
    for platform in ("tpu", "cuda"):
        run = report["plan"][platform]
        assert run["rc"] == 0
        p = run["json"]
        assert p["lowered"] == [platform]
        assert set(p["lowered_bytes"]) == {"prefill", "decode", "mixed"}
        assert abs(p["params_bytes_per_device"] / (6_738_415_616 * 2 / 8) - 1) < 0.05
    too_big = report["plan_too_big"]
    assert too_big["rc"] == 2 and too_big["stderr"].count("\n") == 1
    assert "needs 16 devices" in too_big["stderr"]


@pytest.mark.parametrize("text", ["data=0,model=2", "model=x", "data=2,data=2", "pipeline=2", ""])
def test_bad_mesh_flags(text):
    with pytest.raises(ConfigError, match="--mesh"):
        sh.MeshSpec.parse(text)


def test_replicated_dimensions_are_said_once():
    mesh = types.SimpleNamespace(shape={"data": 1, "model": 2})
    notes: set = set()
    spec = sh.partition(("kv_heads", None, "head_dim", "embed"), (3, 5, 64, 576), mesh, notes)
    assert tuple(spec) == (None, None, None, None)
    assert notes == {"jaxsink: kv_heads (3) does not divide model=2: replicated"}
    # one mesh axis is used once per weight: [E, 2, F, D] shards the experts, not F too
    spec = sh.partition(("experts", None, "mlp", "embed"), (4, 2, 48, 32), mesh, notes)
    assert tuple(spec) == ("model", None, None, None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.devices
def test_two_processes_equal_one(report, checks_dir, tmp_path):
    """Two local processes of 2 CPU devices each (jax.distributed with a local coordinator,
    gloo collectives) run `jaxsink ppl` and `jaxsink generate` over one data=1,model=4 mesh:
    each loads only its own shards, process 0 writes the output, and it equals the
    single-device run."""
    model, ids = checks_dir / "tiny", checks_dir / "ids.npy"
    ppl = ["ppl", "--model", str(model), "--tokens", str(ids), "--n-tokens", "199", "--quiet"]
    generate = ["generate", "--model", str(model), "--prompt", "t1 t2 t3 t4 t5"]
    commands = {
        "ppl": [*ppl, "--mode", "sink", "--sinks", "2", "--window", "5", "--out", str(tmp_path)],
        "generate": [*generate, "--max-new-tokens", "10"],
    }
    outputs = {}
    for name, argv in commands.items():
        port = _free_port()
        procs = []
        for i in range(2):
            env = dict(
                os.environ,
                XLA_FLAGS="--xla_force_host_platform_device_count=2",
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "jaxsink.cli", *argv, "--mesh", "data=1,model=4"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=ROOT,
                )
            )
        results = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:]
        outputs[name] = [out for out, _ in results]
    import numpy as np

    got = np.load(tmp_path / "nll_sink.npy")
    want = np.load(checks_dir / "single" / "nll_sink.npy")
    assert np.abs(got - want).max() < 1e-4
    single = subprocess.run(
        [sys.executable, "-m", "jaxsink.cli", *commands["generate"]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    # XLA:CPU's gloo collectives print their connections on stdout from several threads
    # (CPU multi-process only; lines may interleave): drop every line that mentions them
    lead, other = (
        "".join(line for line in out.splitlines(True) if "peer ranks" not in line)
        for out in outputs["generate"]
    )
    assert lead == single.stdout and other == ""
