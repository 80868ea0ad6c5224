"""Every architecture family, converted from a tiny random checkpoint (transformers' own config
and model classes, or for Qwen v1 and BTLM the reference written from their published code),
against its PyTorch original in dense mode and against the streaming reference (which reads the
same per-layer description) in sink mode; chunked equals one-by-one; one compile per shape."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from flax import nnx

import jaxsink
from jaxsink.checkpoint import load_params
from jaxsink.cli import main as cli_main
from jaxsink.config import Alibi, Rotary, StreamConfig
from jaxsink.convert import convert
from jaxsink.convert.cli import main as convert_main
from jaxsink.traced import cache as kv
from tests import published_models
from tests.family_checks import assert_dense_matches_pytorch, assert_sink_stream_matches_reference
from tests.hf_tiny import build_from_config, torch_nll
from tests.spec_reference import stream_logits
from tests.tiny import feed

VOCAB = 97
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)

# name -> (transformers config class, its kwargs)
TRANSFORMERS = {
    "llama-biases": (
        transformers.LlamaConfig,
        SMALL | dict(intermediate_size=48, attention_bias=True, mlp_bias=True),
    ),
    "gpt_neox-parallel": (transformers.GPTNeoXConfig, SMALL | dict(intermediate_size=48)),
    "gpt_neox-sequential": (
        transformers.GPTNeoXConfig,
        SMALL | dict(intermediate_size=48, use_parallel_residual=False, rotary_pct=0.5),
    ),
    "gptj": (
        transformers.GPTJConfig,
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=48),
    ),
    "falcon-rw-mqa": (transformers.FalconConfig, SMALL),
    "falcon-new-gqa": (
        transformers.FalconConfig,
        SMALL | dict(new_decoder_architecture=True, num_kv_heads=2, bias=True),
    ),
    "falcon-alibi-sequential": (
        transformers.FalconConfig,
        SMALL | dict(alibi=True, multi_query=False, parallel_attn=False, bias=True),
    ),
    "falcon-new-one-norm": (
        transformers.FalconConfig,
        SMALL | dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    ),
    "falcon-alibi-parallel-mqa": (transformers.FalconConfig, SMALL | dict(alibi=True)),
    "gpt_neox-no-bias": (
        transformers.GPTNeoXConfig,
        SMALL | dict(intermediate_size=48, attention_bias=False),
    ),
    "gptj-full-rotary": (
        transformers.GPTJConfig,
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=8, n_inner=48),
    ),
    "phi-gqa": (transformers.PhiConfig, SMALL | dict(intermediate_size=48, num_key_value_heads=2)),
    "mpt-clip": (
        transformers.MptConfig,
        dict(
            vocab_size=VOCAB,
            d_model=32,
            n_layers=2,
            n_heads=4,
            expansion_ratio=4,  # transformers' MPT hard-codes 4
            attn_config=dict(clip_qkv=0.6),  # transformers ignores alibi_bias_max
        ),
    ),
    "stablelm": (
        transformers.StableLmConfig,
        SMALL | dict(intermediate_size=48, num_key_value_heads=4),
    ),
    "stablelm-parallel-qkbias-qknorm": (
        transformers.StableLmConfig,
        SMALL
        | dict(
            intermediate_size=48,
            num_key_value_heads=2,
            use_qkv_bias=True,
            qk_layernorm=True,
            use_parallel_residual=True,
        ),
    ),
    "phi": (transformers.PhiConfig, SMALL | dict(intermediate_size=48)),
    "phi-qknorm": (transformers.PhiConfig, SMALL | dict(intermediate_size=48, qk_layernorm=True)),
    "gemma-mqa": (
        transformers.GemmaConfig,
        SMALL | dict(intermediate_size=48, num_key_value_heads=1, head_dim=8),
    ),
}
PUBLISHED = {"qwen": published_models.build_tiny_qwen, "btlm": published_models.build_tiny_btlm}
CASES = sorted(TRANSFORMERS) + sorted(PUBLISHED)


def build(case: str, path):
    """(PyTorch model in eval mode, its folder: config.json + safetensors, no tokenizer)."""
    if case in PUBLISHED:
        return PUBLISHED[case](path), path
    cls, kwargs = TRANSFORMERS[case]
    # transformers' eager Falcon adds ALiBi twice (to the scores and again in the mask)
    kernel = "sdpa" if case.startswith("falcon") else "eager"
    return build_from_config(cls(**kwargs), path, kernel), path


@pytest.fixture(scope="module", params=CASES)
def family(request, tmp_path_factory):
    """(case, PyTorch model, the converted jaxsink model, its flat checkpoint arrays)."""
    path = tmp_path_factory.mktemp(request.param)
    torch_model, src = build(request.param, path / "src")
    convert(src, path / "out", progress=False)
    model = jaxsink.load(path / "out")
    return request.param, torch_model, model, load_params(path / "out", model.cfg)


def test_dense_logits_match_pytorch(family):
    _, torch_model, model, _ = family
    assert_dense_matches_pytorch(torch_model, model)


def test_sink_stream_matches_the_streaming_reference(family):
    """S = 2, W = 5 over 40 tokens (many evictions), chunk 1 and 8, one compile per shape."""
    _, _, model, flat = family
    assert_sink_stream_matches_reference(model, flat, 40)


def test_family_config_is_what_its_code_computes(family):
    """The per-layer description carries each family's defining traits."""
    case, _, model, _ = family
    layer = model.cfg.layers[0]
    position = layer.attention.position
    traits = {
        "gpt_neox-parallel": lambda: (position.dim, layer.residual) == (2, "parallel"),
        "gpt_neox-sequential": lambda: (position.dim, layer.residual) == (4, "sequential"),
        "gpt_neox-no-bias": lambda: not (layer.attention.qkv_bias or layer.attention.out_bias),
        "gptj-full-rotary": lambda: position.interleaved and position.dim == 8,
        "falcon-new-one-norm": lambda: layer.residual == "parallel_shared",
        "falcon-alibi-parallel-mqa": lambda: (
            isinstance(position, Alibi) and layer.attention.num_kv_heads == 1
        ),
        "phi-gqa": lambda: layer.attention.num_kv_heads == 2,
        "gptj": lambda: position.interleaved and position.dim == 4 and model.cfg.lm_head_bias,
        "falcon-rw-mqa": lambda: (
            layer.attention.num_kv_heads == 1 and layer.residual == "parallel_shared"
        ),
        "falcon-new-gqa": lambda: (
            layer.attention.num_kv_heads == 2 and layer.residual == "parallel"
        ),
        "falcon-alibi-sequential": lambda: (
            isinstance(position, Alibi) and layer.residual == "sequential"
        ),
        "mpt-clip": lambda: isinstance(position, Alibi) and layer.attention.clip_qkv == 0.6,
        "stablelm": lambda: isinstance(position, Rotary) and position.dim == 2,
        "stablelm-parallel-qkbias-qknorm": lambda: layer.attention.qk_norm is not None,
        "phi": lambda: position.dim == 4 and model.cfg.lm_head_bias,
        "phi-qknorm": lambda: layer.attention.qk_norm is not None and layer.attention.qk_norm.bias,
        "gemma-mqa": lambda: layer.norm.kind == "rms_plus_one" and model.cfg.embed_scale == 32**0.5,
        "llama-biases": lambda: layer.attention.out_bias and layer.mlp.bias,
        "qwen": lambda: layer.mlp.gated and model.cfg.position_limit == published_models.SEQ_LENGTH,
        "btlm": lambda: isinstance(position, Alibi) and model.cfg.logit_scale != 1.0,
    }
    assert traits[case]()


def test_loaded_model_is_an_nnx_module_with_partition_specs(family):
    _, _, model, _ = family
    specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model.module, nnx.Param)))
    assert len(specs) == len(load_params(model.path, model.cfg))
    for path, spec in specs:
        assert spec.get_value() is not None, path


# --- the commands, as a user runs them ------------------------------------------------------

CLI_CASES = ["gpt_neox-parallel", "falcon-alibi-sequential", "btlm"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_convert_and_ppl_commands(tmp_path, case):
    """`jaxsink-convert DIR OUT`, then `jaxsink ppl --tokens`: dense per-token NLL equal to
    PyTorch's; sink mode equal at chunk 1, 8 and the default; a cache longer than the stream
    equal to dense."""
    torch_model, src = build(case, tmp_path / "src")
    out = tmp_path / "out"
    assert convert_main([str(src), str(out)]) == 0
    ids = np.random.default_rng(3).integers(0, VOCAB, size=61)
    np.save(tmp_path / "ids.npy", ids)

    def ppl(name: str, mode: str, *flags: str) -> np.ndarray:
        folder = tmp_path / name
        argv = ["ppl", "--model", str(out), "--tokens", str(tmp_path / "ids.npy")]
        argv += ["--n-tokens", "60", "--mode", mode, "--quiet", "--out", str(folder), *flags]
        assert cli_main(argv) == 0
        return np.load(folder / f"nll_{mode}.npy")

    dense = ppl("dense", "dense")
    np.testing.assert_allclose(dense, torch_nll(torch_model, ids), atol=1e-4, rtol=0)
    small = ["--sinks", "2", "--window", "5"]
    by_chunk = [ppl(f"c{c}", "sink", *small, "--chunk", str(c)) for c in (1, 8)]
    by_chunk.append(ppl("default", "sink", *small))
    for nll in by_chunk[1:]:
        np.testing.assert_allclose(nll, by_chunk[0], atol=1e-5, rtol=0)
    assert np.abs(by_chunk[0] - dense).max() > 1e-3  # evictions did change the stream
    wide = ppl("wide", "sink", "--sinks", "2", "--window", "62")
    np.testing.assert_allclose(wide, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4),
        transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            ffn_dim=48,
            word_embed_proj_dim=32,
        ),
    ],
    ids=["gpt2", "opt"],
)
def test_learned_positions_are_refused(tmp_path, capsys, config):
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    capsys.readouterr()  # transformers' own progress output
    assert convert_main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "learned absolute position" in err and "gpt_neox" in err and "llama" in err
    assert not (tmp_path / "out").exists()


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
