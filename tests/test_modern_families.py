"""Today's families, converted from tiny random checkpoints built with transformers' own config
and model classes, with native sliding windows shorter than the test stream: dense logits
against PyTorch, sink mode over many evictions against the streaming reference, chunked equal
to one-by-one, one compile per shape, each layer kind's cache as the contract says, and the
commands as a user runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

import jaxsink
from jaxsink.checkpoint import load_params
from jaxsink.cli import main as cli_main
from jaxsink.config import StreamConfig
from jaxsink.convert import convert
from jaxsink.convert.cli import main as convert_main
from jaxsink.traced import cache as kv
from tests.family_checks import assert_dense_matches_pytorch, assert_sink_stream_matches_reference
from tests.hf_tiny import build_from_config, torch_logits, torch_nll
from tests.tiny import feed

VOCAB = 97
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
WINDOW = 4  # native sliding windows, far shorter than the streams below

# name -> (transformers config class, its kwargs)
FAMILIES = {
    "qwen3-sliding": (
        transformers.Qwen3Config,
        SMALL
        | dict(head_dim=8, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    "qwen3_moe-dense-layer": (
        transformers.Qwen3MoeConfig,
        SMALL
        | dict(
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            mlp_only_layers=[1],
        ),
    ),
    "mixtral-sliding": (
        transformers.MixtralConfig,
        SMALL | dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    ),
    "smollm3-nope-sliding": (
        transformers.SmolLM3Config,
        SMALL
        | dict(
            num_hidden_layers=4,
            no_rope_layer_interval=2,
            use_sliding_window=True,
            sliding_window=WINDOW,
        ),
    ),
    "olmo2": (transformers.Olmo2Config, SMALL),
    "starcoder2-sliding": (transformers.Starcoder2Config, SMALL | dict(sliding_window=WINDOW)),
    "phi3-longrope-sliding": (
        transformers.Phi3Config,
        SMALL
        | dict(
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            sliding_window=WINDOW,
            rope_parameters=dict(
                rope_type="longrope",
                rope_theta=100.0,
                partial_rotary_factor=0.5,
                short_factor=[1.0, 1.5],
                long_factor=[2.0, 5.0],
            ),
        ),
    ),
    "gemma2-softcaps": (
        transformers.Gemma2Config,
        SMALL
        | dict(
            head_dim=8,
            sliding_window=WINDOW,
            query_pre_attn_scalar=6,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
    ),
    "gemma3-two-ropes": (
        transformers.Gemma3TextConfig,
        SMALL
        | dict(
            num_hidden_layers=3,
            head_dim=8,
            sliding_window=WINDOW,
            sliding_window_pattern=3,
            final_logit_softcapping=4.0,
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1000.0),
                "sliding_attention": dict(rope_type="default", rope_theta=10.0),
            },
        ),
    ),
    "gpt_oss": (
        transformers.GptOssConfig,
        SMALL
        | dict(
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
            swiglu_limit=0.5,
        ),
    ),
    "bloom": (
        transformers.BloomConfig,
        dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
    ),
}


def build(case: str, path):
    cls, kwargs = FAMILIES[case]
    return build_from_config(cls(**kwargs), path)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """(case, PyTorch model, the converted jaxsink model, its flat checkpoint arrays)."""
    path = tmp_path_factory.mktemp(request.param)
    torch_model = build(request.param, path / "src")
    convert(path / "src", path / "out", progress=False)
    model = jaxsink.load(path / "out")
    return request.param, torch_model, model, load_params(path / "out", model.cfg)


def test_dense_logits_match_pytorch(family):
    _, torch_model, model, _ = family
    assert_dense_matches_pytorch(torch_model, model)


def test_sink_stream_matches_the_streaming_reference(family):
    """S = 2, W = 5 over 28 tokens (many evictions in both layer kinds), chunk 1 and 8, one
    compile per shape."""
    _, _, model, flat = family
    assert_sink_stream_matches_reference(model, flat, 28)


def test_each_layer_kind_keeps_its_own_cache(family):
    """Full layers keep S + W slots, native sliding layers their window's w - 1 (the query's
    own key is the w-th) whatever S and W are; the native cache is the smaller one."""
    _, _, model, _ = family
    cfg = model.cfg
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


def test_family_traits(family):
    """The per-layer description carries what defines each family."""
    case, _, model, _ = family
    cfg = model.cfg
    a = [s.attention for s in cfg.layers]
    windows = [x.sliding_window for x in a]
    traits = {
        "qwen3-sliding": lambda: windows == [None, WINDOW] and a[0].qk_norm is not None,
        "qwen3_moe-dense-layer": lambda: (
            cfg.layers[0].mlp.experts is not None
            and cfg.layers[1].mlp.experts is None
            and not cfg.layers[0].mlp.experts.normalize
        ),
        "mixtral-sliding": lambda: windows == [WINDOW] * 2 and cfg.layers[0].mlp.experts.normalize,
        "smollm3-nope-sliding": lambda: (
            [x.position is None for x in a] == [False, True] * 2 and windows == [None, WINDOW] * 2
        ),
        "olmo2": lambda: cfg.layers[0].norms == "post" and a[0].qk_norm_scope == "all",
        "starcoder2-sliding": lambda: windows == [WINDOW] * 2 and not cfg.layers[0].mlp.gated,
        "phi3-longrope-sliding": lambda: (
            a[0].position.scaling.kind == "longrope" and a[0].position.dim == 4
        ),
        "gemma2-softcaps": lambda: (
            a[0].softcap == 2.0 and cfg.final_softcap == 3.0 and windows[1] is None
        ),
        "gemma3-two-ropes": lambda: (
            windows == [WINDOW, WINDOW, None]
            and a[0].position.theta == 10.0
            and a[2].position.scaling.kind == "linear"
            and a[0].softcap is None
        ),
        "gpt_oss": lambda: (
            a[0].learned_sinks
            and windows == [WINDOW, None]
            and a[0].position.scaling.kind == "yarn"
        ),
        "bloom": lambda: cfg.embed_norm is not None,
    }
    assert traits[case]()


# --- the commands, as a user runs them ------------------------------------------------------


@pytest.mark.parametrize("case", ["gpt_oss", "phi3-longrope-sliding"])
def test_convert_and_ppl_commands(tmp_path, case):
    """The issue's check: `jaxsink-convert`, then `jaxsink ppl --tokens` over 23 tokens (native
    windows of 4 here): dense NLL equal to PyTorch's within 1e-4; sink mode (S = 2, W = 5) equal
    at chunk 1, 8 and the default; a window wider than the stream equal to dense."""
    torch_model = build(case, tmp_path / "src")
    out = tmp_path / "out"
    assert convert_main([str(tmp_path / "src"), str(out)]) == 0
    ids = np.random.default_rng(3).integers(0, VOCAB, size=24)
    np.save(tmp_path / "ids.npy", ids)

    def ppl(name: str, mode: str, *flags: str) -> np.ndarray:
        folder = tmp_path / name
        argv = ["ppl", "--model", str(out), "--tokens", str(tmp_path / "ids.npy")]
        argv += ["--n-tokens", "23", "--mode", mode, "--quiet", "--out", str(folder), *flags]
        assert cli_main(argv) == 0
        return np.load(folder / f"nll_{mode}.npy")

    dense = ppl("dense", "dense")
    np.testing.assert_allclose(dense, torch_nll(torch_model, ids), atol=1e-4, rtol=0)
    summary = json.loads((tmp_path / "dense" / "summary.json").read_text())["modes"]["dense"]
    assert summary["cache_bytes"] < summary["cache_bytes_all_full"]  # native windows
    small = ["--sinks", "2", "--window", "5"]
    by_chunk = [ppl(f"c{c}", "sink", *small, "--chunk", str(c)) for c in (1, 8)]
    by_chunk.append(ppl("default", "sink", *small))
    for nll in by_chunk[1:]:
        np.testing.assert_allclose(nll, by_chunk[0], atol=1e-5, rtol=0)
    wide = ppl("wide", "sink", "--sinks", "2", "--window", "62")
    np.testing.assert_allclose(wide, dense, atol=1e-5, rtol=0)


# --- expert layouts -------------------------------------------------------------------------


def test_fused_experts_convert_like_per_expert_ones(tmp_path):
    """transformers 5 saves Mixtral's experts one tensor each (`block_sparse_moe.experts.{e}.w1`)
    but holds them fused in memory (`mlp.experts.gate_up_proj`); a checkpoint of either layout
    gives the same parameters."""
    from safetensors.numpy import save_file

    torch_model = build("mixtral-sliding", tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "per_expert", progress=False)
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_bytes((tmp_path / "src" / "config.json").read_bytes())
    state = {k: v.detach().contiguous().numpy() for k, v in torch_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    convert(fused, tmp_path / "from_fused", progress=False)
    cfg = jaxsink.load(tmp_path / "per_expert").cfg
    a, b = load_params(tmp_path / "per_expert", cfg), load_params(tmp_path / "from_fused", cfg)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_gpt_oss_mxfp4_experts_are_dequantized_exactly(tmp_path):
    """A gpt-oss checkpoint whose experts are MXFP4 blocks and scales (as the published ones
    are) converts to the weights transformers' own dequantization gives: dense logits equal."""
    import torch
    from safetensors.numpy import save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    kwargs = FAMILIES["gpt_oss"][1] | dict(intermediate_size=64)  # MXFP4 blocks of 32 values
    config = transformers.GptOssConfig(**kwargs)
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


def test_bloom_checkpoints_saved_from_the_base_model_convert(tmp_path):
    """bigscience's own Bloom checkpoints name tensors without `transformer.` (saved from
    BloomModel): the same parameters as transformers' prefixed names."""
    from safetensors.numpy import save_file

    torch_model = build("bloom", tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "prefixed", progress=False)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((tmp_path / "src" / "config.json").read_bytes())
    state = {
        k.removeprefix("transformer."): v.detach().contiguous().numpy()
        for k, v in torch_model.state_dict().items()
        if k != "lm_head.weight"
    }
    save_file(state, str(bare / "model.safetensors"))
    convert(bare, tmp_path / "from_bare", progress=False)
    cfg = jaxsink.load(tmp_path / "prefixed").cfg
    a, b = load_params(tmp_path / "prefixed", cfg), load_params(tmp_path / "from_bare", cfg)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
