"""Weights kept quantized (`jaxsink.traced.quant`): GGUF blocks as they are, on disk and in memory.

The blocks dequantize exactly as the `gguf` package does; a model with quantized weights gives
the logits of the same model with those weights dequantized to float32; one compilation per
shape; the parts of a quantized weight shard like the float weight; bad `--quantize` input is
one line. The real default model's parts are marked slow (they need its GGUF).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

import jaxsink
from jaxsink import config as C
from jaxsink import layout
from jaxsink import sharding as sh
from jaxsink.checkpoint import CheckpointError, load_params, read_config, save_checkpoint
from jaxsink.cli import main as cli_main
from jaxsink.config import ConfigError, Experts, Mlp, ModelConfig, Quant, StreamConfig
from jaxsink.convert import convert
from jaxsink.convert.cli import main as convert_main
from jaxsink.convert.gguf import GGUFSource, gguf_blocks, read_gguf
from jaxsink.traced import entry, quant
from tests.support.gguf_files import tiny_gguf
from tests.support.sharded_checks import forced_devices_report
from tests.support.tiny import (
    MIXED_KINDS,
    block_config,
    feed,
    quantized_params,
    random_flat_params,
    tiny_config,
    tiny_model,
    write_tokenizer,
)

KINDS = ("q8_0", "q4_0", "q4_1")
TYPES = {kind: gguf.GGMLQuantizationType[kind.upper()] for kind in KINDS}


def random_blocks(kind: str, rows: int, blocks: int, seed: int) -> np.ndarray:
    """Random GGML blocks [rows, blocks * block bytes]: every code value, scales (and
    minimums) random finite float16 of both signs."""
    rng = np.random.default_rng(seed)
    size = gguf.GGML_QUANT_SIZES[TYPES[kind]][1]
    raw = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    scalars = 2 if kind == "q4_1" else 1
    halves = (rng.standard_normal((rows, blocks, scalars)) * 0.02).astype(np.float16)
    raw[..., : 2 * scalars] = halves.view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_dequantize_exactly_as_gguf(kind):
    """Random blocks: our blocks' float32 values (on the host and in the jitted step) are the
    `gguf` package's bit for bit, and the checkpoint keeps their bytes as they are."""
    raw = random_blocks(kind, rows=24, blocks=5, seed=KINDS.index(kind))
    want = gguf.quants.dequantize(raw, TYPES[kind])  # [24, 160]
    blocks = gguf_blocks(raw, kind)
    np.testing.assert_array_equal(blocks.dequantize().view(np.uint32), want.view(np.uint32))

    stored = blocks.stored()
    forms = quant.stored_forms(blocks.spec)
    codes = forms["codes"].decode(stored["codes"], np.int8)
    np.testing.assert_array_equal(codes, blocks.codes)
    codes_bytes = raw.reshape(24, 5, -1)[..., 4 if kind == "q4_1" else 2 :]
    np.testing.assert_array_equal(stored["codes"].reshape(codes_bytes.shape).view(np.uint8),
                                  codes_bytes)  # fmt: skip

    w = quant.QuantizedWeight(blocks.spec, (24, 160), ("vocab", "embed"))
    w.codes.set_value(jnp.asarray(codes))
    for part in ("scales", "mins"):
        if part in stored:
            getattr(w, part).set_value(jnp.asarray(forms[part].decode(stored[part], np.float32)))
    graphdef, state = nnx.split(w)
    got = jax.jit(lambda s: nnx.merge(graphdef, s).dequantize(jnp.float32))(state)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), want.view(np.uint32))


def test_pack_order_round_trips_for_every_code():
    """4-bit codes of every value, signed (q4_0) and unsigned (q4_1), survive the checkpoint."""
    for kind, low in (("q4_0", -8), ("q4_1", 0)):
        form = quant.stored_forms(Quant(kind))["codes"]
        codes = (np.arange(64).reshape(2, 32) % 16 + low).astype(np.int8)
        packed = form.encode(codes)
        assert packed.dtype == np.uint8 and packed.shape == (2, 16)
        np.testing.assert_array_equal(form.decode(packed, np.int8), codes)


@pytest.mark.parametrize("tied", [True, False])
def test_quantized_model_equals_its_dequantized_float_model(tied):
    """Logits of a model with quantized weights (every kind, every product site, the embedding
    lookup and LM head included) equal the same model's with those weights dequantized to
    float32, over a stream that evicts, chunked and token by token."""
    cfg = dataclasses.replace(block_config(), tie_embeddings=tied)
    kinds = MIXED_KINDS if tied else MIXED_KINDS | {"lm_head": "q4_0"}
    qcfg, stored, dense = quantized_params(cfg, kinds, seed=4)
    quantized, floats = tiny_model(qcfg, stored), tiny_model(cfg, dense)
    assert isinstance(quantized.module.layers[0].attn.qkv, quant.QuantizedWeight)
    tokens = np.random.default_rng(5).integers(0, 97, size=(2, 24)).astype(np.int32)
    stream = StreamConfig(2, 9)
    for chunk in (8, 1):
        got, _ = feed(quantized, stream, tokens, chunk)
        want, _ = feed(floats, stream, tokens, chunk)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_sliced_products_equal_whole_ones(monkeypatch):
    """A weight dequantized slice by slice (grouped rows, in a loop) gives the product of the
    whole weight."""
    cfg = block_config()
    qcfg, stored, _ = quantized_params(cfg, MIXED_KINDS, seed=6)
    m = tiny_model(qcfg, stored)
    tokens = np.random.default_rng(7).integers(0, 97, size=(1, 12)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    cache = kv_cache(qcfg)

    def logits():
        step = jax.jit(functools.partial(entry._step, graphdef=m.graphdef))  # a fresh trace
        return np.asarray(step(m.weights, cache, tokens, valid)[0])

    whole = logits()
    monkeypatch.setattr(quant, "DEQUANT_BYTES", 4096)
    up = m.module.layers[0].mlp.up
    assert up.slicing(4, 1) == (8, 8)  # [2, 64, 64] float32 = 32 KiB: 8 slices of 8 rows
    assert m.module.embed.slicing(4, 0) == (97, 1)  # 97 rows: a prime count
    np.testing.assert_allclose(logits(), whole, rtol=0, atol=1e-5 * np.abs(whole).max())


def kv_cache(cfg):
    from jaxsink.traced import cache as kv

    return kv.init_cache(cfg, StreamConfig(2, 9), 1)


def test_one_compile_per_shape():
    qcfg, stored, _ = quantized_params(block_config(), MIXED_KINDS, seed=8)
    m = tiny_model(qcfg, stored)
    tokens = np.random.default_rng(9).integers(0, 97, size=(1, 30)).astype(np.int32)
    before = entry.TRACES["step"]
    feed(m, StreamConfig(2, 9), tokens, chunk=5)  # 6 chunks, the stream wraps: one compile
    assert entry.TRACES["step"] - before == 1
    feed(m, StreamConfig(2, 9), tokens, chunk=5)  # same shapes: none
    assert entry.TRACES["step"] - before == 1


def test_checkpoints_keep_the_blocks_and_float_configs_read_as_before(tmp_path):
    cfg = block_config()
    qcfg, stored, dense = quantized_params(cfg, MIXED_KINDS, seed=10)
    path = save_checkpoint(tmp_path / "q", qcfg, stored, "float32", {})
    assert read_config(path)[0] == qcfg
    params = load_params(path, qcfg)
    assert params["layers.0.attn.qkv.codes"].dtype == np.uint8  # two codes per byte
    assert params["layers.0.attn.qkv.codes"].shape == (2, 4, 32, 32)
    assert params["layers.0.attn.qkv.scales"].dtype == np.float16
    loaded = jaxsink.load(path, progress=False)
    assert loaded.dtype == jnp.float32
    assert loaded.weights["embed"]["codes"][...].dtype == jnp.int8
    want = tiny_model(qcfg, stored)
    for (key, a), (_, b) in zip(
        nnx.to_flat_state(loaded.weights), nnx.to_flat_state(want.weights), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), key)
    # a float model's config.json says nothing about quantization (as before it existed)
    text = json.dumps(cfg.to_dict())
    assert "quant" not in text and ModelConfig.from_dict(cfg.to_dict()) == cfg
    bad = dict(stored, **{"layers.0.mlp.up.codes": stored["layers.0.mlp.up.codes"].astype("f4")})
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.up.codes has dtype float32"):
        save_checkpoint(tmp_path / "bad", qcfg, bad, "float32", {})
    del dense


def test_quantized_weights_need_sizes_that_hold_blocks():
    with pytest.raises(ConfigError, match=r"out projection needs its input size \(8\)"):
        C.quantize_config(tiny_config(), {"layers.0.attn.out": Quant("q4_0")})  # head dim 8
    with pytest.raises(ConfigError, match=r"hidden size \(32\)"):
        C.quantize_config(tiny_config(), {"embed": Quant("q8_0", block=64)})
    with pytest.raises(ConfigError, match="expert"):
        moe = dataclasses.replace(Mlp(64, "silu"), experts=Experts(4, 2))
        C.quantize_config(block_config(mlp=moe), {"layers.0.mlp.up": Quant("q8_0")})
    with pytest.raises(KeyError):
        C.quantize_config(block_config(), {"final_norm.scale": Quant("q8_0")})
    assert C.quantize_config(tiny_config(), {"embed": Quant("q8_0")}).quantized


def test_every_quantized_part_shards_like_its_float_weight():
    """The codes, scales and minimums carry the float weight's logical axes and split along
    the same mesh axes, at block bounds: a dimension whose block count does not divide the
    mesh axis is replicated in every part."""
    cfg = block_config()
    qcfg, _, _ = quantized_params(cfg, MIXED_KINDS, seed=11)
    float_specs = dict(nnx.to_flat_state(sh.weight_shardings(layout.abstract(cfg)[1], MESH22)))
    for mesh in (MESH22, MESH14):
        notes: set = set()
        specs = dict(nnx.to_flat_state(sh.weight_shardings(layout.abstract(qcfg)[1], mesh, notes)))
        names = dict(nnx.to_flat_state(nnx.get_partition_spec(layout.abstract(qcfg)[1])))
        for path, sharding in specs.items():
            if path[-1] not in ("codes", "scales", "mins"):
                continue
            parts = [specs[(*path[:-1], p)].get_value().spec for p in ("codes", "scales")]
            assert parts[0] == parts[1] == sharding.get_value().spec, path
            assert tuple(names[path].get_value()) == tuple(names[(*path[:-1], "codes")].get_value())
            if mesh is MESH22:  # every block count divides 2: as the float weight
                assert parts[0] == float_specs[path[:-1]].get_value().spec, path
    # down [D, F=64] has 2 blocks along F: over model=4 it is replicated, codes and scales alike
    down = specs[("layers", 0, "mlp", "down", "codes")].get_value().spec
    assert tuple(down) == (None, None)
    assert tuple(float_specs[("layers", 0, "mlp", "down")].get_value().spec) == (None, "model")


MESH22 = AbstractMesh((2, 2), ("data", "model"))
MESH14 = AbstractMesh((1, 4), ("data", "model"))


@pytest.mark.devices
def test_sharded_quantized_runs_equal_one_device(tmp_path):
    """With 4 forced host devices (a child process): a quantized model sharded over model=2
    (and data=2, model=2), its products whole or sliced, gives the single-device logits and
    gathers no weight in a decode step; so do int8 weights quantized as a float checkpoint
    loads."""
    report = forced_devices_report("tests.support.quantized_sharded", 4, tmp_path)
    assert report["devices"] == 4
    assert len(report["logits_max_diff"]) == 3
    for case, diff in report["logits_max_diff"].items():
        assert diff < 1e-4, case
    assert report["weights_all_gathered"] == {}
    for kind in ("int8",):  # made from float weights as they load (--quantize)
        assert report[f"{kind}_max_diff"] < 1e-4, kind
        assert report[f"{kind}_weights_all_gathered"] == {}, kind


# --- conversion ------------------------------------------------------------------------------


GGUF_TYPES = {
    "token_embd.weight": "Q8_0",
    "output.weight": "Q4_0",
    "blk.0.attn_q.weight": "Q4_1",
    "blk.0.attn_k.weight": "Q4_1",
    "blk.0.attn_v.weight": "Q4_1",
    "blk.0.attn_output.weight": "Q4_0",
    "blk.0.ffn_gate.weight": "Q8_0",
    "blk.0.ffn_up.weight": "Q8_0",
    "blk.0.ffn_down.weight": "Q5_0",  # not kept: dequantized
    "blk.1.attn_q.weight": "Q4_1",
    "blk.1.attn_k.weight": "Q8_0",  # q, k and v of different kinds: the fused qkv is float
    "blk.1.attn_v.weight": "Q4_1",
    "blk.1.ffn_up.weight": "Q4_1",
    "blk.1.ffn_gate.weight": "Q4_1",
}


@pytest.mark.torch
def test_gguf_keep_converts_the_kept_kinds_and_says_what_it_dequantized(tmp_path, capsys):
    tiny_gguf(tmp_path / "tiny.gguf", GGUF_TYPES)
    keep = convert(tmp_path / "tiny.gguf", tmp_path / "keep", progress=False, quantize="keep")
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "4 quantized tensors (2 Q4_1, 1 Q5_0, 1 Q8_0) are dequantized to float" in err, err
    cfg = read_config(keep)[0]
    layer0, layer1 = cfg.layers[0].quant, cfg.layers[1].quant
    assert (layer0.qkv, layer0.out, layer0.up, layer0.down) == (
        Quant("q4_1"),
        Quant("q4_0"),
        Quant("q8_0"),
        None,
    )
    assert (layer1.qkv, layer1.out, layer1.up, layer1.down) == (None, None, Quant("q4_1"), None)
    assert (cfg.embed_quant, cfg.lm_head_quant) == (Quant("q8_0"), Quant("q4_0"))
    floats = convert(tmp_path / "tiny.gguf", tmp_path / "float", progress=False)
    assert read_config(floats)[0] == cfg.dequantized()
    a, b = (jaxsink.load(p, progress=False) for p in (keep, floats))
    tokens = np.random.default_rng(12).integers(0, cfg.vocab_size, size=(1, 24)).astype(np.int32)
    got, _ = feed(a, StreamConfig(2, 7), tokens, 6)
    want, _ = feed(b, StreamConfig(2, 7), tokens, 6)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_bad_quantize_input_is_one_line(tmp_path, capsys):
    cfg = tiny_config()
    write_tokenizer(tmp_path)
    files = {"tokenizer.json": (tmp_path / "tokenizer.json").read_bytes()}
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, random_flat_params(cfg), "float32", files)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    cases = [
        (convert_main, [str(hf), str(tmp_path / "o1"), "--quantize", "keep"], "not a .gguf"),
        (convert_main, [str(ckpt), str(tmp_path / "o2"), "--quantize", "keep"], "not a .gguf"),
        (convert_main, [str(hf), str(tmp_path / "o3"), "--quantize", "int3"], "invalid choice"),
        (cli_main, ["generate", "--model", str(ckpt), "--prompt", "a b", "--quantize", "keep"],
         "already a jaxsink checkpoint"),
        (cli_main, ["ppl", "--model", str(hf), "--quantize", "keep"], "not a .gguf"),
        (cli_main, ["generate", "--prompt", "a", "--quantize", "int3"], "invalid choice"),
    ]  # fmt: skip
    for main, argv, message in cases:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


# --- the real default model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_keep(smollm2_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keep") / "SmolLM2-keep"
    return convert(smollm2_gguf, out, progress=False, quantize="keep")


@pytest.mark.slow
def test_real_gguf_tensors_dequantize_exactly(smollm2_gguf):
    """The default GGUF's Q8_0 embedding and Q4_1 projections (q rows un-permuted) load as
    blocks whose values are `gguf`'s dequantization bit for bit."""
    meta, reader = read_gguf(smollm2_gguf)
    from jaxsink.convert.gguf import config_from_gguf

    cfg = config_from_gguf(meta, [t.name for t in reader.tensors])
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.7.mlp.down_proj.weight",
    ]
    kept, floats = GGUFSource(reader, cfg, keep=names), GGUFSource(reader, cfg)
    kinds = []
    for name in names:
        blocks = kept.load(name)
        kinds.append(blocks.spec.kind)
        want = floats.load(name)
        np.testing.assert_array_equal(blocks.dequantize().view(np.uint32), want.view(np.uint32))
    assert kinds == ["q8_0", "q4_1", "q4_1"]


@pytest.mark.slow
def test_real_model_kept_quantized(smollm2_keep, smollm2_dir, smollm2_ids):
    """The default GGUF with --quantize keep: every matrix kept, a folder under 0.35x of the
    float32 conversion's, and per-token NLL within 1e-3 of the float32 model over a stream
    that evicts."""
    from jaxsink.evaluate import stream_nll

    cfg = read_config(smollm2_keep)[0]
    assert cfg.embed_quant == Quant("q8_0") and cfg.dequantized() == read_config(smollm2_dir)[0]
    assert all(s.quant.qkv == s.quant.down == Quant("q4_1") for s in cfg.layers)

    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.iterdir())

    assert size(smollm2_keep) <= 0.35 * size(smollm2_dir)
    ids = smollm2_ids[:301]
    nll = [
        stream_nll(jaxsink.load(p, progress=False), ids, "sink", 4, 60, 64, progress=False).nll
        for p in (smollm2_keep, smollm2_dir)
    ]
    np.testing.assert_allclose(nll[0], nll[1], atol=1e-3, rtol=0)
