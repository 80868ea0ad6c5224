"""GPT-J: interleaved partial rotary, one LayerNorm shared by parallel attention and MLP."""

from __future__ import annotations

from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm, Rotary

from ..hf import ConfigReader
from ..tables import Table, fuse_qkv, layer_rules, linear, norm, outer, split_heads
from .common import GPT2_REQUIRED, Family, constant, uniform_config


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    hidden, num_heads = r.take("n_embd"), r.take("n_head")
    head_dim = hidden // num_heads
    rotary_dim = r.take("rotary_dim") or head_dim
    attention = Attention(
        num_heads,
        num_heads,
        head_dim,
        Rotary(10000.0, rotary_dim, interleaved=True),  # GPT-J's fixed base
        head_dim**-0.5,
    )
    norm = Norm("layer", float(r.take("layer_norm_epsilon")), bias=True)
    size = r.take("n_inner") or 4 * hidden
    mlp = Mlp(size, r.take("activation_function"), gated=False, bias=True)
    r.ignore("embd_pdrop", "attn_pdrop", "resid_pdrop")
    return uniform_config(
        arch,
        r,
        LayerSpec(attention, mlp, norm, "parallel_shared"),
        r.take("n_layer"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("n_positions"),
        lm_head_bias=True,
    )


GPTJ = Table(
    rules=(
        *outer("transformer.wte", "transformer.ln_f"),
        *layer_rules(
            "transformer.h.{i}",
            {
                **norm("norm", "ln_1"),
                "attn.qkv": (tuple(f"attn.{p}_proj.weight" for p in "qkv"), fuse_qkv),
                **linear("attn.out", "attn.out_proj", split_heads),
                **linear("mlp.up", "mlp.fc_in"),
                **linear("mlp.down", "mlp.fc_out"),
            },
        ),
    ),
    ignored_suffixes=("attn.bias", "attn.masked_bias"),
)

FAMILIES = {
    "gptj": Family(
        GPT2_REQUIRED,
        {
            "n_positions": 2048,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": False,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        },
        _read,
        constant(GPTJ),
    ),
}
