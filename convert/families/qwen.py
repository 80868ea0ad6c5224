"""Qwen v1 (`QWenLMHeadModel`, model_type "qwen"): published with its checkpoints rather than in
transformers, read as its modeling_qwen.py computes."""

from __future__ import annotations

from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm, Rotary

from ..errors import ConvertError
from ..hf import ConfigReader
from ..tables import Table, layer_rules, linear, norm, outer, split_heads, stack
from .common import REQUIRED, Family, constant, fuse_thirds, uniform_config


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    """Qwen v1 as its modeling_qwen.py computes. `use_logn_attn` and `use_dynamic_ntk` act only
    on positions past `seq_length`; under the streaming contract a query's position is its
    in-cache position L = min(t, K) (t in dense mode), so with K <= seq_length neither ever
    acts. jaxsink refuses streams whose positions could pass seq_length for such a model (see
    `ModelConfig.position_limit`)."""
    num_heads, hidden = r.take("num_attention_heads"), r.take("hidden_size")
    head_dim = r.take("kv_channels") or hidden // num_heads
    if head_dim * num_heads != hidden:
        raise ConvertError(f"kv_channels {head_dim} x {num_heads} heads != hidden_size {hidden}")
    dim = int(head_dim * float(r.take("rotary_pct")))
    if r.take("use_cache_quantization"):
        raise ConvertError("use_cache_quantization: a quantized KV cache is not supported")
    seq_length = r.take("seq_length")
    limited = bool(r.take("use_logn_attn")) | bool(r.take("use_dynamic_ntk"))
    biased = not r.take("no_bias")
    attention = Attention(
        num_heads,
        num_heads,
        head_dim,
        Rotary(float(r.take("rotary_emb_base")), dim),
        head_dim**-0.5,
        qkv_bias=True,
        out_bias=biased,
    )
    norm = Norm("rms", float(r.take("layer_norm_epsilon")))
    mlp = Mlp(r.take("intermediate_size") // 2, "silu", gated=True, bias=biased)
    r.ignore(*_IGNORED)
    return uniform_config(
        arch,
        r,
        LayerSpec(attention, mlp, norm),
        r.take("num_hidden_layers"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=seq_length,
        position_limit=seq_length if limited else None,
    )


# Keys modeling_qwen.py does not read, or that choose only precision or a kernel.
_IGNORED = (
    "scale_attn_weights",
    "max_position_embeddings",
    "rope_theta",
    "onnx_safe",
    "padded_vocab_size",
    "params_dtype",
    "bf16",
    "fp16",
    "fp32",
    "use_flash_attn",
    "softmax_in_fp32",
    "use_cache_kernel",
    "emb_dropout_prob",
    "attn_dropout_prob",
    "tokenizer_type",
    "auto_map",
)

QWEN = Table(
    rules=(
        *outer("transformer.wte", "transformer.ln_f"),
        *layer_rules(
            "transformer.h.{i}",
            {
                **norm("norm", "ln_1"),
                **norm("mlp_norm", "ln_2"),
                **linear("attn.qkv", "attn.c_attn", fuse_thirds, fuse_thirds),
                **linear("attn.out", "attn.c_proj", split_heads),
                "mlp.up": (("mlp.w2.weight", "mlp.w1.weight"), stack),  # w2 is the gate
                "mlp.up_bias": (("mlp.w2.bias", "mlp.w1.bias"), stack),
                **linear("mlp.down", "mlp.c_proj"),
            },
        ),
    ),
    ignored_suffixes=("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias"),
)

FAMILIES = {
    "qwen": Family(
        (*REQUIRED, "intermediate_size", "seq_length"),
        {
            "kv_channels": None,
            "rotary_pct": 1.0,
            "rotary_emb_base": 10000.0,
            "layer_norm_epsilon": 1e-6,
            "no_bias": True,
            "tie_word_embeddings": False,
            "use_logn_attn": True,
            "use_dynamic_ntk": True,
        },
        _read,
        constant(QWEN),
    ),
}
