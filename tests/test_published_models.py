"""Self-checks of the Qwen v1 / BTLM references and tiny checkpoints in
`tests/support/published_models.py` (the case table's "published" builds)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tests.support import published_models
from tests.support.families import cases
from tests.support.published_models import (
    VOCAB,
    alibi_slopes,
    btlm_state_dict_names,
    btlm_tiny_config,
    build_tiny_btlm,
    build_tiny_qwen,
    load_reference,
    qwen_ntk_alpha,
    qwen_state_dict_names,
    qwen_tiny_config,
)

pytestmark = pytest.mark.torch

# the families the case table builds from their published code
PUBLISHED = cases(lambda c: c.build == "published")
BUILDERS = {c.family: getattr(published_models, f"build_tiny_{c.family}") for c in PUBLISHED}


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


def test_qwen_files_names_and_shapes(tmp_path):
    model = build_tiny_qwen(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == qwen_tiny_config()
    assert config["model_type"] == "qwen" and config["architectures"] == ["QWenLMHeadModel"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    tensors = _tensors(tmp_path)
    names = qwen_state_dict_names(config)
    assert sorted(tensors) == names == sorted(model.state_dict())
    assert "transformer.h.0.attn.c_proj.bias" not in names  # no_bias
    assert tensors["transformer.h.1.attn.c_attn.weight"].shape == (96, 32)  # Linear [3D, D]
    assert tensors["transformer.h.1.attn.c_attn.bias"].shape == (96,)
    assert tensors["transformer.h.1.mlp.w1.weight"].shape == (64, 32)  # intermediate_size // 2
    assert tensors["transformer.h.1.mlp.c_proj.weight"].shape == (32, 64)
    assert tensors["lm_head.weight"].shape == (VOCAB, 32)
    assert not torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])


def test_qwen_with_biases_names(tmp_path):
    build_tiny_qwen(tmp_path, no_bias=False)
    names = qwen_state_dict_names(qwen_tiny_config(no_bias=False))
    assert sorted(_tensors(tmp_path)) == names
    assert {"transformer.h.0.mlp.w2.bias", "transformer.h.0.attn.c_proj.bias"} <= set(names)


def test_btlm_files_names_and_shapes(tmp_path):
    model = build_tiny_btlm(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == btlm_tiny_config()
    assert config["model_type"] == "btlm" and config["architectures"] == ["BTLMLMHeadModel"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_btlm.BTLMLMHeadModel"
    assert "tie_word_embeddings" not in config  # absent, as in btlm-3b-8k-base: tied
    tensors = _tensors(tmp_path)
    names = btlm_state_dict_names(config)
    assert sorted(tensors) == names == sorted(model.state_dict())
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D [in, out]
    assert tensors["transformer.h.0.attn.c_proj.weight"].shape == (32, 32)
    assert tensors["transformer.h.0.mlp.c_fc2.weight"].shape == (32, 64)
    assert tensors["transformer.h.0.mlp.c_proj.weight"].shape == (64, 32)
    slopes = tensors["transformer.relative_pe.slopes"]
    assert slopes.shape == (4, 1)
    torch.testing.assert_close(slopes[:, 0], torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    assert torch.equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])


def test_btlm_optional_files(tmp_path):
    """Without lm_head.weight (tied) the reference still loads; perturbed slopes are used."""
    model = build_tiny_btlm(tmp_path, save_lm_head=False, perturb_slopes=True)
    tensors = _tensors(tmp_path)
    assert "lm_head.weight" not in tensors
    assert not torch.allclose(
        tensors["transformer.relative_pe.slopes"][:, 0], torch.tensor(alibi_slopes(4))
    )
    ids = _ids(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(load_reference(tmp_path)(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_reference_is_causal_and_deterministic(tmp_path, family):
    model = BUILDERS[family](tmp_path / "a", seed=3)
    again = BUILDERS[family](tmp_path / "b", seed=3)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    ids = _ids(2, 24)
    changed = ids.clone()
    changed[:, 17:] = (changed[:, 17:] + 5) % VOCAB
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (2, 24, VOCAB) and logits.dtype == torch.float32
        assert logits.std() > 0.1  # not a degenerate random model
        torch.testing.assert_close(model(ids), logits, rtol=0, atol=0)
        torch.testing.assert_close(again(ids), logits, rtol=0, atol=0)
        torch.testing.assert_close(load_reference(tmp_path / "a")(ids), logits, rtol=0, atol=0)
        other = model(changed)
    torch.testing.assert_close(other[:, :17], logits[:, :17], rtol=0, atol=1e-6)
    assert (other[:, 17:] - logits[:, 17:]).abs().max() > 1e-3
    torch.testing.assert_close(model(ids[:1]), logits[:1], rtol=1e-5, atol=1e-5)  # rows independent


def test_qwen_logn_and_dynamic_ntk_start_past_seq_length(tmp_path):
    """seq_length 16: up to 16 tokens neither applies; past it NTK re-rotates every position
    (alpha 3 for 17..32 tokens), while logn changes only the queries at positions >= 16."""
    assert [qwen_ntk_alpha(n, 16) for n in (1, 16, 17, 32, 33, 64, 65)] == [1, 1, 3, 3, 7, 7, 15]
    ids = _ids(1, 24)
    with torch.no_grad():
        both = build_tiny_qwen(tmp_path / "both", seq_length=16)
        prefix = both(ids)[:, :16]
        assert (prefix - both(ids[:, :16])).abs().max() > 1e-3  # alpha 3 for all positions
        torch.testing.assert_close(prefix, both(ids[:, :16], ntk_alpha=3), rtol=1e-5, atol=1e-5)
        logn = build_tiny_qwen(tmp_path / "logn", seq_length=16, use_dynamic_ntk=False)
        full = logn(ids)
        torch.testing.assert_close(full[:, :16], logn(ids[:, :16]), rtol=0, atol=1e-6)
        off = build_tiny_qwen(
            tmp_path / "off", seq_length=16, use_dynamic_ntk=False, use_logn_attn=False
        )
        assert (full[:, 16:] - off(ids)[:, 16:]).abs().max() > 1e-3


def test_btlm_alibi_scaling(tmp_path):
    """`train_seq_len` divides the slopes by T / train_seq_len past it; `factor` always."""
    ids = _ids(1, 24)
    with torch.no_grad():
        plain = build_tiny_btlm(tmp_path / "plain")
        dynamic = build_tiny_btlm(
            tmp_path / "dyn", alibi_scaling={"type": "linear", "train_seq_len": 16}
        )
        torch.testing.assert_close(dynamic(ids[:, :16]), plain(ids[:, :16]), rtol=0, atol=0)
        assert (dynamic(ids)[:, :16] - plain(ids)[:, :16]).abs().max() > 1e-4
        fixed = build_tiny_btlm(tmp_path / "fix", alibi_scaling={"type": "linear", "factor": 1.5})
        torch.testing.assert_close(fixed(ids), dynamic(ids[:, :24]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_reference_matches_transformers_counterpart(tmp_path, family):
    """Independent check of the layouts: Qwen v1 below seq_length is Qwen2 with c_attn split into
    q/k/v, w2 the gate and w1 the up projection; BTLM with learned positions, gelu_new and no muP is
    GPT-2 (same Conv1D [in, out] tensors, loaded as they are)."""
    transformers = pytest.importorskip("transformers")
    ids = _ids(2, 19)
    if family == "qwen":
        model = build_tiny_qwen(tmp_path)
        hf = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                rms_norm_eps=1e-6,
                rope_theta=10000.0,
                tie_word_embeddings=False,
            )
        )
        sd = _tensors(tmp_path)
        mapped = {
            "model.embed_tokens.weight": sd["transformer.wte.weight"],
            "model.norm.weight": sd["transformer.ln_f.weight"],
            "lm_head.weight": sd["lm_head.weight"],
        }
        for i in range(2):
            src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
            for j, n in enumerate("qkv"):
                mapped[f"{dst}self_attn.{n}_proj.weight"] = sd[src + "attn.c_attn.weight"].chunk(3)[
                    j
                ]
                mapped[f"{dst}self_attn.{n}_proj.bias"] = sd[src + "attn.c_attn.bias"].chunk(3)[j]
            mapped[dst + "self_attn.o_proj.weight"] = sd[src + "attn.c_proj.weight"]
            mapped[dst + "input_layernorm.weight"] = sd[src + "ln_1.weight"]
            mapped[dst + "post_attention_layernorm.weight"] = sd[src + "ln_2.weight"]
            mapped[dst + "mlp.gate_proj.weight"] = sd[src + "mlp.w2.weight"]
            mapped[dst + "mlp.up_proj.weight"] = sd[src + "mlp.w1.weight"]
            mapped[dst + "mlp.down_proj.weight"] = sd[src + "mlp.c_proj.weight"]
        hf.load_state_dict(mapped, strict=True)
    else:
        model = build_tiny_btlm(
            tmp_path,
            position_embedding_type="learned",
            activation_function="gelu_new",
            mup_embeddings_scale=1.0,
            mup_output_alpha=1.0,
            mup_width_scale=1.0,
            mup_scale_qk_dot_by_d=False,
        )
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=VOCAB,
                n_positions=512,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_inner=64,
                activation_function="gelu_new",
                layer_norm_epsilon=1e-5,
                bos_token_id=VOCAB - 1,
                eos_token_id=VOCAB - 1,
            )
        )
        hf.load_state_dict(_tensors(tmp_path), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf.eval()(ids).logits, rtol=1e-5, atol=2e-5)
