"""Every supported Hugging Face architecture: its config keys read into a `ModelConfig` (one
`LayerSpec` per layer) and the name table of its tensors.

A family's reader takes each key it understands from a `ConfigReader`; whatever is left when it
returns is refused by name (`config_from_hf`), so a key that could change the model is never
silently ignored. Qwen v1 (`qwen`) and BTLM (`btlm`) ship their modeling code with their
checkpoints rather than in transformers; they are read as that published code computes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from jaxsink.config import Alibi, Attention, LayerSpec, Mlp, ModelConfig, Norm, Rotary

from .errors import ConvertError
from .hf import ConfigReader, RopeSpec, check_sliding_window, read_rope
from .tables import (
    LLAMA,
    Table,
    fuse_qkv,
    identity,
    layer_rules,
    linear,
    llama_attention,
    norm,
    outer,
    split_heads,
    stack,
)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face `model_type` converts.

    required: keys without which the config means nothing; defaults: transformers' values for
    keys a config.json may omit (its config class fills them the same way); read: the reader;
    table: the tensor names of a config of this family.
    """

    required: tuple[str, ...]
    defaults: dict[str, Any]
    read: Callable[[str, ConfigReader], ModelConfig]
    table: Callable[[ModelConfig], Table]


# --- layout transforms beyond the generic ones ---------------------------------------------


def fuse_thirds(w: np.ndarray, shape) -> np.ndarray:
    """One [3 * N * H, ...] projection whose output thirds are q, k, v (MPT, Qwen v1) -> the
    fused per-kv-head layout [N, 3, H, ...]."""
    q, k, v = np.split(w, 3, axis=0)
    return fuse_qkv(q, k, v, shape)


def conv_thirds(w: np.ndarray, shape) -> np.ndarray:
    """A GPT-2 Conv1D qkv weight [D, 3 * N * H] (input-major) -> [N, 3, H, D]."""
    return fuse_thirds(w.T, shape)


def conv_out(w: np.ndarray, shape) -> np.ndarray:
    """A GPT-2 Conv1D output projection [N * H, D] (input-major) -> [D, N, H]."""
    return w.T.reshape(shape)


def transposed(w: np.ndarray, shape) -> np.ndarray:
    """A GPT-2 Conv1D weight [in, out] -> [out, in]."""
    return w.T


def conv_gate_up(gate: np.ndarray, up: np.ndarray, shape) -> np.ndarray:
    """Conv1D gate and up weights [D, F] -> [2, F, D]."""
    return np.stack([gate.T, up.T])


def tile_heads(w: np.ndarray, shape) -> np.ndarray:
    """One qk-norm row [H] shared by every head -> one row per head [N, H]."""
    return np.broadcast_to(w, shape).copy()


# --- shared pieces -------------------------------------------------------------------------


def _rotary(rope: RopeSpec, head_dim: int, partial: float | None, interleaved=False) -> Rotary:
    """The rotary of a head: the config's fraction of it, as transformers rounds it."""
    fraction = rope.partial if rope.partial is not None else partial
    dim = head_dim if fraction is None else int(head_dim * fraction)
    if dim % 2:
        raise ConvertError(f"rotary dim {dim} (head_dim {head_dim} x {fraction}) is odd")
    return Rotary(rope.theta, dim, interleaved, rope.scaling)


def _partial(r: ConfigReader, rope: RopeSpec, legacy_key: str, default: float) -> float:
    """The rotated fraction: `rope_parameters.partial_rotary_factor` (5.x) or a 4.x top-level
    key; they must agree if both are given."""
    legacy = r.d.pop(legacy_key, None)
    if legacy is not None and rope.partial is not None and float(legacy) != rope.partial:
        raise ConvertError(f"{legacy_key} {legacy} disagrees with rope_parameters")
    if rope.partial is not None:
        return rope.partial
    return default if legacy is None else float(legacy)


def _uniform(
    arch: str, r: ConfigReader, layer: LayerSpec, num_layers: int, final_norm: Norm, **model
) -> ModelConfig:
    """A model whose layers are all `layer`."""
    return ModelConfig(
        architecture=arch,
        vocab_size=r.take("vocab_size"),
        hidden_size=model.pop("hidden_size"),
        layers=(layer,) * num_layers,
        final_norm=final_norm,
        **model,
    )


def _require(r: ConfigReader, key: str, allowed: tuple, what: str) -> Any:
    """A key that must hold one of `allowed` values, else a refusal naming `what`."""
    value = r.take(key)
    if value not in allowed:
        raise ConvertError(f"{key} = {value!r}: {what} is not supported")
    return value


def bloom_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes of the ALiBi paper, as Bloom, Falcon and BTLM compute them."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** (2 * i + 1) for i in range(min(closest, num_heads - closest))]
    return slopes


def mpt_slopes(num_heads: int, bias_max: float) -> list[float]:
    """MPT's ALiBi slopes (`alibi_bias_max` spreads them)."""
    n = 2 ** math.ceil(math.log2(num_heads))
    slopes = [1.0 / 2 ** ((i + 1) * bias_max / n) for i in range(n)]
    if n != num_heads:
        slopes = (slopes[1::2] + slopes[::2])[:num_heads]
    return slopes


def _constant(table: Table) -> Callable[[ModelConfig], Table]:
    return lambda cfg: table


# --- Llama, Mistral, Qwen2, Yi, Gemma ------------------------------------------------------

_LLAMA_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_LLAMA_REQUIRED = (*_REQUIRED, "intermediate_size")


def _llama(arch: str, r: ConfigReader) -> ModelConfig:
    """Llama and the families that share its layout (Mistral, Qwen2, Yi; Gemma's norms and
    embedding scale)."""
    num_heads, hidden = r.take("num_attention_heads"), r.take("hidden_size")
    num_layers, max_pos = r.take("num_hidden_layers"), r.take("max_position_embeddings")
    rope = read_rope(r.d, r.defaults["rope_theta"])
    check_sliding_window(arch, r.d, num_layers, max_pos)
    if arch == "llama" and r.take("pretraining_tp", 1) != 1:
        raise ConvertError("pretraining_tp other than 1 is not supported")
    if r.take("rope_interleaved", False):  # nanotron's flag; transformers ignores it
        raise ConvertError("rope_interleaved true: the weights' rotary layout is ambiguous")
    biased = r.take("attention_bias") if arch in ("llama", "gemma") else False
    mlp_bias = r.take("mlp_bias") if arch == "llama" else False
    head_dim = r.take("head_dim") or hidden // num_heads
    act = r.take("hidden_act")
    gemma = arch == "gemma"
    if gemma:
        _require(r, "use_bidirectional_attention", (None, False), "bidirectional attention")
        act = r.take("hidden_activation") or ("gelu_pytorch_tanh" if act == "gelu" else act)
    attention = Attention(
        num_heads=num_heads,
        num_kv_heads=r.take("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        position=_rotary(rope, head_dim, None),
        query_scale=head_dim**-0.5,
        qkv_bias=arch == "qwen2" or biased,
        out_bias=biased,
    )
    norm = Norm("rms_plus_one" if gemma else "rms", float(r.take("rms_norm_eps")))
    mlp = Mlp(r.take("intermediate_size"), act, gated=True, bias=mlp_bias)
    return _uniform(
        arch,
        r,
        LayerSpec(attention, mlp, norm),
        num_layers,
        norm,
        hidden_size=hidden,
        max_position_embeddings=max_pos,
        tie_embeddings=bool(r.take("tie_word_embeddings")),
        embed_scale=hidden**0.5 if gemma else 1.0,
    )


# --- GPT-NeoX (Pythia) ----------------------------------------------------------------------


def _gpt_neox(arch: str, r: ConfigReader) -> ModelConfig:
    num_heads, hidden = r.take("num_attention_heads"), r.take("hidden_size")
    rope = read_rope(r.d, float(r.d.pop("rotary_emb_base", None) or 10000.0))
    head_dim = hidden // num_heads
    partial = _partial(r, rope, "rotary_pct", 0.25)
    biased = bool(r.take("attention_bias"))
    attention = Attention(
        num_heads,
        num_heads,
        head_dim,
        _rotary(rope, head_dim, partial),
        head_dim**-0.5,
        qkv_bias=biased,
        out_bias=biased,
    )
    norm = Norm("layer", float(r.take("layer_norm_eps")), bias=True)
    mlp = Mlp(r.take("intermediate_size"), r.take("hidden_act"), gated=False, bias=True)
    residual = "parallel" if r.take("use_parallel_residual") else "sequential"
    r.ignore("classifier_dropout", "hidden_dropout")
    return _uniform(
        arch,
        r,
        LayerSpec(attention, mlp, norm, residual),
        r.take("num_hidden_layers"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("max_position_embeddings"),
        tie_embeddings=bool(r.take("tie_word_embeddings")),
    )


GPT_NEOX = Table(
    rules=(
        *outer("gpt_neox.embed_in", "gpt_neox.final_layer_norm"),
        *layer_rules(
            "gpt_neox.layers.{i}",
            {
                **norm("norm", "input_layernorm"),
                **norm("mlp_norm", "post_attention_layernorm"),
                # rows per head: [N, 3 (q, k, v), H]: already [K = N, G + 2 = 3, H]
                **linear("attn.qkv", "attention.query_key_value", split_heads, split_heads),
                **linear("attn.out", "attention.dense", split_heads),
                **linear("mlp.up", "mlp.dense_h_to_4h"),
                **linear("mlp.down", "mlp.dense_4h_to_h"),
            },
        ),
    ),
    ignored_suffixes=("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias"),
    aliases=(("embed_out.weight", "lm_head.weight"),),
    tied_copy=("lm_head.weight", "gpt_neox.embed_in.weight"),
)


# --- GPT-J ----------------------------------------------------------------------------------


def _gptj(arch: str, r: ConfigReader) -> ModelConfig:
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
    return _uniform(
        arch,
        r,
        LayerSpec(attention, mlp, norm, "parallel_shared"),
        r.take("n_layer"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("n_positions"),
        tie_embeddings=bool(r.take("tie_word_embeddings")),
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


# --- Falcon ---------------------------------------------------------------------------------


def _falcon(arch: str, r: ConfigReader) -> ModelConfig:
    hidden = r.take("hidden_size")
    num_heads = r.take("n_head") or r.take("num_attention_heads")  # older configs: n_*
    num_layers = r.take("n_layer") or r.take("num_hidden_layers")
    head_dim = hidden // num_heads
    new = bool(r.take("new_decoder_architecture"))
    multi_query = bool(r.take("multi_query"))
    kv_heads = r.take("n_head_kv") or r.take("num_kv_heads")
    if not new:  # the RW layout: one shared kv head, or plain multi-head
        kv_heads = 1 if multi_query else num_heads
    kv_heads = kv_heads or num_heads
    parallel = bool(r.take("parallel_attn"))
    n_ln = r.take("num_ln_in_parallel_attn")
    if new and n_ln is None:
        n_ln = 2
    if r.take("apply_residual_connection_post_layernorm", False):
        raise ConvertError("apply_residual_connection_post_layernorm is not supported")
    rope = read_rope(r.d, r.defaults["rope_theta"])
    if r.take("alibi"):
        # Falcon's code rounds the slopes to bfloat16 and scales the bias with q . k.
        slopes = np.asarray(bloom_slopes(num_heads), ml_dtypes.bfloat16).astype(np.float64)
        position = Alibi(tuple(float(s) * head_dim**-0.5 for s in slopes))
    else:
        position = _rotary(rope, head_dim, None)
    biased = bool(r.take("bias"))
    attention = Attention(num_heads, kv_heads, head_dim, position, head_dim**-0.5, biased, biased)
    if new and n_ln == 2:
        residual = "parallel"
    elif (new and n_ln == 1 and parallel) or (not new and parallel):
        residual = "parallel_shared"
    elif not new:
        residual = "sequential"
    else:
        raise ConvertError("new_decoder_architecture with one norm and no parallel_attn")
    norm = Norm("layer", float(r.take("layer_norm_epsilon")), bias=True)
    size = r.take("ffn_hidden_size") or 4 * hidden
    mlp = Mlp(size, r.take("activation"), gated=False, bias=biased)
    r.ignore("hidden_dropout", "attention_dropout")
    return _uniform(
        arch,
        r,
        LayerSpec(attention, mlp, norm, residual),
        num_layers,
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("max_position_embeddings"),
        tie_embeddings=bool(r.take("tie_word_embeddings")),
    )


def _falcon_table(cfg: ModelConfig) -> Table:
    """Falcon names its norms after the residual kind: two parallel ones `ln_attn`/`ln_mlp`."""
    two = cfg.layers[0].residual == "parallel"
    attn_norm, mlp_norm = (
        ("ln_attn", "ln_mlp") if two else ("input_layernorm", "post_attention_layernorm")
    )
    return Table(
        rules=(
            *outer("transformer.word_embeddings", "transformer.ln_f"),
            *layer_rules(
                "transformer.h.{i}",
                {
                    **norm("norm", attn_norm),
                    **norm("mlp_norm", mlp_norm),
                    # [K, G + 2, H] (grouped), [1, N + 2, H] (multi-query) or [N, 3, H] rows:
                    # each already the fused layout
                    **linear(
                        "attn.qkv", "self_attention.query_key_value", split_heads, split_heads
                    ),
                    **linear("attn.out", "self_attention.dense", split_heads),
                    **linear("mlp.up", "mlp.dense_h_to_4h"),
                    **linear("mlp.down", "mlp.dense_4h_to_h"),
                },
            ),
        ),
        ignored_suffixes=("rotary_emb.inv_freq",),
        tied_copy=("lm_head.weight", "transformer.word_embeddings.weight"),
    )


# --- MPT ------------------------------------------------------------------------------------

# Keys of MPT's nested `attn_config` that a saved transformers config carries and that change
# nothing (the PretrainedConfig fields of MptAttentionConfig, dropout, the kernel choice).
_MPT_ATTN_HARMLESS = {"attn_pdrop", "attn_impl", "_name_or_path", "model_type"}


def _mpt(arch: str, r: ConfigReader) -> ModelConfig:
    hidden, num_heads = r.take("d_model"), r.take("n_heads")
    head_dim = hidden // num_heads
    attn = ConfigReader(r.take("attn_config") or {}, _MPT_ATTN_DEFAULTS)
    _require(attn, "attn_type", ("multihead_attention",), "MPT attention other than multi-head")
    _require(attn, "alibi", (True,), "MPT without ALiBi (learned positions)")
    for key, what in (
        ("prefix_lm", "prefix-LM attention"),
        ("qk_ln", "qk LayerNorm (transformers' MPT lacks it)"),
        ("attn_uses_sequence_id", "sequence-id masking"),
    ):
        _require(attn, key, (False, None), what)
    scale = attn.take("softmax_scale") or head_dim**-0.5
    clip = attn.take("clip_qkv")
    slopes = mpt_slopes(num_heads, float(attn.take("alibi_bias_max")))
    attn.ignore(*_MPT_ATTN_HARMLESS)
    attn.check_all_read(f"{arch}'s attn_config")
    attention = Attention(
        num_heads, num_heads, head_dim, Alibi(tuple(slopes)), scale, clip_qkv=clip or None
    )
    _require(r, "no_bias", (True,), "MPT with biases")
    _require(r, "logit_scale", (None,), "an MPT logit_scale")
    _require(r, "embedding_fraction", (1.0,), "an MPT embedding_fraction other than 1")
    _require(r, "norm_type", ("low_precision_layernorm", "layernorm"), "this MPT norm_type")
    norm = Norm("layer", float(r.take("layer_norm_epsilon")))
    mlp = Mlp(r.take("expansion_ratio") * hidden, "gelu", gated=False)
    r.ignore("resid_pdrop", "emb_pdrop", "init_device", "learned_pos_emb")
    return _uniform(
        arch,
        r,
        LayerSpec(attention, mlp, norm),
        r.take("n_layers"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("max_seq_len"),
        tie_embeddings=bool(r.take("tie_word_embeddings")),
    )


_MPT_ATTN_DEFAULTS = {"attn_type": "multihead_attention", "alibi": True, "alibi_bias_max": 8}

MPT = Table(
    rules=(
        *outer("transformer.wte", "transformer.norm_f"),
        *layer_rules(
            "transformer.blocks.{i}",
            {
                **norm("norm", "norm_1"),
                **norm("mlp_norm", "norm_2"),
                **linear("attn.qkv", "attn.Wqkv", fuse_thirds, fuse_thirds),
                **linear("attn.out", "attn.out_proj", split_heads),
                **linear("mlp.up", "ffn.up_proj"),
                **linear("mlp.down", "ffn.down_proj"),
            },
        ),
    ),
    tied_copy=("lm_head.weight", "transformer.wte.weight"),
)


# --- StableLM -------------------------------------------------------------------------------


def _stablelm(arch: str, r: ConfigReader) -> ModelConfig:
    num_heads, hidden = r.take("num_attention_heads"), r.take("hidden_size")
    head_dim = hidden // num_heads
    rope = read_rope(r.d, r.defaults["rope_theta"])
    partial = _partial(r, rope, "partial_rotary_factor", 0.25)
    eps = float(r.take("layer_norm_eps"))
    attention = Attention(
        num_heads,
        r.take("num_key_value_heads") or num_heads,
        head_dim,
        _rotary(rope, head_dim, partial),
        head_dim**-0.5,
        qkv_bias=bool(r.take("use_qkv_bias")),
        qk_norm=Norm("layer", eps) if r.take("qk_layernorm") else None,
    )
    norm = Norm("layer", eps, bias=True)
    mlp = Mlp(r.take("intermediate_size"), r.take("hidden_act"))
    residual = "parallel_shared" if r.take("use_parallel_residual") else "sequential"
    r.ignore("hidden_dropout")
    return _uniform(
        arch,
        r,
        LayerSpec(attention, mlp, norm, residual),
        r.take("num_hidden_layers"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("max_position_embeddings"),
        tie_embeddings=bool(r.take("tie_word_embeddings")),
    )


def _stablelm_table(cfg: ModelConfig) -> Table:
    """Llama's names with LayerNorm biases, and one qk-norm module per head."""
    a = cfg.layers[0].attention
    attn = "self_attn"
    heads = {
        "attn.q_norm.scale": (
            tuple(f"{attn}.q_layernorm.norms.{h}.weight" for h in range(a.num_heads)),
            stack,
        ),
        "attn.k_norm.scale": (
            tuple(f"{attn}.k_layernorm.norms.{h}.weight" for h in range(a.num_kv_heads)),
            stack,
        ),
    }
    return Table(
        rules=(*LLAMA.rules, *layer_rules("model.layers.{i}", heads)),
        ignored_suffixes=LLAMA.ignored_suffixes,
        tied_copy=LLAMA.tied_copy,
    )


# --- Phi (phi-1, phi-1.5, phi-2) ------------------------------------------------------------


def _phi(arch: str, r: ConfigReader) -> ModelConfig:
    num_heads, hidden = r.take("num_attention_heads"), r.take("hidden_size")
    head_dim = hidden // num_heads
    rope = read_rope(r.d, r.defaults["rope_theta"])
    partial = _partial(r, rope, "partial_rotary_factor", 0.5)
    eps = float(r.take("layer_norm_eps"))
    attention = Attention(
        num_heads,
        r.take("num_key_value_heads") or num_heads,
        head_dim,
        _rotary(rope, head_dim, partial),
        head_dim**-0.5,
        qkv_bias=True,
        out_bias=True,
        qk_norm=Norm("layer", eps, bias=True) if r.take("qk_layernorm") else None,
    )
    norm = Norm("layer", eps, bias=True)
    mlp = Mlp(r.take("intermediate_size"), r.take("hidden_act"), gated=False, bias=True)
    r.ignore("resid_pdrop", "embd_pdrop")
    return _uniform(
        arch,
        r,
        LayerSpec(attention, mlp, norm, "parallel_shared"),
        r.take("num_hidden_layers"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("max_position_embeddings"),
        tie_embeddings=bool(r.take("tie_word_embeddings")),
        lm_head_bias=True,
    )


PHI = Table(
    rules=(
        *outer("model.embed_tokens", "model.final_layernorm"),
        *layer_rules(
            "model.layers.{i}",
            {
                **norm("norm", "input_layernorm"),
                **llama_attention("self_attn"),
                **linear("attn.out", "self_attn.dense", split_heads),
                "attn.q_norm.scale": (("self_attn.q_layernorm.weight",), tile_heads),
                "attn.q_norm.bias": (("self_attn.q_layernorm.bias",), tile_heads),
                "attn.k_norm.scale": (("self_attn.k_layernorm.weight",), tile_heads),
                "attn.k_norm.bias": (("self_attn.k_layernorm.bias",), tile_heads),
                **linear("mlp.up", "mlp.fc1"),
                **linear("mlp.down", "mlp.fc2"),
            },
        ),
    ),
    ignored_suffixes=("rotary_emb.inv_freq",),
    tied_copy=("lm_head.weight", "model.embed_tokens.weight"),
)


# --- Qwen v1 (QWenLMHeadModel, published code) ----------------------------------------------


def _qwen(arch: str, r: ConfigReader) -> ModelConfig:
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
    r.ignore(*_QWEN_IGNORED)
    return _uniform(
        arch,
        r,
        LayerSpec(attention, mlp, norm),
        r.take("num_hidden_layers"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=seq_length,
        tie_embeddings=bool(r.take("tie_word_embeddings")),
        position_limit=seq_length if limited else None,
    )


# Keys modeling_qwen.py does not read, or that choose only precision or a kernel.
_QWEN_IGNORED = (
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


# --- BTLM (BTLMLMHeadModel, published code) -------------------------------------------------


def _btlm(arch: str, r: ConfigReader) -> ModelConfig:
    """BTLM as its modeling_btlm.py computes: GPT-2 layout, ALiBi, SwiGLU and muP scalings."""
    hidden, num_heads = r.take("n_embd"), r.take("n_head")
    head_dim = hidden // num_heads
    _require(r, "position_embedding_type", ("alibi",), "BTLM with learned positions")
    scaling = r.take("alibi_scaling")
    divisor = 1.0
    if scaling is not None:
        if set(scaling) - {"type", "factor"} or scaling.get("type", "linear") != "linear":
            raise ConvertError(
                f"alibi_scaling {scaling}: only a fixed linear factor is supported (a "
                "train_seq_len rescales the bias with the total length at every step)"
            )
        divisor = float(scaling["factor"])
    slopes = tuple(s / divisor for s in bloom_slopes(num_heads))
    power = 1.0 if r.take("mup_scale_qk_dot_by_d") else 0.5
    scale = head_dim**-power if r.take("scale_attn_weights") else 1.0
    by_layer = bool(r.take("scale_attn_by_inverse_layer_idx"))
    act = r.take("activation_function")
    gated = act == "swiglu"
    mlp = Mlp(r.take("n_inner") or 4 * hidden, "silu" if gated else act, gated=gated, bias=True)
    norm = Norm("layer", float(r.take("layer_norm_epsilon")), bias=True)

    def layer(i: int) -> LayerSpec:
        s = scale / (i + 1) if by_layer else scale
        attention = Attention(num_heads, num_heads, head_dim, Alibi(slopes), s, True, True)
        return LayerSpec(attention, mlp, norm)

    r.ignore("attn_pdrop", "embd_pdrop", "resid_pdrop", "reorder_and_upcast_attn", "auto_map")
    return ModelConfig(
        architecture=arch,
        vocab_size=r.take("vocab_size"),
        hidden_size=hidden,
        layers=tuple(layer(i) for i in range(r.take("n_layer"))),
        final_norm=norm,
        max_position_embeddings=r.take("n_positions"),
        tie_embeddings=bool(r.take("tie_word_embeddings")),
        embed_scale=float(r.take("mup_embeddings_scale")),
        logit_scale=float(r.take("mup_output_alpha")) * float(r.take("mup_width_scale")),
    )


def _btlm_table(cfg: ModelConfig) -> Table:
    """GPT-2 names and Conv1D [in, out] weights; the stored ALiBi slopes must be the standard
    ones the config implies."""
    n = cfg.layers[0].attention.num_heads
    gated = cfg.layers[0].mlp.gated
    up = {
        "mlp.up": (("mlp.c_fc2.weight", "mlp.c_fc.weight"), conv_gate_up)  # c_fc2 is the gate
        if gated
        else (("mlp.c_fc.weight",), transposed),
        "mlp.up_bias": (("mlp.c_fc2.bias", "mlp.c_fc.bias"), stack)
        if gated
        else (("mlp.c_fc.bias",), identity),
    }
    slopes = np.asarray(bloom_slopes(n), np.float32)[:, None]
    return Table(
        rules=(
            *outer("transformer.wte", "transformer.ln_f"),
            *layer_rules(
                "transformer.h.{i}",
                {
                    **norm("norm", "ln_1"),
                    **norm("mlp_norm", "ln_2"),
                    **linear("attn.qkv", "attn.c_attn", conv_thirds, fuse_thirds),
                    **linear("attn.out", "attn.c_proj", conv_out),
                    **up,
                    **linear("mlp.down", "mlp.c_proj", transposed),
                },
            ),
        ),
        ignored_suffixes=("attn.bias", "attn.masked_bias"),
        tied_copy=("lm_head.weight", "transformer.wte.weight"),
        constants=(("transformer.relative_pe.slopes", slopes),),
    )


FAMILIES: dict[str, Family] = {
    "llama": Family(
        _LLAMA_REQUIRED,
        _LLAMA_DEFAULTS | {"max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2},
        _llama,
        _constant(LLAMA),
    ),
    "mistral": Family(
        _LLAMA_REQUIRED,
        _LLAMA_DEFAULTS | {"max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2},
        _llama,
        _constant(LLAMA),
    ),
    "qwen2": Family(
        _LLAMA_REQUIRED,
        _LLAMA_DEFAULTS | {"max_position_embeddings": 32768},
        _llama,
        _constant(LLAMA),
    ),
    "gemma": Family(
        _LLAMA_REQUIRED,
        _LLAMA_DEFAULTS
        | {
            "hidden_act": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192,
            "tie_word_embeddings": True,
            "head_dim": 256,
            "bos_token_id": 2,
            "eos_token_id": 1,
        },
        _llama,
        _constant(LLAMA),
    ),
    "gpt_neox": Family(
        (*_REQUIRED, "intermediate_size"),
        {
            "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-5,
            "hidden_act": "gelu",
            "use_parallel_residual": True,
            "attention_bias": True,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        _gpt_neox,
        _constant(GPT_NEOX),
    ),
    "gptj": Family(
        ("vocab_size", "n_embd", "n_layer", "n_head"),
        {
            "n_positions": 2048,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": False,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
        },
        _gptj,
        _constant(GPTJ),
    ),
    "falcon": Family(
        ("vocab_size", "hidden_size"),
        {
            "num_hidden_layers": 32,
            "num_attention_heads": 71,
            "layer_norm_epsilon": 1e-5,
            "new_decoder_architecture": False,
            "multi_query": True,
            "parallel_attn": True,
            "alibi": False,
            "bias": False,
            "max_position_embeddings": 2048,
            "rope_theta": 10000.0,
            "activation": "gelu",
            "tie_word_embeddings": True,
            "bos_token_id": 11,
            "eos_token_id": 11,
        },
        _falcon,
        _falcon_table,
    ),
    "mpt": Family(
        ("vocab_size", "d_model", "n_heads", "n_layers"),
        {
            "expansion_ratio": 4,
            "max_seq_len": 2048,
            "layer_norm_epsilon": 1e-5,
            "no_bias": True,
            "embedding_fraction": 1.0,
            "norm_type": "low_precision_layernorm",
            "tie_word_embeddings": True,
        },
        _mpt,
        _constant(MPT),
    ),
    "stablelm": Family(
        _LLAMA_REQUIRED,
        {
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "layer_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_theta": 10000.0,
            "use_qkv_bias": False,
            "qk_layernorm": False,
            "use_parallel_residual": False,
            "num_key_value_heads": 32,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
        _stablelm,
        _stablelm_table,
    ),
    "phi": Family(
        _LLAMA_REQUIRED,
        {
            "hidden_act": "gelu_new",
            "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "rope_theta": 10000.0,
            "qk_layernorm": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        _phi,
        _constant(PHI),
    ),
    "qwen": Family(
        (*_REQUIRED, "intermediate_size", "seq_length"),
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
        _qwen,
        _constant(QWEN),
    ),
    "btlm": Family(
        ("vocab_size", "n_embd", "n_layer", "n_head"),
        {
            "n_positions": 1024,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "position_embedding_type": "learned",
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "mup_scale_qk_dot_by_d": False,
            "mup_embeddings_scale": 1.0,
            "mup_output_alpha": 1.0,
            "mup_width_scale": 1.0,
            "tie_word_embeddings": True,
        },
        _btlm,
        _btlm_table,
    ),
}
