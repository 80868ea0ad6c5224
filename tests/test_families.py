"""Every family the converter reads, driven by the case table (`tests/support/families.py`):
each case's tiny random checkpoint (transformers' own config and model classes, or for Qwen v1
and BTLM the references written from their published code) is built and converted once, then
checked as its case says: dense logits against its PyTorch original; the sink stream against
the streaming reference (which reads the same per-layer description), chunked equal to
one-by-one, one compile per shape; stream NLL against the PyTorch reference loop; each layer
kind's cache as the contract says; the family's traits; the commands as a user runs them.
Then each family's own refusals and checkpoint layouts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import jaxsink
from jaxsink.checkpoint import load_params
from jaxsink.cli import main as cli_main
from jaxsink.config import StreamConfig
from jaxsink.convert import convert
from jaxsink.convert.cli import main as convert_main
from jaxsink.loading import Model
from jaxsink.traced import cache as kv
from tests.support import published_models
from tests.support.families import VOCAB, Case, case, cases
from tests.support.family_checks import (
    assert_dense_matches_pytorch,
    assert_sink_stream_matches_reference,
)
from tests.support.hf_tiny import build_from_config, torch_logits, torch_nll
from tests.support.spec_reference import stream_logits
from tests.support.tiny import feed
from tests.support.torch_reference import reference_nll

pytestmark = pytest.mark.torch


def params(where=lambda c: c.refused is None) -> list:
    """The cases `where` holds for, as pytest params named after them (marked `compat` where
    .ci/compat runs them)."""
    return [
        pytest.param(c, id=c.name, marks=[pytest.mark.compat] if c.compat else [])
        for c in cases(where)
    ]


@dataclasses.dataclass(frozen=True)
class Converted:
    torch_model: object  # the PyTorch model, eval mode
    src: Path  # its checkpoint folder
    model: Model  # the converted jaxsink model
    flat: dict  # its flat checkpoint arrays


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`converted(case)`: the case built and converted on first use, then shared by every test
    of this module (whatever order they run in)."""
    done: dict[str, Converted] = {}

    def get(c: Case) -> Converted:
        if c.name not in done:
            path = tmp_path_factory.mktemp(c.name)
            torch_model = c.build_model(path / "src")
            convert(path / "src", path / "out", progress=False)
            model = jaxsink.load(path / "out")
            flat = load_params(path / "out", model.cfg)
            done[c.name] = Converted(torch_model, path / "src", model, flat)
        return done[c.name]

    return get


# --- what every case (or every case that says so) goes through ---------------------------------


@pytest.mark.parametrize("case", params())
def test_dense_logits_match_pytorch(converted, case):
    c = converted(case)
    assert_dense_matches_pytorch(c.torch_model, c.model, **dataclasses.asdict(case.dense))


@pytest.mark.parametrize("case", params(lambda c: c.stream))
def test_sink_stream_matches_the_streaming_reference(converted, case):
    """S = 2, W = 5 over the case's 28 or 40 tokens (many evictions, in every layer kind), chunk
    1 and 8, one compile per shape."""
    c = converted(case)
    assert_sink_stream_matches_reference(c.model, c.flat, case.stream)


@pytest.mark.parametrize(
    ("case", "mode"),
    [
        pytest.param(c, mode, id=f"{c.name}-{mode}", marks=[pytest.mark.compat] if c.compat else [])
        for c in cases(lambda c: c.reference_loop)
        for mode in c.reference_loop
    ],
)
def test_stream_nll_matches_torch_reference_loop(converted, case, mode):
    """Per-token NLL over a stream with many evictions equals the transformers reference loop."""
    from jaxsink.evaluate import stream_nll

    c = converted(case)
    ids = np.random.default_rng(2).integers(0, VOCAB, size=161)
    sinks, window = 3, 13
    got = stream_nll(c.model, ids, mode, sinks, window, chunk=32, progress=False).nll
    ref_sinks, ref_window = {"sink": (3, 13), "window": (0, 16), "dense": (0, 0)}[mode]
    want = reference_nll(c.torch_model, ids, ref_sinks, ref_window, dense=mode == "dense")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", params(lambda c: c.traits))
def test_family_traits(converted, case):
    """The per-layer description carries what defines each family."""
    assert case.traits(converted(case).model.cfg)


@pytest.mark.parametrize("case", params())
def test_each_layer_kind_keeps_its_own_cache(converted, case):
    """Full layers keep S + W slots, native sliding layers their window's w - 1 (the query's
    own key is the w-th) whatever S and W are; the native cache is the smaller one."""
    cfg = converted(case).model.cfg
    stream = StreamConfig(4, 60)
    cache = kv.init_cache(cfg, stream, 1)
    for spec, lc in zip(cfg.layers, cache.layers, strict=True):
        w = spec.attention.sliding_window
        slots = sum(k.shape[-1] for k in lc.keys)
        assert slots == (stream.capacity if w is None else w - 1)
        assert lc.stream == (stream if w is None else StreamConfig(0, w - 1, "window"))
    native = kv.cache_bytes(cfg, stream, 1)
    everything_full = kv.cache_bytes(cfg, stream, 1, native_windows=False)
    sliding = sum(s.attention.sliding_window is not None for s in cfg.layers)
    assert (native < everything_full) == (sliding > 0)
    assert native == cache.nbytes


@pytest.mark.parametrize("case", params())
def test_loaded_model_is_an_nnx_module_with_partition_specs(converted, case):
    from flax import nnx

    c = converted(case)
    specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(c.model.module, nnx.Param)))
    assert len(specs) == len(c.flat)
    for path, spec in specs:
        assert spec.get_value() is not None, path


# --- the commands, as a user runs them ------------------------------------------------------


@pytest.mark.parametrize("case", params(lambda c: c.commands))
def test_convert_and_ppl_commands(converted, tmp_path, case):
    """`jaxsink-convert DIR OUT`, then `jaxsink ppl --tokens` (`families.Commands`): dense
    per-token NLL equal to PyTorch's; sink mode equal at chunk 1, 8 and the default; a cache
    longer than the stream equal to dense."""
    c, n_tokens = converted(case), case.commands.n_tokens
    out = tmp_path / "out"
    assert convert_main([str(c.src), str(out)]) == 0
    ids = np.random.default_rng(3).integers(0, VOCAB, size=n_tokens + 1)
    np.save(tmp_path / "ids.npy", ids)

    def ppl(name: str, mode: str, *flags: str) -> np.ndarray:
        folder = tmp_path / name
        argv = ["ppl", "--model", str(out), "--tokens", str(tmp_path / "ids.npy")]
        argv += ["--n-tokens", str(n_tokens), "--mode", mode, "--quiet", "--out", str(folder)]
        assert cli_main([*argv, *flags]) == 0
        return np.load(folder / f"nll_{mode}.npy")

    dense = ppl("dense", "dense")
    np.testing.assert_allclose(dense, torch_nll(c.torch_model, ids), atol=1e-4, rtol=0)
    if case.commands.native_windows:
        summary = json.loads((tmp_path / "dense" / "summary.json").read_text())["modes"]["dense"]
        assert summary["cache_bytes"] < summary["cache_bytes_all_full"]
    small = ["--sinks", "2", "--window", "5"]
    by_chunk = [ppl(f"c{chunk}", "sink", *small, "--chunk", str(chunk)) for chunk in (1, 8)]
    by_chunk.append(ppl("default", "sink", *small))
    for nll in by_chunk[1:]:
        np.testing.assert_allclose(nll, by_chunk[0], atol=1e-5, rtol=0)
    if case.commands.evictions:
        assert np.abs(by_chunk[0] - dense).max() > 1e-3  # evictions did change the stream
    wide = ppl("wide", "sink", "--sinks", "2", "--window", "62")
    np.testing.assert_allclose(wide, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", params(lambda c: c.refused))
def test_unsupported_families_are_refused(tmp_path, capsys, case):
    """One line naming what is missing and the families that have it; no output folder."""
    case.build_model(tmp_path / "src")
    capsys.readouterr()  # transformers' own progress output
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert case.refused in err and "gpt_neox" in err and "llama" in err
    assert not (tmp_path / "out").exists()


# --- one family's own limits and checkpoint layouts -------------------------------------------


def test_qwen_caches_that_reach_seq_length_are_refused(tmp_path):
    """Qwen v1's logn attention and dynamic NTK act from `seq_length` on: a cache whose in-cache
    positions could get there is refused, one just below it runs."""
    published_models.build_tiny_qwen(tmp_path / "src", seq_length=16)
    convert(tmp_path / "src", tmp_path / "out", progress=False)
    model = jaxsink.load(tmp_path / "out")
    assert model.cfg.position_limit == 16
    with pytest.raises(jaxsink.ConfigError, match="seq_length 16"):
        kv.init_cache(model.cfg, StreamConfig(4, 12), 1)
    ids = np.random.default_rng(4).integers(0, VOCAB, size=(1, 40)).astype(np.int32)
    got, _ = feed(model, StreamConfig(4, 11), ids, chunk=8)
    flat = load_params(tmp_path / "out", model.cfg)
    np.testing.assert_allclose(got[0], stream_logits(flat, model.cfg, ids[0], 4, 11), atol=1e-4)


def _assert_same_params(a_dir: Path, b_dir: Path) -> None:
    cfg = jaxsink.load(a_dir).cfg
    a, b = load_params(a_dir, cfg), load_params(b_dir, cfg)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_fused_experts_convert_like_per_expert_ones(converted, tmp_path):
    """transformers 5 saves Mixtral's experts one tensor each (`block_sparse_moe.experts.{e}.w1`)
    but holds them fused in memory (`mlp.experts.gate_up_proj`); a checkpoint of either layout
    gives the same parameters."""
    from safetensors.numpy import save_file

    c = converted(case("mixtral-sliding"))
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_bytes((c.src / "config.json").read_bytes())
    state = {k: v.detach().contiguous().numpy() for k, v in c.torch_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    convert(fused, tmp_path / "from_fused", progress=False)
    _assert_same_params(c.model.path, tmp_path / "from_fused")


def test_gpt_oss_mxfp4_experts_are_dequantized_exactly(tmp_path):
    """A gpt-oss checkpoint whose experts are MXFP4 blocks and scales (as the published ones
    are) converts to the weights transformers' own dequantization gives: dense logits equal."""
    import torch
    from safetensors.numpy import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    mxfp4 = dataclasses.replace(  # MXFP4 blocks of 32 values
        case("gpt_oss"), kwargs=case("gpt_oss").kwargs | dict(intermediate_size=64)
    )
    config = mxfp4.hf_config()
    torch_model = build_from_config(config, tmp_path / "float")
    rng = np.random.default_rng(5)
    E, D, F = config.num_local_experts, config.hidden_size, config.intermediate_size
    state = {k: v.detach().contiguous().numpy() for k, v in torch_model.state_dict().items()}
    for i, layer in enumerate(torch_model.model.layers):
        prefix = f"model.layers.{i}.mlp.experts."
        for name, rows, cols in (("gate_up_proj", 2 * F, D), ("down_proj", D, F)):
            blocks = rng.integers(0, 256, (E, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(119, 125, (E, rows, cols // 32), dtype=np.uint8)
            weight = convert_moe_packed_tensors(
                torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
            )
            with torch.no_grad():
                getattr(layer.mlp.experts, name).copy_(weight)
            del state[prefix + name]
            state[prefix + name + "_blocks"], state[prefix + name + "_scales"] = blocks, scales
    src = tmp_path / "mxfp4"
    src.mkdir()
    cfg_json = config.to_dict() | {"quantization_config": {"quant_method": "mxfp4"}}
    (src / "config.json").write_text(json.dumps(cfg_json))
    save_file(state, str(src / "model.safetensors"))
    convert(src, tmp_path / "out", progress=False)
    model = jaxsink.load(tmp_path / "out")
    ids = np.random.default_rng(6).integers(0, VOCAB, size=(1, 24)).astype(np.int32)
    got, _ = feed(model, StreamConfig(0, 24, "dense"), ids, chunk=8)
    np.testing.assert_allclose(got, torch_logits(torch_model, ids), atol=1e-4, rtol=0)


def test_bloom_checkpoints_saved_from_the_base_model_convert(converted, tmp_path):
    """bigscience's own Bloom checkpoints name tensors without `transformer.` (saved from
    BloomModel): the same parameters as transformers' prefixed names."""
    from safetensors.numpy import save_file

    c = converted(case("bloom"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((c.src / "config.json").read_bytes())
    state = {
        k.removeprefix("transformer."): v.detach().contiguous().numpy()
        for k, v in c.torch_model.state_dict().items()
        if k != "lm_head.weight"
    }
    save_file(state, str(bare / "model.safetensors"))
    convert(bare, tmp_path / "from_bare", progress=False)
    _assert_same_params(c.model.path, tmp_path / "from_bare")
