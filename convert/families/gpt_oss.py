"""gpt-oss: sliding and full layers, learned sink logits, YaRN, a biased router over experts
with a clamped SwiGLU; MXFP4 expert weights are dequantized at conversion."""

from __future__ import annotations

import numpy as np

from jaxsink.config import Attention, Experts, Mlp, ModelConfig, Norm

from .. import mxfp4
from ..errors import ConvertError
from ..hf import ConfigReader, read_rope
from ..tables import identity, linear, llama_attention, norm, packed, split_heads
from .common import (
    LLAMA_REQUIRED,
    MODERN,
    ROUTER_TRAINING,
    Family,
    constant,
    full_rotary,
    llama_table,
    model_config,
    native_windows,
    num_experts,
    read_heads,
    windowed_layers,
)

_ROPE = {  # what a config without a rope dict means
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


def _read(arch: str, r: ConfigReader) -> ModelConfig:
    """gpt-oss (the module's docstring); every other layer slides, the first sliding."""
    hidden, num_layers = r.take("hidden_size"), r.take("num_hidden_layers")
    max_pos = r.take("max_position_embeddings")
    num_heads, kv_heads, head_dim = read_heads(r, hidden)
    if "rope_parameters" not in r.d and "rope_scaling" not in r.d:
        r.d["rope_parameters"] = dict(_ROPE)
    rope = read_rope(r.d, r.defaults["rope_theta"], max_pos)
    quant = r.take("quantization_config")
    if quant is not None and quant.get("quant_method") != "mxfp4":
        raise ConvertError(f"quantization {quant.get('quant_method')!r}: only mxfp4 is supported")
    top_k = r.take("num_experts_per_tok")
    alias = r.d.pop("experts_per_token", None)
    if alias is not None and alias != top_k:
        raise ConvertError(f"experts_per_token {alias} disagrees with num_experts_per_tok {top_k}")
    biased = bool(r.take("attention_bias"))
    attention = Attention(
        num_heads,
        kv_heads,
        head_dim,
        full_rotary(rope, head_dim),
        head_dim**-0.5,
        qkv_bias=biased,
        out_bias=biased,
        learned_sinks=True,
    )
    experts = Experts(num_experts(r), top_k, normalize=True, router_bias=True)
    mlp = Mlp(
        r.take("intermediate_size"),
        "clamped_swiglu",
        bias=True,
        experts=experts,
        alpha=float(r.take("swiglu_alpha")),
        limit=float(r.take("swiglu_limit")),
    )
    norm = Norm("rms", float(r.take("rms_norm_eps")))
    slides = [(i + 1) % 2 != 0 for i in range(num_layers)]
    windows = native_windows(r, r.take("sliding_window"), slides, max_pos)
    r.ignore(*ROUTER_TRAINING, "hidden_act", "initial_context_length")
    layers = windowed_layers(attention, mlp, norm, windows)
    return model_config(arch, r, layers, norm, hidden_size=hidden, max_position_embeddings=max_pos)


def interleaved_gate_up(w: np.ndarray, shape) -> np.ndarray:
    """gpt-oss's fused experts [E, D, 2F], gate and up interleaved along 2F -> [E, 2, F, D]."""
    E, _, F, D = shape
    return w.reshape(E, D, F, 2).transpose(0, 3, 2, 1)


def interleaved_bias(w: np.ndarray, shape) -> np.ndarray:
    """[E, 2F], gate and up interleaved -> [E, 2, F]."""
    E, _, F = shape
    return w.reshape(E, F, 2).transpose(0, 2, 1)


def experts_transposed(w: np.ndarray, shape) -> np.ndarray:
    """Experts stored input-major [E, F, D] -> output-major [E, D, F]."""
    return w.transpose(0, 2, 1)


@packed
def mxfp4_gate_up(blocks: np.ndarray, scales: np.ndarray, shape) -> np.ndarray:
    """MXFP4 experts [E, 2F, D / 32, 16] + scales, rows interleaved gate / up -> [E, 2, F, D]."""
    E, _, F, D = shape
    w = mxfp4.dequantize(blocks, scales, name="gate_up_proj_blocks")  # [E, 2F, D]
    return w.reshape(E, F, 2, D).transpose(0, 2, 1, 3)


@packed
def mxfp4_down(blocks: np.ndarray, scales: np.ndarray, shape) -> np.ndarray:
    """MXFP4 experts [E, D, F / 32, 16] + scales -> [E, D, F] (already output-major)."""
    return mxfp4.dequantize(blocks, scales, name="down_proj_blocks")


GPT_OSS = llama_table(
    {
        **norm("norm", "input_layernorm"),
        **norm("mlp_norm", "post_attention_layernorm"),
        **llama_attention("self_attn"),
        **linear("attn.out", "self_attn.o_proj", split_heads),
        "attn.sinks": (("self_attn.sinks",), identity),
        **linear("mlp.router", "mlp.router"),
        "mlp.up": [
            (("mlp.experts.gate_up_proj",), interleaved_gate_up),
            (
                ("mlp.experts.gate_up_proj_blocks", "mlp.experts.gate_up_proj_scales"),
                mxfp4_gate_up,
            ),
        ],
        "mlp.up_bias": (("mlp.experts.gate_up_proj_bias",), interleaved_bias),
        "mlp.down": [
            (("mlp.experts.down_proj",), experts_transposed),
            (("mlp.experts.down_proj_blocks", "mlp.experts.down_proj_scales"), mxfp4_down),
        ],
        "mlp.down_bias": (("mlp.experts.down_proj_bias",), identity),
    }
)

FAMILIES = {
    "gpt_oss": Family(
        LLAMA_REQUIRED,
        MODERN
        | {
            "rope_theta": 150000.0,
            "head_dim": 64,
            "sliding_window": 128,
            "attention_bias": True,
            "num_experts": 128,
            "num_experts_per_tok": 4,
            "swiglu_alpha": 1.702,
            "swiglu_limit": 7.0,
            "max_position_embeddings": 131072,
        },
        _read,
        constant(GPT_OSS),
    ),
}
