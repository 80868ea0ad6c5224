"""int8 / int4 weights made from float ones (`--quantize int8|int4`, `quantize.quantize_blocks`).

Round-trip error bounds against the float weight; the codes are Qwix's; a converted model gives
the logits of its own dequantized float weights; a float checkpoint quantized as it loads is the
conversion's model bit for bit; the parts carry the float weight's shardings; bad input is one
line.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx
from jax.sharding import AbstractMesh

import jaxsink
from jaxsink import config as C
from jaxsink import executables, layout, quantize
from jaxsink import sharding as sh
from jaxsink.checkpoint import load_params, read_config, save_checkpoint
from jaxsink.cli import main as cli_main
from jaxsink.config import Quant, StreamConfig
from jaxsink.convert import convert
from jaxsink.traced import quant
from tests.support.gguf_files import tiny_gguf
from tests.support.tiny import block_config, feed, random_flat_params, tiny_model, write_tokenizer

SHAPES = [(48, 64), (3, 2, 64)]  # a matrix, and [*out, heads, head dim] like an output projection


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_round_trip_error_is_within_a_step(kind, scale_dtype):
    """Each value comes back within half a step (float32 scales) or one step (scales rounded to
    bfloat16, whose codes may then clip at the range's end); codes stay in range; the whole
    matrix's relative error is small."""
    bits, high = (8, 127) if kind == "int8" else (4, 7)
    for n, shape in enumerate(SHAPES):
        w = np.random.default_rng(n).standard_normal(shape).astype(np.float32)
        w[..., 5] *= 40  # an outlier column: its blocks get large scales
        block = shape[-1] if kind == "int8" else 16
        blocks = quantize.quantize_blocks(w, Quant(kind, block, scale_dtype))
        assert blocks.codes.dtype == np.int8 and blocks.codes.shape == shape
        assert blocks.scales.shape == (*shape[:-1], shape[-1] // block)
        assert blocks.scales.dtype == np.dtype(scale_dtype)
        assert blocks.codes.min() >= -high - 1 and blocks.codes.max() <= high
        step = np.repeat(blocks.scales.astype(np.float32), block, axis=-1)
        slack = 0.5 * (1 + 1e-4) if scale_dtype == "float32" else 1.0
        assert np.all(np.abs(blocks.dequantize() - w) <= slack * step)
        relative = np.linalg.norm(blocks.dequantize() - w) / np.linalg.norm(w)
        assert relative < (0.03 if bits == 8 else 0.3), relative  # outliers included


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_codes_and_scales_are_qwix_own(kind):
    """With float32 scales, the codes and scales are exactly `qwix.quantize`'s."""
    w = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
    block = 64 if kind == "int8" else 32
    blocks = quantize.quantize_blocks(w, Quant(kind, block, "float32"))
    q = qwix.quantize(
        jnp.asarray(w), jnp.int8 if kind == "int8" else jnp.int4, channelwise_axes=(0,),
        tiled_axes={1: block},
    )  # fmt: skip
    np.testing.assert_array_equal(blocks.codes, np.asarray(q.qvalue).astype(np.int8))
    np.testing.assert_array_equal(blocks.scales, np.asarray(q.scale))


def test_weight_plan_quantizes_every_product_weight():
    """int8: every matrix per output channel; int4: the layers' matrices in groups of 32, the
    embedding and LM head int8; expert MLPs stay float."""
    cfg = dataclasses.replace(block_config(), tie_embeddings=False)
    shapes = layout.param_shapes(cfg)
    int8 = quantize.weight_plan(cfg, "int8", "float32")
    assert set(int8) == {"embed", "lm_head"} | {
        f"layers.{i}.{w}" for i in range(cfg.num_layers) for w in C.QUANTIZABLE
    }
    for name, spec in int8.items():
        assert spec == Quant("int8", shapes[name][-1], "float32"), name
    int4 = quantize.weight_plan(cfg, "int4", "bfloat16")
    assert int4["embed"] == int4["lm_head"] == Quant("int8", cfg.hidden_size, "bfloat16")
    assert int4["layers.1.mlp.down"] == Quant("int4", quantize.INT4_GROUP, "bfloat16")


@pytest.fixture(scope="module")
def tiny_float_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("wq") / "tiny.gguf"
    tiny_gguf(path, {}, tied=False)
    return path


def dequantized_flat(path) -> tuple:
    """(the float config, every weight of checkpoint `path` in float32: a quantized one
    dequantized on the host from its stored parts)."""
    cfg = read_config(path)[0]
    params = load_params(path, cfg)
    flat = {}
    for name in layout.param_shapes(cfg.dequantized()):
        spec = C.quantized_weights(cfg).get(name)
        if spec is None:
            flat[name] = params[name]
            continue
        forms = quant.stored_forms(spec)
        parts = {p: forms[p].decode(params[f"{name}.{p}"], np.float32) for p in forms}
        parts["codes"] = parts["codes"].astype(np.int8)
        flat[name] = quantize.Blocks(spec, **parts).dequantize()
    return cfg.dequantized(), flat


@pytest.mark.parametrize("kind, sliced", [("int8", False), ("int4", False), ("int8", True)])
@pytest.mark.torch
def test_converted_model_equals_its_dequantized_float_model(
    kind, sliced, tiny_float_gguf, tmp_path, monkeypatch
):
    """`--quantize kind` of a float GGUF: the config says which weights, the logits are the
    float model's built from the stored codes and scales, each within a step of the float
    conversion's weight; also with the products dequantized slice by slice (int8's scales
    applied to each product's rows)."""
    if sliced:
        monkeypatch.setattr(quant, "DEQUANT_BYTES", 4096)
        monkeypatch.setattr(executables, "_EXECUTABLES", {})  # traced anew
        jax.clear_caches()
    out = convert(tiny_float_gguf, tmp_path / kind, progress=False, quantize=kind)
    floats = convert(tiny_float_gguf, tmp_path / "float", progress=False)
    cfg = read_config(out)[0]
    assert set(C.quantized_weights(cfg)) == set(quantize.weight_plan(cfg, kind, "float32"))
    assert cfg.dequantized() == read_config(floats)[0]
    base, flat = dequantized_flat(out)
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 24)).astype(np.int32)
    stream = StreamConfig(2, 7)
    m = jaxsink.load(out, progress=False)
    head = m.module.lm_head
    assert head.row_scaled(1)  # the LM head is int8 in both plans
    assert (head.slicing(4, 0)[0] > 1) == sliced
    got, _ = feed(m, stream, tokens, 6)
    want, _ = feed(tiny_model(base, flat), stream, tokens, 6)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
    # each weight is within a step of the float conversion's (the codes of the right layout)
    reference = load_params(floats, base)
    for name, spec in C.quantized_weights(cfg).items():
        steps = 127 if spec.kind == "int8" else 7
        assert np.abs(flat[name] - reference[name]).max() <= np.abs(reference[name]).max() / steps


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.torch
def test_float_checkpoint_quantized_on_load_is_the_conversion(kind, tiny_float_gguf, tmp_path):
    """`jaxsink.load(float checkpoint, quantize=kind)` holds the weights of the checkpoint
    converted with `quantize=kind`, bit for bit; the checkpoint on disk is untouched."""
    floats = convert(tiny_float_gguf, tmp_path / "float", progress=False)
    before = (floats / "model.safetensors").read_bytes()
    converted = jaxsink.load(
        convert(tiny_float_gguf, tmp_path / kind, progress=False, quantize=kind), progress=False
    )
    loaded = jaxsink.load(floats, progress=False, quantize=kind)
    assert loaded.cfg == converted.cfg
    a, b = nnx.to_flat_state(loaded.weights), nnx.to_flat_state(converted.weights)
    for (key, x), (_, y) in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x.get_value()), np.asarray(y.get_value()), key)
    assert (floats / "model.safetensors").read_bytes() == before


@pytest.mark.torch
def test_bfloat16_conversion_keeps_scales_in_bfloat16(tiny_float_gguf, tmp_path):
    out = convert(
        tiny_float_gguf, tmp_path / "bf", dtype="bfloat16", progress=False, quantize="int8"
    )
    params = load_params(out, read_config(out)[0])
    assert params["layers.0.mlp.up.scales"].dtype == np.dtype("bfloat16")
    assert params["layers.0.mlp.up.codes"].dtype == np.int8
    assert params["final_norm.scale"].dtype == np.dtype("bfloat16")
    assert jaxsink.load(out, progress=False).dtype == jnp.bfloat16


@pytest.mark.parametrize("mesh", [(2, 2), (1, 4)])
def test_int8_and_int4_parts_shard_like_the_float_weight(mesh):
    """Codes split like the float weight; int4 scales too (where their groups divide the axis);
    int8's per-channel scales split like it along the output axes and are whole along the
    input axis, which each row has one scale for."""
    cfg = dataclasses.replace(block_config(), vocab_size=96)
    mesh = AbstractMesh(mesh, ("data", "model"))
    float_specs = dict(nnx.to_flat_state(sh.weight_shardings(layout.abstract(cfg)[1], mesh)))
    # int4 on model=4: 2 groups per row of down do not divide it (test_quantized covers that)
    for kind in ("int8", "int4") if mesh.shape["model"] == 2 else ("int8",):
        qcfg = C.quantize_config(cfg, quantize.weight_plan(cfg, kind, "float32"))
        specs = dict(nnx.to_flat_state(sh.weight_shardings(layout.abstract(qcfg)[1], mesh)))
        for name, spec in C.quantized_weights(qcfg).items():
            path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
            want = tuple(float_specs[path].get_value().spec)
            want += (None,) * (len(layout.param_shapes(cfg)[name]) - len(want))
            codes = tuple(specs[(*path, "codes")].get_value().spec)
            scales = tuple(specs[(*path, "scales")].get_value().spec)
            codes += (None,) * (len(want) - len(codes))
            scales += (None,) * (len(want) - len(scales))
            assert codes == want, (kind, name)
            one_block = spec.block == layout.param_shapes(cfg)[name][-1]
            assert scales == ((*want[:-1], None) if one_block else want), (kind, name)


def test_quantize_flags(tmp_path, capsys):
    """`--quantize int8` on a float checkpoint generates; on a quantized one, or keep on a
    float checkpoint, it is one line and exit 2."""
    cfg = block_config()
    write_tokenizer(tmp_path)
    files = {"tokenizer.json": (tmp_path / "tokenizer.json").read_bytes()}
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, random_flat_params(cfg), "float32", files)
    args = ["--prompt", "a b", "--max-new-tokens", "3", "--quiet"]
    assert cli_main(["generate", "--model", str(ckpt), "--quantize", "int4", *args]) == 0
    capsys.readouterr()
    qcfg = C.quantize_config(cfg, quantize.weight_plan(cfg, "int8", "float32"))
    stored = {}
    for name, a in random_flat_params(cfg).items():
        spec = C.quantized_weights(qcfg).get(name)
        parts = {name: a} if spec is None else {
            f"{name}.{p}": v for p, v in quantize.quantize_blocks(a, spec).stored().items()
        }  # fmt: skip
        stored |= parts
    quantized = save_checkpoint(tmp_path / "q8", qcfg, stored, "float32", files)
    for flag, message in (("int8", "is already quantized"), ("keep", "already a jaxsink")):
        code = cli_main(["generate", "--model", str(quantized), "--quantize", flag, *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
