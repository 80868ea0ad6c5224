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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxsink.config import Alibi, Attention, Experts, LayerSpec, Mlp, ModelConfig, Norm, Rotary

from . import mxfp4
from .errors import ConvertError
from .hf import (
    ConfigReader,
    RopeSpec,
    layer_windows,
    malformed_values,
    read_json,
    read_rope,
    refusal,
)
from .tables import (
    LLAMA,
    Rule,
    Table,
    fuse_qkv,
    identity,
    layer_rules,
    linear,
    llama_attention,
    norm,
    outer,
    packed,
    split_halves,
    split_heads,
    stack,
    stack_experts,
)


@dataclasses.dataclass(frozen=True)
class Family:
    """How one Hugging Face `model_type` converts.

    required: keys without which the config means nothing; defaults: transformers' values for
    keys a config.json may omit (its config class fills them the same way); read: the reader;
    table: the tensor names of a config of this family; widths: the config with the widths
    only the tensors tell truthfully read from their shapes (name -> shape), where the
    family's reference codes disagree with its config.
    """

    required: tuple[str, ...]
    defaults: dict[str, Any]
    read: Callable[[str, ConfigReader], ModelConfig]
    table: Callable[[ModelConfig], Table]
    widths: Callable[[ModelConfig, Mapping[str, tuple[int, ...]]], ModelConfig] = (
        lambda cfg, shapes: cfg
    )


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


def _model(arch: str, r: ConfigReader, layers, final_norm: Norm, **model) -> ModelConfig:
    """A model of the given layers."""
    return ModelConfig(
        architecture=arch,
        vocab_size=r.take("vocab_size"),
        hidden_size=model.pop("hidden_size"),
        layers=tuple(layers),
        final_norm=final_norm,
        **model,
    )


def _sliding(attention: Attention, window: int | None) -> Attention:
    """`attention` as a native sliding-window layer of `window` (None: full)."""
    return attention if window is None else dataclasses.replace(attention, sliding_window=window)


def _windows(arch: str, r: ConfigReader, num_layers: int, max_pos: int) -> tuple:
    """Each layer's native sliding window, as the family's transformers config derives it when
    the config gives no `layer_types`: Mistral, Mixtral, Phi-3, StarCoder2 and Qwen3-MoE slide
    every layer, Qwen2 / Qwen3 the layers from `max_window_layers` on, Gemma 2 and gpt-oss every
    other layer (the first sliding), Gemma 3 all but every `sliding_window_pattern`-th."""
    types = r.take("layer_types")
    if arch in ("qwen2", "qwen3", "qwen3_moe"):
        use = r.take("use_sliding_window", False)
        window = r.take("sliding_window")
        if not use:  # transformers drops the window unless use_sliding_window
            window = None
        first = r.take("max_window_layers", 28) if arch != "qwen3_moe" else 0
        if arch == "qwen3_moe":
            r.ignore("max_window_layers")  # Qwen3-MoE slides every layer when it slides
        every = [i >= first for i in range(num_layers)]
    else:
        window = r.take("sliding_window")
        if arch in ("gemma2", "gpt_oss"):
            every = [(i + 1) % 2 != 0 for i in range(num_layers)]
        elif arch == "gemma3_text":
            pattern = r.take("sliding_window_pattern", 6)
            r.ignore("_sliding_window_pattern")
            every = [(i + 1) % pattern != 0 for i in range(num_layers)]
        else:
            every = [True] * num_layers
    if types is None and window is not None:
        types = ["sliding_attention" if s else "full_attention" for s in every]
    return layer_windows(types, window, num_layers, max_pos)


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
# transformers' defaults shared by the families added since (each overrides its own)
_MODERN = {
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
}
_LLAMA_REQUIRED = (*_REQUIRED, "intermediate_size")


def _llama(arch: str, r: ConfigReader) -> ModelConfig:
    """Llama and the families that share its layout (Mistral, Qwen2, Yi; Gemma's norms and
    embedding scale)."""
    num_heads, hidden = r.take("num_attention_heads"), r.take("hidden_size")
    num_layers, max_pos = r.take("num_hidden_layers"), r.take("max_position_embeddings")
    rope = read_rope(r.d, r.defaults["rope_theta"], max_pos)
    windows = _windows(arch, r, num_layers, max_pos)
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
    return _model(
        arch,
        r,
        [LayerSpec(_sliding(attention, w), mlp, norm) for w in windows],
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
    r.derived("partial_rotary_factor", partial, "rotary_pct")  # transformers 4.x writes both
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
    r.derived(
        "num_key_value_heads", kv_heads, "multi_query, new_decoder_architecture and num_kv_heads"
    )
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
    # The width as MosaicML's code computes it; `_mpt_widths` replaces it by the weights'.
    mlp = Mlp(r.take("expansion_ratio") * hidden, "gelu", gated=False)
    r.ignore("resid_pdrop", "emb_pdrop", "init_device", "learned_pos_emb", "verbose")
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


def _mpt_widths(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> ModelConfig:
    """MPT's MLP width from its up projection's rows: transformers builds it 4 x d_model wide
    whatever `expansion_ratio` says, MosaicML's own code `expansion_ratio` x d_model wide, and
    both save the same config key, so the tensors are the only truth."""
    rows = {s[0] for n, s in shapes.items() if n.endswith("ffn.up_proj.weight") and s}
    if len(rows) != 1:  # none, or layers that differ: build_params names what is wrong
        return cfg
    width = rows.pop()
    layers = tuple(
        dataclasses.replace(layer, mlp=dataclasses.replace(layer.mlp, size=width))
        for layer in cfg.layers
    )
    return dataclasses.replace(cfg, layers=layers)


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


# --- today's families: Qwen3, Qwen3-MoE, Mixtral, SmolLM3, OLMo 2, StarCoder2, Phi-3, Gemma 2,
# Gemma 3, gpt-oss, Bloom ----------------------------------------------------------------------


def _heads(r: ConfigReader, hidden: int) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of a Llama-style config."""
    num_heads = r.take("num_attention_heads")
    head_dim = r.take("head_dim") or hidden // num_heads
    return num_heads, r.take("num_key_value_heads") or num_heads, head_dim


def _full_rotary(rope: RopeSpec, head_dim: int) -> Rotary:
    """Rotary over the whole head: these families' code ignores `partial_rotary_factor`."""
    return Rotary(rope.theta, head_dim, False, rope.scaling)


def _num_experts(r: ConfigReader) -> int:
    """`num_experts` (hub configs) or `num_local_experts` (saved by transformers 5)."""
    a, b = r.d.pop("num_experts", None), r.d.pop("num_local_experts", None)
    if a is not None and b is not None and a != b:
        raise ConvertError(f"num_experts {a} disagrees with num_local_experts {b}")
    value = a if a is not None else b
    return int(value if value is not None else r.defaults.get("num_experts", 0))


_ROUTER_TRAINING = ("router_aux_loss_coef", "output_router_logits", "router_jitter_noise")


def _llama_like(arch: str, r: ConfigReader) -> ModelConfig:
    """Qwen3, Qwen3-MoE, Mixtral, SmolLM3, OLMo 2 and StarCoder2: Llama's layer with each
    family's differences (qk-norm, experts, layers without rotary, post-norms, LayerNorms and
    biases, native sliding windows)."""
    hidden, num_layers = r.take("hidden_size"), r.take("num_hidden_layers")
    max_pos = r.take("max_position_embeddings")
    num_heads, kv_heads, head_dim = _heads(r, hidden)
    rope = read_rope(r.d, r.defaults["rope_theta"], max_pos)
    rotary = _full_rotary(rope, head_dim)
    starcoder = arch == "starcoder2"
    if starcoder:
        norm = Norm("layer", float(r.take("norm_epsilon")), bias=True)
        biased = mlp_bias = bool(r.take("use_bias"))
    else:
        norm = Norm("rms", float(r.take("rms_norm_eps")))
        biased = bool(r.take("attention_bias", False))
        mlp_bias = bool(r.take("mlp_bias", False))
    qk_norm = norm if arch in ("qwen3", "qwen3_moe", "olmo2") else None
    attention = Attention(
        num_heads,
        kv_heads,
        head_dim,
        rotary,
        head_dim**-0.5,
        qkv_bias=biased,
        out_bias=biased,
        qk_norm=qk_norm,
        qk_norm_scope="all" if arch == "olmo2" else "head",
    )
    act = r.take("hidden_act")
    dense = Mlp(r.take("intermediate_size"), act, gated=not starcoder, bias=mlp_bias)
    mlps = [dense] * num_layers
    if arch == "mixtral":
        experts = Experts(_num_experts(r), r.take("num_experts_per_tok"), normalize=True)
        mlps = [dataclasses.replace(dense, experts=experts)] * num_layers
    elif arch == "qwen3_moe":
        n = _num_experts(r)
        only = set(r.take("mlp_only_layers") or ())
        step = r.take("decoder_sparse_step")
        if n > 0:
            top_k, normalize = r.take("num_experts_per_tok"), bool(r.take("norm_topk_prob"))
            moe = Mlp(r.take("moe_intermediate_size"), act, experts=Experts(n, top_k, normalize))
            mlps = [
                moe if i not in only and (i + 1) % step == 0 else dense for i in range(num_layers)
            ]
    positions = [rotary] * num_layers
    if arch == "smollm3":
        positions, types = _smollm3_positions(r, rotary, num_layers)
        windows = layer_windows(types, r.take("sliding_window"), num_layers, max_pos)
    else:
        windows = _windows(arch, r, num_layers, max_pos)
    r.ignore(*_ROUTER_TRAINING, "residual_dropout", "embedding_dropout")
    layers = [
        LayerSpec(
            dataclasses.replace(attention, position=position, sliding_window=window),
            mlp,
            norm,
            norms="post" if arch == "olmo2" else "pre",
        )
        for position, window, mlp in zip(positions, windows, mlps, strict=True)
    ]
    return _model(
        arch,
        r,
        layers,
        norm,
        hidden_size=hidden,
        max_position_embeddings=max_pos,
        tie_embeddings=bool(r.take("tie_word_embeddings")),
    )


def _smollm3_positions(r: ConfigReader, rotary: Rotary, num_layers: int):
    """SmolLM3's `no_rope_layers` (1: rotary, 0: none; by default every
    `no_rope_layer_interval`-th layer has none) and its layer kinds (only rotary-free layers
    may slide, with `use_sliding_window`)."""
    interval = r.take("no_rope_layer_interval")
    uses = r.take("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(uses) != num_layers or set(uses) - {0, 1}:
        raise ConvertError(f"no_rope_layers must list 0 or 1 for {num_layers} layers")
    types = r.take("layer_types")
    if types is None and r.take("use_sliding_window"):
        types = ["full_attention" if use else "sliding_attention" for use in uses]
    else:
        r.ignore("use_sliding_window")
    return [rotary if use else None for use in uses], types


def _moe_rules(cfg: ModelConfig, prefixes: tuple[str, ...], router: str, names: tuple) -> dict:
    """The expert rules of a mixture (none for a dense model): router `{prefix}.{router}`, and
    the experts either per expert (`{prefix}.experts.{e}.{gate, up, down}.weight`, one prefix
    of `prefixes` each) or fused (`mlp.experts.gate_up_proj` [E, 2F, D], `down_proj` [E, D, F],
    as transformers 5 holds them)."""
    num = next((s.mlp.experts.num for s in cfg.layers if s.mlp.experts), 0)
    if not num:
        return {}
    gate, up, down = names

    def each(prefix, part):
        return tuple(f"{prefix}.experts.{e}.{part}.weight" for e in range(num))

    return {
        "mlp.router": [((f"{p}.{router}.weight",), identity) for p in prefixes],
        "mlp.up": [((*each(p, gate), *each(p, up)), stack_experts) for p in prefixes]
        + [(("mlp.experts.gate_up_proj",), split_halves)],
        "mlp.down": [(each(p, down), stack_experts) for p in prefixes]
        + [(("mlp.experts.down_proj",), identity)],
    }


def _llama_like_table(cfg: ModelConfig) -> Table:
    """Llama's names, plus each family's: qk-norms (one row per head, or one for all heads),
    post-norms (OLMo 2), StarCoder2's MLP, the experts of Mixtral and Qwen3-MoE."""
    arch = cfg.architecture
    layer = {
        **norm("norm", "input_layernorm"),
        **norm("mlp_norm", "post_attention_layernorm"),
        **llama_attention("self_attn"),
        **linear("attn.out", "self_attn.o_proj", split_heads),
        "mlp.up": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), stack),
        "mlp.up_bias": (("mlp.gate_proj.bias", "mlp.up_proj.bias"), stack),
        **linear("mlp.down", "mlp.down_proj"),
        # Qwen3: one row [H] for every head; OLMo 2: [N * H] over all heads
        "attn.q_norm.scale": (("self_attn.q_norm.weight",), split_heads_or_tile),
        "attn.k_norm.scale": (("self_attn.k_norm.weight",), split_heads_or_tile),
    }
    if arch == "olmo2":
        layer |= norm("post_attn_norm", "post_attention_layernorm")
        layer |= norm("post_mlp_norm", "post_feedforward_layernorm")
    if arch == "starcoder2":
        layer |= linear("mlp.up", "mlp.c_fc") | linear("mlp.down", "mlp.c_proj")
    if arch == "mixtral":
        layer |= _moe_rules(cfg, ("block_sparse_moe", "mlp"), "gate", ("w1", "w3", "w2"))
    if arch == "qwen3_moe":
        moe = _moe_rules(cfg, ("mlp",), "gate", ("gate_proj", "up_proj", "down_proj"))
        layer |= {k: [layer[k], *v] if k in layer else v for k, v in moe.items()}
    return Table(
        rules=(*outer("model.embed_tokens", "model.norm"), *layer_rules("model.layers.{i}", layer)),
        ignored_suffixes=LLAMA.ignored_suffixes,
        tied_copy=LLAMA.tied_copy,
    )


def split_heads_or_tile(w: np.ndarray, shape) -> np.ndarray:
    """A qk-norm weight: [N * H] (all heads) -> [N, H], or one row [H] for every head."""
    return w.reshape(shape) if w.size == np.prod(shape) else tile_heads(w, shape)


# Phi-3


def _phi3(arch: str, r: ConfigReader) -> ModelConfig:
    hidden, num_layers = r.take("hidden_size"), r.take("num_hidden_layers")
    max_pos = r.take("max_position_embeddings")
    num_heads, kv_heads, head_dim = _heads(r, hidden)
    for key in ("rope_parameters", "rope_scaling"):  # Phi-3 reads "su" and "yarn" as longrope
        if isinstance(r.d.get(key), dict):
            spec = dict(r.d[key])
            for k in ("rope_type", "type"):
                if spec.get(k) in ("su", "yarn"):
                    spec[k] = "longrope"
            r.d[key] = spec
    original = r.take("original_max_position_embeddings")
    rope = read_rope(r.d, r.defaults["rope_theta"], max_pos, original)
    partial = _partial(r, rope, "partial_rotary_factor", 1.0)
    attention = Attention(
        num_heads, kv_heads, head_dim, _rotary(rope, head_dim, partial), head_dim**-0.5
    )
    norm = Norm("rms", float(r.take("rms_norm_eps")))
    mlp = Mlp(r.take("intermediate_size"), r.take("hidden_act"))
    windows = _windows(arch, r, num_layers, max_pos)
    r.ignore("resid_pdrop", "embd_pdrop")
    return _model(
        arch,
        r,
        [LayerSpec(_sliding(attention, w), mlp, norm) for w in windows],
        norm,
        hidden_size=hidden,
        max_position_embeddings=max_pos,
        tie_embeddings=bool(r.take("tie_word_embeddings")),
    )


def split_qkv(w: np.ndarray, shape) -> np.ndarray:
    """One [(N + 2K) * H, D] projection, q then k then v rows (Phi-3) -> [K, G + 2, H, D]."""
    K, E, H, *_ = shape
    q, k, v = np.split(w, [K * (E - 2) * H, K * (E - 1) * H], axis=0)
    return fuse_qkv(q, k, v, shape)


PHI3 = Table(
    rules=(
        *outer("model.embed_tokens", "model.norm"),
        *layer_rules(
            "model.layers.{i}",
            {
                **norm("norm", "input_layernorm"),
                **norm("mlp_norm", "post_attention_layernorm"),
                "attn.qkv": (("self_attn.qkv_proj.weight",), split_qkv),
                **linear("attn.out", "self_attn.o_proj", split_heads),
                "mlp.up": (("mlp.gate_up_proj.weight",), split_halves),
                **linear("mlp.down", "mlp.down_proj"),
            },
        ),
    ),
    ignored_suffixes=LLAMA.ignored_suffixes,
    tied_copy=LLAMA.tied_copy,
)


# Gemma 2 and Gemma 3 (text)


def _gemma_ropes(arch: str, r: ConfigReader, max_pos: int) -> tuple[RopeSpec, RopeSpec]:
    """(full layers' rope, sliding layers' rope). Gemma 3 gives each layer kind its own:
    `rope_parameters` keyed by layer kind (transformers 5), or `rope_theta` + `rope_scaling` for
    full layers and `rope_local_base_freq` for sliding ones (4.x)."""
    if arch == "gemma2":
        rope = read_rope(r.d, r.defaults["rope_theta"], max_pos)
        return rope, rope
    params = r.d.get("rope_parameters")
    local_base = r.take("rope_local_base_freq")
    if isinstance(params, dict) and set(params) <= {"full_attention", "sliding_attention"}:
        r.d.pop("rope_parameters")
        r.ignore("rope_theta", "rope_scaling")  # folded into the nested dict by transformers
        full = read_rope({"rope_parameters": params.get("full_attention")}, 1e6, max_pos)
        local = read_rope({"rope_parameters": params.get("sliding_attention")}, 1e4, max_pos)
        return full, local
    full = read_rope(r.d, r.defaults["rope_theta"], max_pos)
    return full, RopeSpec(float(local_base), None)


def _gemma2(arch: str, r: ConfigReader) -> ModelConfig:
    """Gemma 2 and Gemma 3 text: sandwich norms, (1 + w) RMSNorm, local and global layers;
    Gemma 2 soft-caps attention and logits, Gemma 3 normalizes queries and keys."""
    hidden, num_layers = r.take("hidden_size"), r.take("num_hidden_layers")
    max_pos = r.take("max_position_embeddings")
    num_heads, kv_heads, head_dim = _heads(r, hidden)
    full_rope, local_rope = _gemma_ropes(arch, r, max_pos)
    _require(r, "use_bidirectional_attention", (None, False), "bidirectional attention")
    norm = Norm("rms_plus_one", float(r.take("rms_norm_eps")))
    gemma3 = arch == "gemma3_text"
    if gemma3:  # stored, but transformers' Gemma 3 attention never applies it
        r.ignore("attn_logit_softcapping")
    biased = bool(r.take("attention_bias"))
    attention = Attention(
        num_heads,
        kv_heads,
        head_dim,
        None,
        float(r.take("query_pre_attn_scalar")) ** -0.5,
        qkv_bias=biased,
        out_bias=biased,
        qk_norm=norm if gemma3 else None,
        softcap=None if gemma3 else r.explicit("attn_logit_softcapping"),
    )
    act = r.take("hidden_activation") or r.take("hidden_act")
    mlp = Mlp(r.take("intermediate_size"), act)
    windows = _windows(arch, r, num_layers, max_pos)

    def layer(window):
        rope = full_rope if window is None else local_rope
        spec = dataclasses.replace(
            attention, position=_full_rotary(rope, head_dim), sliding_window=window
        )
        return LayerSpec(spec, mlp, norm, norms="pre_post")

    return _model(
        arch,
        r,
        [layer(w) for w in windows],
        norm,
        hidden_size=hidden,
        max_position_embeddings=max_pos,
        tie_embeddings=bool(r.take("tie_word_embeddings")),
        embed_scale=hidden**0.5,
        final_softcap=r.explicit("final_logit_softcapping"),
    )


GEMMA2 = Table(
    rules=(
        *outer("model.embed_tokens", "model.norm"),
        *layer_rules(
            "model.layers.{i}",
            {
                **norm("norm", "input_layernorm"),
                **norm("post_attn_norm", "post_attention_layernorm"),
                **norm("mlp_norm", "pre_feedforward_layernorm"),
                **norm("post_mlp_norm", "post_feedforward_layernorm"),
                **llama_attention("self_attn"),
                **linear("attn.out", "self_attn.o_proj", split_heads),
                "attn.q_norm.scale": (("self_attn.q_norm.weight",), tile_heads),
                "attn.k_norm.scale": (("self_attn.k_norm.weight",), tile_heads),
                "mlp.up": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), stack),
                **linear("mlp.down", "mlp.down_proj"),
            },
        ),
    ),
    ignored_suffixes=LLAMA.ignored_suffixes,
    tied_copy=LLAMA.tied_copy,
)


# gpt-oss


def _gpt_oss(arch: str, r: ConfigReader) -> ModelConfig:
    """gpt-oss: sliding and full layers, learned sink logits, YaRN, a biased router over
    experts with a clamped SwiGLU; MXFP4 expert weights are dequantized at conversion."""
    hidden, num_layers = r.take("hidden_size"), r.take("num_hidden_layers")
    max_pos = r.take("max_position_embeddings")
    num_heads, kv_heads, head_dim = _heads(r, hidden)
    if "rope_parameters" not in r.d and "rope_scaling" not in r.d:
        r.d["rope_parameters"] = dict(_GPT_OSS_ROPE)
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
        _full_rotary(rope, head_dim),
        head_dim**-0.5,
        qkv_bias=biased,
        out_bias=biased,
        learned_sinks=True,
    )
    experts = Experts(_num_experts(r), top_k, normalize=True, router_bias=True)
    mlp = Mlp(
        r.take("intermediate_size"),
        "clamped_swiglu",
        bias=True,
        experts=experts,
        alpha=float(r.take("swiglu_alpha")),
        limit=float(r.take("swiglu_limit")),
    )
    norm = Norm("rms", float(r.take("rms_norm_eps")))
    windows = _windows(arch, r, num_layers, max_pos)
    r.ignore(*_ROUTER_TRAINING, "hidden_act", "initial_context_length")
    return _model(
        arch,
        r,
        [LayerSpec(_sliding(attention, w), mlp, norm) for w in windows],
        norm,
        hidden_size=hidden,
        max_position_embeddings=max_pos,
        tie_embeddings=bool(r.take("tie_word_embeddings")),
    )


_GPT_OSS_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


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


GPT_OSS = Table(
    rules=(
        *outer("model.embed_tokens", "model.norm"),
        *layer_rules(
            "model.layers.{i}",
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
            },
        ),
    ),
    ignored_suffixes=LLAMA.ignored_suffixes,
    tied_copy=LLAMA.tied_copy,
)


# Bloom


def _bloom(arch: str, r: ConfigReader) -> ModelConfig:
    """Bloom: ALiBi (its bias added to the scaled scores), a LayerNorm on the embeddings."""
    hidden = r.take("hidden_size") or r.take("n_embed")
    num_heads = r.take("n_head")
    head_dim = hidden // num_heads
    if r.take("apply_residual_connection_post_layernorm"):
        raise ConvertError("apply_residual_connection_post_layernorm is not supported")
    if r.take("n_inner") is not None:
        raise ConvertError("a Bloom n_inner is not supported (transformers uses 4 x hidden)")
    attention = Attention(
        num_heads,
        num_heads,
        head_dim,
        Alibi(tuple(bloom_slopes(num_heads))),
        head_dim**-0.5,
        qkv_bias=True,
        out_bias=True,
    )
    norm = Norm("layer", float(r.take("layer_norm_epsilon")), bias=True)
    mlp = Mlp(4 * hidden, "gelu_pytorch_tanh", gated=False, bias=True)
    # Tensor-parallel slicing of the same products, fused kernels, dropout: same function.
    r.ignore(
        "pretraining_tp",
        "slow_but_exact",
        "hidden_dropout",
        "masked_softmax_fusion",
        "attention_softmax_in_fp32",
        "bias_dropout_fusion",
        "skip_bias_add",
        "skip_bias_add_qkv",
        "offset_alibi",
    )
    return _model(
        arch,
        r,
        [LayerSpec(attention, mlp, norm)] * r.take("n_layer"),
        norm,
        hidden_size=hidden,
        max_position_embeddings=r.take("seq_length", 2048),
        tie_embeddings=bool(r.take("tie_word_embeddings")),
        embed_norm=norm,
    )


BLOOM = Table(
    rules=(
        *outer("transformer.word_embeddings", "transformer.ln_f"),
        *(
            Rule(target, sources, f)
            for target, (sources, f) in norm(
                "embed_norm", "transformer.word_embeddings_layernorm"
            ).items()
        ),
        *layer_rules(
            "transformer.h.{i}",
            {
                **norm("norm", "input_layernorm"),
                **norm("mlp_norm", "post_attention_layernorm"),
                # rows per head [N, 3 (q, k, v), H]: already [K = N, G + 2 = 3, H]
                **linear("attn.qkv", "self_attention.query_key_value", split_heads, split_heads),
                **linear("attn.out", "self_attention.dense", split_heads),
                **linear("mlp.up", "mlp.dense_h_to_4h"),
                **linear("mlp.down", "mlp.dense_4h_to_h"),
            },
        ),
    ),
    tied_copy=("lm_head.weight", "transformer.word_embeddings.weight"),
    base_prefix="transformer.",  # bigscience's own checkpoints are saved from BloomModel
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
        _mpt_widths,
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
    "qwen3": Family(
        _LLAMA_REQUIRED,
        _MODERN | {"head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
        _llama_like,
        _llama_like_table,
    ),
    "qwen3_moe": Family(
        _LLAMA_REQUIRED,
        _MODERN
        | {
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "moe_intermediate_size": 768,
            "decoder_sparse_step": 1,
            "norm_topk_prob": False,
        },
        _llama_like,
        _llama_like_table,
    ),
    "mixtral": Family(
        _LLAMA_REQUIRED,
        _MODERN
        | {
            "rope_theta": 1e6,
            "max_position_embeddings": 131072,
            "num_experts": 8,
            "num_experts_per_tok": 2,
        },
        _llama_like,
        _llama_like_table,
    ),
    "smollm3": Family(
        _LLAMA_REQUIRED,
        _MODERN
        | {
            "rope_theta": 2e6,
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "no_rope_layer_interval": 4,
        },
        _llama_like,
        _llama_like_table,
    ),
    "olmo2": Family(
        _LLAMA_REQUIRED, _MODERN | {"max_position_embeddings": 2048}, _llama_like, _llama_like_table
    ),
    "starcoder2": Family(
        _LLAMA_REQUIRED,
        _MODERN
        | {
            "hidden_act": "gelu_pytorch_tanh",
            "norm_epsilon": 1e-5,
            "use_bias": True,
            "tie_word_embeddings": True,
            "max_position_embeddings": 4096,
        },
        _llama_like,
        _llama_like_table,
    ),
    "phi3": Family(
        _LLAMA_REQUIRED,
        _MODERN | {"max_position_embeddings": 4096, "original_max_position_embeddings": 4096},
        _phi3,
        _constant(PHI3),
    ),
    "gemma2": Family(
        _LLAMA_REQUIRED,
        _MODERN
        | {
            "hidden_activation": "gelu_pytorch_tanh",
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "max_position_embeddings": 8192,
            "bos_token_id": 2,
            "eos_token_id": 1,
        },
        _gemma2,
        _constant(GEMMA2),
    ),
    "gemma3_text": Family(
        _LLAMA_REQUIRED,
        _MODERN
        | {
            "hidden_activation": "gelu_pytorch_tanh",
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "max_position_embeddings": 131072,
            "bos_token_id": 2,
            "eos_token_id": 1,
        },
        _gemma2,
        _constant(GEMMA2),
    ),
    "gpt_oss": Family(
        _LLAMA_REQUIRED,
        _MODERN
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
        _gpt_oss,
        _constant(GPT_OSS),
    ),
    "bloom": Family(
        ("vocab_size",),
        {
            "hidden_size": 64,
            "n_layer": 2,
            "n_head": 8,
            "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        _bloom,
        _constant(BLOOM),
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


# --- reading a Hugging Face config through the registry ---------------------------------------


def read_hf_config(src: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face folder (`config.json`, plus the end-of-sequence ids of
    `generation_config.json` if present)."""
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise ConvertError(f"{src} has no config.json (not a Hugging Face model folder)")
    gen_file = src / "generation_config.json"
    generation = read_json(gen_file) if gen_file.is_file() else {}
    config = read_json(cfg_file)
    with malformed_values(cfg_file):
        return config_from_hf(config, generation)


def config_from_hf(
    config: Mapping[str, Any], generation: Mapping[str, Any] | None = None
) -> ModelConfig:
    """Map a Hugging Face `config.json` dict (transformers 4.x or 5.x) to a ModelConfig.

    generation: the `generation_config.json` dict; its `eos_token_id`s join the config's.
    Raises ConvertError for an unsupported architecture, rope type, sliding window or any key
    this function does not understand.
    """
    d = dict(config)
    arch = d.pop("model_type", None)
    if arch not in FAMILIES:
        raise ConvertError(refusal(arch, list(FAMILIES)))
    family = FAMILIES[arch]
    missing = [k for k in family.required if d.get(k) is None]
    if missing:
        raise ConvertError(f"missing required keys: {', '.join(missing)}")
    reader = ConfigReader(d, family.defaults)
    cfg = family.read(arch, reader)
    eos = _ids(reader.take("eos_token_id")) + _ids((generation or {}).get("eos_token_id"))
    cfg = dataclasses.replace(
        cfg, bos_token_id=reader.take("bos_token_id"), eos_token_ids=tuple(dict.fromkeys(eos))
    )
    reader.check_all_read(arch)
    return cfg


def _ids(value: int | list[int] | None) -> list[int]:
    """Token ids given as one int, a list or null."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
