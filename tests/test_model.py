"""The generic NNX decoder: every layer kind against the streaming reference, layers that
differ, row isolation, bfloat16, and the Flax NNX surface (partition specs, a user's own jit)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsink import config as C
from jaxsink import layout
from jaxsink.config import (
    Alibi,
    Attention,
    Experts,
    LayerSpec,
    Mlp,
    ModelConfig,
    Norm,
    Quant,
    RopeScaling,
    Rotary,
    StreamConfig,
)
from jaxsink.traced import attention, entry, layers, quant
from jaxsink.traced import cache as kv
from tests.support.spec_reference import stream_logits
from tests.support.tiny import feed, random_flat_params, tiny_config, tiny_model

LAYER_NORM = Norm("layer", 1e-5, bias=True)
SLOPES = Alibi(tuple(0.5 ** (i + 1) for i in range(4)))

KINDS = {
    "alibi": dict(position=SLOPES),
    "no-positions": dict(position="none"),
    "interleaved-partial-rotary": dict(position=Rotary(10000.0, 4, interleaved=True)),
    "half-split-partial-rotary": dict(position=Rotary(500.0, 6)),
    "layernorm-parallel-shared-plain-gelu-biases": dict(
        norm=LAYER_NORM,
        mlp=Mlp(48, "gelu", gated=False, bias=True),
        residual="parallel_shared",
        qkv_bias=True,
        out_bias=True,
    ),
    "two-norm-parallel-relu": dict(
        norm=Norm("layer", 1e-5), mlp=Mlp(40, "relu", gated=False), residual="parallel"
    ),
    "qk-norm-clip-query-scale": dict(qk_norm=LAYER_NORM, clip_qkv=0.5, query_scale=0.25),
    "gemma-norm-scales-head-bias": dict(norm=Norm("rms_plus_one", 1e-6)),
}


def kind_config(name: str) -> ModelConfig:
    kw = dict(KINDS[name])
    position = kw.pop("position", None)
    scale = kw.pop("query_scale", None)
    cfg = tiny_config(**kw, position=None if position == "none" else position)
    layers = cfg.layers
    if position == "none" or scale is not None:
        attention = layers[0].attention
        attention = dataclasses.replace(
            attention,
            position=None if position == "none" else attention.position,
            query_scale=scale or attention.query_scale,
        )
        layers = (dataclasses.replace(layers[0], attention=attention),) * len(layers)
    cfg = dataclasses.replace(cfg, layers=layers)
    if name.startswith("gemma"):
        cfg = dataclasses.replace(
            cfg,
            final_norm=Norm("rms_plus_one", 1e-6),
            embed_scale=32**0.5,
            logit_scale=0.7,
            lm_head_bias=True,
            tie_embeddings=False,
        )
    return cfg


def mixed_config() -> ModelConfig:
    """Three layers that differ in every way a layer can: heads, head dim, positions, norms,
    residual, MLP."""
    rotary = Attention(4, 2, 8, Rotary(10000.0, 8), 8**-0.5)
    alibi = Attention(2, 1, 16, Alibi((0.3, 0.1)), 0.25, qkv_bias=True)
    bare = Attention(4, 4, 4, None, 0.5, qk_norm=Norm("rms", 1e-6))
    layers = (
        LayerSpec(rotary, Mlp(48, "silu"), Norm("rms", 1e-5)),
        LayerSpec(alibi, Mlp(24, "gelu_new", gated=False, bias=True), LAYER_NORM, "parallel"),
        LayerSpec(bare, Mlp(16, "relu"), Norm("layer", 1e-5), "parallel_shared"),
    )
    return ModelConfig("llama", 97, 32, layers, Norm("rms", 1e-5), 128, tie_embeddings=True)


def modern_config(name: str) -> ModelConfig:
    """Two or three layers of today's layer kinds: native sliding windows next to full layers,
    learned sink logits, soft-capping, post-norms, qk-norm scopes, experts, rope scalings."""
    rms, plus_one = Norm("rms", 1e-5), Norm("rms_plus_one", 1e-6)
    yarn = RopeScaling("yarn", 4.0, original_max_position_embeddings=16, truncate=False)
    longrope = RopeScaling(
        "longrope",
        4.0,
        original_max_position_embeddings=6,
        short_factor=(1.0, 1.5, 2.0, 3.0),
        long_factor=(1.0, 2.0, 4.0, 8.0),
    )
    experts = Experts(4, 2, normalize=True, router_bias=True)
    if name == "gpt-oss":  # sliding + full, learned sinks, yarn, experts with clamped swiglu
        attn = Attention(4, 2, 8, Rotary(150.0, 8, scaling=yarn), 8**-0.5, qkv_bias=True)
        attn = dataclasses.replace(attn, out_bias=True, learned_sinks=True)
        mlp = Mlp(12, "clamped_swiglu", bias=True, experts=experts, alpha=1.702, limit=1.0)
        layers = (
            LayerSpec(dataclasses.replace(attn, sliding_window=4), mlp, rms),
            LayerSpec(attn, mlp, rms),
        )
        return ModelConfig("gpt_oss", 97, 32, layers, rms, 128)
    if name == "gemma2":  # sandwich norms, attention and final soft-caps, sliding + full
        attn = Attention(4, 2, 8, Rotary(10000.0, 8), 0.3, softcap=2.0)
        mlp = Mlp(24, "gelu_pytorch_tanh")
        layers = (
            LayerSpec(dataclasses.replace(attn, sliding_window=4), mlp, plus_one, norms="pre_post"),
            LayerSpec(attn, mlp, plus_one, norms="pre_post"),
        )
        return ModelConfig(
            "gemma2", 97, 32, layers, plus_one, 128, True, embed_scale=32**0.5, final_softcap=3.0
        )
    if name == "gemma3":  # per-head qk-norm, a rope base per layer kind, linear scaling
        local = Attention(4, 1, 8, Rotary(10.0, 8), 0.3, qk_norm=plus_one, sliding_window=3)
        full = dataclasses.replace(
            local,
            position=Rotary(1000.0, 8, scaling=RopeScaling("linear", 4.0)),
            sliding_window=None,
        )
        mlp = Mlp(24, "gelu_pytorch_tanh")
        layers = tuple(LayerSpec(a, mlp, plus_one, norms="pre_post") for a in (local, local, full))
        return ModelConfig("gemma3_text", 97, 32, layers, plus_one, 128, True, embed_scale=32**0.5)
    if name == "olmo2-qwen3moe":  # post-norms only with all-heads qk-norm; experts, no bias
        olmo = Attention(4, 2, 8, Rotary(500.0, 8), 8**-0.5, qk_norm=rms, qk_norm_scope="all")
        layers = (
            LayerSpec(olmo, Mlp(24, "silu"), rms, norms="post"),
            LayerSpec(olmo, Mlp(12, "silu", experts=Experts(4, 3, normalize=False)), rms),
        )
        return ModelConfig("olmo2", 97, 32, layers, rms, 128)
    if name == "smollm3-phi3":  # a layer without rotary; longrope; fused in one model
        attn = Attention(4, 2, 8, Rotary(100.0, 8, scaling=longrope), 8**-0.5)
        layers = (
            LayerSpec(attn, Mlp(24, "silu"), rms),
            LayerSpec(dataclasses.replace(attn, position=None), Mlp(24, "silu"), rms),
        )
        return ModelConfig("smollm3", 97, 32, layers, rms, 128, True)
    if name == "bloom":  # embedding LayerNorm, ALiBi
        norm = Norm("layer", 1e-5, bias=True)
        attn = Attention(4, 4, 8, SLOPES, 8**-0.5, qkv_bias=True, out_bias=True)
        layers = (LayerSpec(attn, Mlp(32, "gelu_new", gated=False, bias=True), norm),) * 2
        return ModelConfig("bloom", 97, 32, layers, norm, 128, True, embed_norm=norm)
    raise KeyError(name)


MODERN = ("gpt-oss", "gemma2", "gemma3", "olmo2-qwen3moe", "smollm3-phi3", "bloom")


@pytest.mark.parametrize("name", [*KINDS, "mixed-layers", *MODERN])
def test_layer_kinds_match_the_streaming_reference(name):
    """Sink mode over many evictions (chunk 1 and 7) and dense mode, for every layer kind."""
    if name in MODERN:
        cfg = modern_config(name)
    else:
        cfg = mixed_config() if name == "mixed-layers" else kind_config(name)
    flat = random_flat_params(cfg, seed=3)
    m = tiny_model(cfg, flat)
    tokens = np.random.default_rng(4).integers(0, 97, size=(1, 30)).astype(np.int32)
    for stream, dense in ((StreamConfig(2, 5), False), (StreamConfig(0, 32, "dense"), True)):
        want = stream_logits(flat, cfg, tokens[0], stream.sinks, stream.window, dense)
        for chunk in (1, 7):
            got, _ = feed(m, stream, tokens, chunk=chunk)
            np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=0, err_msg=f"{stream}")


def test_mixed_layers_keep_their_own_cache_shapes():
    cfg = mixed_config()
    cache = kv.init_cache(cfg, StreamConfig(2, 5), 3)
    shapes = [(lc.keys[0].shape, lc.values[0].shape) for lc in cache.layers]
    assert shapes == [
        ((3, 2, 8, 2), (3, 2, 2, 8)),
        ((3, 1, 16, 2), (3, 1, 2, 16)),
        ((3, 4, 4, 2), (3, 4, 2, 4)),
    ]
    assert cfg.cache_bytes_per_token(4) == 4 * 2 * (2 * 8 + 16 + 4 * 4)


@pytest.mark.parametrize("batch", [3, 6], ids=["plain", "fused"])
@pytest.mark.parametrize("bad_row", [0, 1])
def test_a_non_finite_row_leaves_the_other_rows_unchanged(batch, bad_row):
    """A token whose embedding is NaN poisons its own row only: the cache write's dependence
    on the attention output is per row and never carries a non-finite value."""
    cfg = dataclasses.replace(kind_config("alibi"), tie_embeddings=False)  # finite logits
    assert (batch * 2 >= attention.FUSED_MIN_PAIRS) == (batch == 6)
    flat = random_flat_params(cfg, seed=5)
    poison = 7
    flat["embed"][poison] = np.nan
    m = tiny_model(cfg, flat)
    rng = np.random.default_rng(6)
    tokens = rng.integers(8, 97, size=(batch, 20)).astype(np.int32)
    tokens[bad_row, 3] = poison
    stream = StreamConfig(2, 5)
    together, _ = feed(m, stream, tokens, chunk=4)
    assert np.isnan(together[bad_row]).any()
    for row in set(range(batch)) - {bad_row}:
        alone, _ = feed(m, stream, tokens[row : row + 1], chunk=4)
        assert np.isfinite(together[row]).all()
        np.testing.assert_allclose(together[row], alone[0], atol=1e-5, rtol=0)


def test_bfloat16_stays_within_its_bound_of_float32():
    """bfloat16 weights and cache against float32 over a stream with evictions: log-probabilities
    (|log p| up to ~10 with these random weights) within 0.03 nats on average and 0.25 at most
    (bfloat16 keeps 8 bits of mantissa: about 0.4% per value)."""
    cfg = kind_config("layernorm-parallel-shared-plain-gelu-biases")
    flat = random_flat_params(cfg, seed=8)
    tokens = np.random.default_rng(9).integers(0, 97, size=(1, 60)).astype(np.int32)
    stream = StreamConfig(2, 9)
    f32, _ = feed(tiny_model(cfg, flat), stream, tokens, chunk=8)
    bf16, cache = feed(tiny_model(cfg, flat, jnp.bfloat16), stream, tokens, chunk=8)
    assert cache.layers[0].keys[0].dtype == jnp.bfloat16
    logp = [jax.nn.log_softmax(x.astype(np.float64), axis=-1) for x in (f32, bf16)]
    error = np.abs(logp[0] - logp[1])
    assert error.mean() < 0.03 and error.max() < 0.25


def test_a_bfloat16_cache_under_float32_weights_keeps_its_dtype():
    """The cache's dtype is its own: writes and the once-per-lap re-rotation keep bfloat16
    (a drift would recompile), and the logits stay within the bfloat16 bound of float32."""
    cfg = tiny_config()
    m = tiny_model(cfg, random_flat_params(cfg, seed=12))
    tokens = np.random.default_rng(13).integers(0, 97, size=(1, 40)).astype(np.int32)
    stream = StreamConfig(2, 9)
    f32, _ = feed(m, stream, tokens, chunk=8)
    before = entry.TRACES["step"]
    half, cache = feed(m, stream, tokens, 8, cache=kv.init_cache(cfg, stream, 1, jnp.bfloat16))
    assert entry.TRACES["step"] - before <= 1
    assert {x.dtype for x in jax.tree.leaves(cache.layers)} == {jnp.dtype(jnp.bfloat16)}
    logp = [jax.nn.log_softmax(x.astype(np.float64), axis=-1) for x in (f32, half)]
    error = np.abs(logp[0] - logp[1])
    assert error.mean() < 0.03 and error.max() < 0.25


@pytest.mark.parametrize("name", ["mixed-layers", "gpt-oss", "olmo2-qwen3moe"])
def test_every_weight_is_an_nnx_param_with_a_partition_spec(name):
    """`nnx.split` of the module gives Param state whose every weight has one logical axis name
    (or None) per dimension, and every matrix names at least one axis (experts on `experts`)."""
    cfg = mixed_config() if name == "mixed-layers" else modern_config(name)
    m = tiny_model(cfg, random_flat_params(cfg))
    assert isinstance(m.module, nnx.Module)
    _, params = nnx.split(m.module, nnx.Param)
    specs = nnx.get_partition_spec(params)
    flat_specs = dict(nnx.to_flat_state(specs))
    flat_params = dict(nnx.to_flat_state(params))
    assert set(flat_specs) == set(flat_params) and len(flat_params) == len(layout.param_shapes(cfg))
    for path, param in flat_params.items():
        spec = flat_specs[path].get_value()
        assert isinstance(param, nnx.Param)
        assert len(spec) == param.get_value().ndim, path
        assert set(spec) <= {None, *layers.LOGICAL_AXES}, path
        if param.get_value().ndim >= 2:
            assert any(spec), path


def test_a_users_own_jit_over_split_state_equals_step():
    cfg = kind_config("alibi")
    m = tiny_model(cfg, random_flat_params(cfg, seed=10))
    graphdef, state = nnx.split(m.module)

    @jax.jit
    def forward(state, cache, tokens, valid):
        module = nnx.merge(graphdef, state)
        hidden, cache = module(cache, tokens, valid)
        return module.logits(hidden), cache

    tokens = np.random.default_rng(11).integers(0, 97, size=(1, 8)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    stream = StreamConfig(2, 5)
    mine, _ = forward(state, kv.init_cache(cfg, stream, 1), tokens, valid)
    want, _ = feed(m, stream, tokens, chunk=8)
    np.testing.assert_allclose(np.moveaxis(np.asarray(mine), 0, -1), want, atol=1e-6, rtol=0)


def test_the_graph_definition_is_the_same_for_equal_configs():
    """Two loads of one config share compilations: equal, hashable graph definitions."""
    cfg = kind_config("alibi")
    a, b = layout.abstract(cfg)[0], layout.abstract(cfg)[0]
    assert a == b and hash(a) == hash(b)


def _lowered_step(cfg, stream, batch: int, chunk: int, platform: str, cache_dtype=jnp.float32):
    """The text of `entry.step` exported for `platform` from abstract arguments (no device
    of that platform needed)."""
    graphdef, weights = layout.abstract(cfg)
    cache = jax.eval_shape(lambda: kv.init_cache(cfg, stream, batch, cache_dtype))
    tokens = jax.ShapeDtypeStruct((batch, chunk), jnp.int32)
    valid = jax.ShapeDtypeStruct((batch, chunk), jnp.bool_)
    export = jax.export.export(entry.step.jitted, platforms=(platform,))
    return export(weights, cache, tokens, valid, graphdef=graphdef).mlir_module()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_the_platform_compiled_for_picks_the_bodies(platform, monkeypatch):
    """The attention bodies and the quantized product's slicing are chosen by the platform a
    step is lowered for, not by the machine: from this CPU machine an export for tpu or cuda
    carries the plain attention and the whole product, one for cpu the CPU forms (the fused
    float body for wide batches, the int8 decode body, the sliced dequantization)."""
    monkeypatch.setattr(quant, "DEQUANT_BYTES", 4096)  # the tied 97 x 32 head in 4 slices
    cfg = C.quantize_config(tiny_config(), {"embed": Quant("q8_0")})
    stream = StreamConfig(2, 6)
    wide = 6  # batch rows: 6 x 2 kv heads >= FUSED_MIN_PAIRS
    assert wide * 2 >= attention.FUSED_MIN_PAIRS
    forms = {
        "cpu float": _lowered_step(cfg, stream, wide, 1, "cpu"),
        "cpu int8": _lowered_step(cfg, stream, 1, 1, "cpu", jnp.int8),
        "accelerator float": _lowered_step(cfg, stream, wide, 1, platform),
        "accelerator int8": _lowered_step(cfg, stream, 1, 1, platform, jnp.int8),
    }
    cpu_only = ("attention_fused_cpu", "attention_int8_decode_cpu", "dequantize_sliced_cpu")
    assert all(
        name in forms["cpu float"] for name in ("attention_fused_cpu", "dequantize_sliced_cpu")
    )
    assert "attention_int8_decode_cpu" in forms["cpu int8"]
    for name in ("accelerator float", "accelerator int8"):
        assert "attention_plain" in forms[name]
        assert not any(cpu in forms[name] for cpu in cpu_only), name
