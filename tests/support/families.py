"""The case table of the family tests (`tests/test_families.py`), as vLLM's
`tests/models/registry.py` is theirs: one `Case` per (family, variant) with its tiny config and
what is checked on it.

A case's config is built with transformers' own config class, named as a string so that this
table imports on any transformers (`.ci/compat` runs the `compat` cases at the lowest declared
version, which lacks the newer classes); Qwen v1 and BTLM have no transformers class: their
tiny checkpoints come from the references written from their published code
(`published_models`). Every case is converted and checked for dense logits against PyTorch;
the other properties are the case's fields, each read by one test:

    stream          the sink stream (S = 2, W = 5, chunk 1 and 8) equals the streaming reference
    traits          the converted per-layer description carries the family's defining traits
    commands        `jaxsink-convert` then `jaxsink ppl --tokens`, as a user runs them
    reference_loop  `stream_nll` in these modes equals the PyTorch reference loop of the contract
    refused         conversion refuses the family with this message (nothing else is checked)

and every converted case: its module's parameters carry partition specs, and each layer kind's
cache is the size the contract says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jaxsink.config import Alibi, ModelConfig, Rotary
from tests.support import published_models
from tests.support.hf_tiny import ARCHITECTURES, VOCAB, build_from_config, tiny_hf_model

__all__ = ["CASES", "VOCAB", "WINDOW", "Case", "Commands", "Dense", "case", "cases"]

WINDOW = 4  # the modern families' native sliding windows, far shorter than the test streams


@dataclasses.dataclass(frozen=True)
class Dense:
    """Dense logits within 1e-4 of PyTorch's: `batch` random streams (seed `seed`) of `tokens`,
    fed `chunk` at a time into a dense cache of `capacity` slots."""

    batch: int = 2
    tokens: int = 40
    capacity: int = 48
    chunk: int = 16
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Commands:
    """`jaxsink-convert DIR OUT`, then `jaxsink ppl --tokens` over `n_tokens` (of `n_tokens` + 1
    random ids): dense per-token NLL equal to PyTorch's within 1e-4; sink mode (S = 2, W = 5)
    equal at chunk 1, 8 and the default within 1e-5; a window of 62, wider than the stream,
    equal to dense. `evictions`: the sink NLL differs from dense (by > 1e-3);
    `native_windows`: ppl's summary reports a cache smaller than one with every layer full."""

    n_tokens: int
    evictions: bool = False
    native_windows: bool = False


@dataclasses.dataclass(frozen=True)
class Case:
    """One family variant: how its tiny checkpoint is built, and what is checked on it.

    `config` names a transformers config class, `kwargs` its arguments; `build` is one of
    "random" (every weight random: `hf_tiny.build_from_config` with attention kernel `kernel`),
    "tokenizer" (`hf_tiny.tiny_hf_model`: random norms and biases, a word-level tokenizer),
    "published" (`published_models.build_tiny_<family>`)."""

    name: str
    family: str  # the converter's family (config.json's model_type)
    config: str | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    build: str = "random"
    kernel: str = "eager"
    dense: Dense = Dense()
    stream: int | None = None  # tokens of the sink stream against the streaming reference
    traits: Callable[[ModelConfig], bool] | None = None
    commands: Commands | None = None
    reference_loop: tuple[str, ...] = ()
    refused: str | None = None
    compat: bool = False  # run by .ci/compat at the lowest versions pyproject.toml declares

    def hf_config(self):
        """A fresh transformers config of this case."""
        import transformers

        return getattr(transformers, self.config)(**self.kwargs)

    def build_model(self, path: Path):
        """The PyTorch model (eval mode), its checkpoint saved to `path`."""
        if self.build == "published":
            return getattr(published_models, f"build_tiny_{self.family}")(path)
        if self.build == "tokenizer":
            return tiny_hf_model(self.family, path, **self.kwargs)
        return build_from_config(self.hf_config(), path, self.kernel)


SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
# the modern families: GQA, small MLPs, the special tokens set
MODERN = SMALL | dict(
    num_key_value_heads=2, intermediate_size=48, pad_token_id=0, bos_token_id=1, eos_token_id=2
)
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def _l0(c: ModelConfig):
    return c.layers[0]


def _a(c: ModelConfig):
    return [s.attention for s in c.layers]


def _windows(c: ModelConfig):
    return [a.sliding_window for a in _a(c)]


# Families converted from transformers' own classes with every weight random, and Qwen v1 and
# BTLM from their published code: dense logits, a sink stream of 40 tokens, the traits.
ARCHITECTURES_ = [
    Case(
        "llama-biases",
        "llama",
        "LlamaConfig",
        SMALL | dict(intermediate_size=48, attention_bias=True, mlp_bias=True),
        traits=lambda c: _l0(c).attention.out_bias and _l0(c).mlp.bias,
    ),
    Case(
        "gpt_neox-parallel",
        "gpt_neox",
        "GPTNeoXConfig",
        SMALL | dict(intermediate_size=48),
        traits=lambda c: (_l0(c).attention.position.dim, _l0(c).residual) == (2, "parallel"),
        commands=Commands(60, evictions=True),
    ),
    Case(
        "gpt_neox-sequential",
        "gpt_neox",
        "GPTNeoXConfig",
        SMALL | dict(intermediate_size=48, use_parallel_residual=False, rotary_pct=0.5),
        traits=lambda c: (_l0(c).attention.position.dim, _l0(c).residual) == (4, "sequential"),
    ),
    Case(
        "gpt_neox-no-bias",
        "gpt_neox",
        "GPTNeoXConfig",
        SMALL | dict(intermediate_size=48, attention_bias=False),
        traits=lambda c: not (_l0(c).attention.qkv_bias or _l0(c).attention.out_bias),
    ),
    Case(
        "gptj",
        "gptj",
        "GPTJConfig",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=48),
        traits=lambda c: (
            _l0(c).attention.position.interleaved
            and _l0(c).attention.position.dim == 4
            and c.lm_head_bias
        ),
    ),
    Case(
        "gptj-full-rotary",
        "gptj",
        "GPTJConfig",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=8, n_inner=48),
        traits=lambda c: (
            _l0(c).attention.position.interleaved and _l0(c).attention.position.dim == 8
        ),
    ),
    # transformers' eager Falcon adds ALiBi twice (to the scores and again in the mask)
    Case(
        "falcon-rw-mqa",
        "falcon",
        "FalconConfig",
        SMALL,
        kernel="sdpa",
        traits=lambda c: (
            _l0(c).attention.num_kv_heads == 1 and _l0(c).residual == "parallel_shared"
        ),
    ),
    Case(
        "falcon-new-gqa",
        "falcon",
        "FalconConfig",
        SMALL | dict(new_decoder_architecture=True, num_kv_heads=2, bias=True),
        kernel="sdpa",
        traits=lambda c: _l0(c).attention.num_kv_heads == 2 and _l0(c).residual == "parallel",
    ),
    Case(
        "falcon-alibi-sequential",
        "falcon",
        "FalconConfig",
        SMALL | dict(alibi=True, multi_query=False, parallel_attn=False, bias=True),
        kernel="sdpa",
        traits=lambda c: (
            isinstance(_l0(c).attention.position, Alibi) and _l0(c).residual == "sequential"
        ),
        commands=Commands(60, evictions=True),
    ),
    Case(
        "falcon-new-one-norm",
        "falcon",
        "FalconConfig",
        SMALL | dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
        kernel="sdpa",
        traits=lambda c: _l0(c).residual == "parallel_shared",
    ),
    Case(
        "falcon-alibi-parallel-mqa",
        "falcon",
        "FalconConfig",
        SMALL | dict(alibi=True),
        kernel="sdpa",
        traits=lambda c: (
            isinstance(_l0(c).attention.position, Alibi) and _l0(c).attention.num_kv_heads == 1
        ),
    ),
    Case(
        "phi",
        "phi",
        "PhiConfig",
        SMALL | dict(intermediate_size=48),
        traits=lambda c: _l0(c).attention.position.dim == 4 and c.lm_head_bias,
    ),
    Case(
        "phi-gqa",
        "phi",
        "PhiConfig",
        SMALL | dict(intermediate_size=48, num_key_value_heads=2),
        traits=lambda c: _l0(c).attention.num_kv_heads == 2,
    ),
    # left out of .ci/compat: transformers < 4.48's own PhiAttention applies its q/k LayerNorm
    # (normalized_shape = head_dim) before splitting heads, so the PyTorch model itself crashes
    Case(
        "phi-qknorm",
        "phi",
        "PhiConfig",
        SMALL | dict(intermediate_size=48, qk_layernorm=True),
        traits=lambda c: _l0(c).attention.qk_norm is not None and _l0(c).attention.qk_norm.bias,
    ),
    Case(
        "mpt-clip",
        "mpt",
        "MptConfig",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            n_layers=2,
            n_heads=4,
            expansion_ratio=4,  # transformers' MPT hard-codes 4
            attn_config=dict(clip_qkv=0.6),  # transformers ignores alibi_bias_max
        ),
        traits=lambda c: (
            isinstance(_l0(c).attention.position, Alibi) and _l0(c).attention.clip_qkv == 0.6
        ),
    ),
    Case(
        "stablelm",
        "stablelm",
        "StableLmConfig",
        SMALL | dict(intermediate_size=48, num_key_value_heads=4),
        traits=lambda c: (
            isinstance(_l0(c).attention.position, Rotary) and _l0(c).attention.position.dim == 2
        ),
    ),
    Case(
        "stablelm-parallel-qkbias-qknorm",
        "stablelm",
        "StableLmConfig",
        SMALL
        | dict(
            intermediate_size=48,
            num_key_value_heads=2,
            use_qkv_bias=True,
            qk_layernorm=True,
            use_parallel_residual=True,
        ),
        traits=lambda c: _l0(c).attention.qk_norm is not None,
    ),
    Case(
        "gemma-mqa",
        "gemma",
        "GemmaConfig",
        SMALL | dict(intermediate_size=48, num_key_value_heads=1, head_dim=8),
        traits=lambda c: _l0(c).norm.kind == "rms_plus_one" and c.embed_scale == 32**0.5,
    ),
    Case(
        "qwen",
        "qwen",
        build="published",
        traits=lambda c: _l0(c).mlp.gated and c.position_limit == published_models.SEQ_LENGTH,
    ),
    Case(
        "btlm",
        "btlm",
        build="published",
        traits=lambda c: isinstance(_l0(c).attention.position, Alibi) and c.logit_scale != 1.0,
        commands=Commands(60, evictions=True),
    ),
]
ARCHITECTURES_ = [
    dataclasses.replace(c, stream=40, compat=c.name != "phi-qknorm") for c in ARCHITECTURES_
]

# Today's families, with native sliding windows (WINDOW) shorter than the test streams: dense
# logits, a sink stream of 28 tokens (many evictions in both layer kinds), the traits.
MODERN_ = [
    Case(
        "qwen3-sliding",
        "qwen3",
        "Qwen3Config",
        MODERN
        | dict(head_dim=8, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        traits=lambda c: _windows(c) == [None, WINDOW] and _a(c)[0].qk_norm is not None,
    ),
    Case(
        "qwen3_moe-dense-layer",
        "qwen3_moe",
        "Qwen3MoeConfig",
        MODERN
        | dict(
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            mlp_only_layers=[1],
        ),
        traits=lambda c: (
            c.layers[0].mlp.experts is not None
            and c.layers[1].mlp.experts is None
            and not c.layers[0].mlp.experts.normalize
        ),
    ),
    Case(
        "mixtral-sliding",
        "mixtral",
        "MixtralConfig",
        MODERN | dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
        traits=lambda c: _windows(c) == [WINDOW] * 2 and c.layers[0].mlp.experts.normalize,
    ),
    Case(
        "smollm3-nope-sliding",
        "smollm3",
        "SmolLM3Config",
        MODERN
        | dict(
            num_hidden_layers=4,
            no_rope_layer_interval=2,
            use_sliding_window=True,
            sliding_window=WINDOW,
        ),
        traits=lambda c: (
            [x.position is None for x in _a(c)] == [False, True] * 2
            and _windows(c) == [None, WINDOW] * 2
        ),
    ),
    Case(
        "olmo2",
        "olmo2",
        "Olmo2Config",
        MODERN,
        traits=lambda c: c.layers[0].norms == "post" and _a(c)[0].qk_norm_scope == "all",
    ),
    Case(
        "starcoder2-sliding",
        "starcoder2",
        "Starcoder2Config",
        MODERN | dict(sliding_window=WINDOW),
        traits=lambda c: _windows(c) == [WINDOW] * 2 and not c.layers[0].mlp.gated,
    ),
    Case(
        "phi3-longrope-sliding",
        "phi3",
        "Phi3Config",
        MODERN
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
        traits=lambda c: (
            _a(c)[0].position.scaling.kind == "longrope" and _a(c)[0].position.dim == 4
        ),
        commands=Commands(23, native_windows=True),
    ),
    Case(
        "gemma2-softcaps",
        "gemma2",
        "Gemma2Config",
        MODERN
        | dict(
            head_dim=8,
            sliding_window=WINDOW,
            query_pre_attn_scalar=6,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        ),
        traits=lambda c: (
            _a(c)[0].softcap == 2.0 and c.final_softcap == 3.0 and _windows(c)[1] is None
        ),
    ),
    Case(
        "gemma3-two-ropes",
        "gemma3_text",
        "Gemma3TextConfig",
        MODERN
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
        traits=lambda c: (
            _windows(c) == [WINDOW, WINDOW, None]
            and _a(c)[0].position.theta == 10.0
            and _a(c)[2].position.scaling.kind == "linear"
            and _a(c)[0].softcap is None
        ),
    ),
    Case(
        "gpt_oss",
        "gpt_oss",
        "GptOssConfig",
        MODERN
        | dict(
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
            swiglu_limit=0.5,
        ),
        traits=lambda c: (
            _a(c)[0].learned_sinks
            and _windows(c) == [WINDOW, None]
            and _a(c)[0].position.scaling.kind == "yarn"
        ),
        commands=Commands(23, native_windows=True),
    ),
    Case(
        "bloom",
        "bloom",
        "BloomConfig",
        dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        traits=lambda c: c.embed_norm is not None,
    ),
]
MODERN_ = [dataclasses.replace(c, stream=28) for c in MODERN_]

# Llama, Mistral and Qwen2 (`hf_tiny.tiny_hf_model`) with MHA, GQA and MQA: dense logits of two
# streams of 45 tokens; the GQA Llama and Qwen2 also against the PyTorch reference loop of the
# contract. Llama's variants: one stream of 200 tokens.
HEAD_LAYOUTS_ = [
    Case(
        f"{family}-{kv}",
        family,
        ARCHITECTURES[family][0].__name__,
        dict(num_key_value_heads=n),
        build="tokenizer",
        dense=Dense(batch=2, tokens=45, capacity=64, chunk=16, seed=0),
        reference_loop=("sink", "window", "dense") if kv == "gqa" and family != "mistral" else (),
        compat=True,
    )
    for family in ("llama", "mistral", "qwen2")
    for kv, n in HEADS.items()
]
LLAMA_VARIANTS_ = [
    Case(
        f"llama-{name}",
        "llama",
        "LlamaConfig",
        overrides,
        build="tokenizer",
        dense=Dense(batch=1, tokens=200, capacity=256, chunk=64, seed=1),
    )
    for name, overrides in {
        "tied": {"tie_word_embeddings": True},
        "rope-linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        "rope-llama3": {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
        "attention-bias": {"attention_bias": True},
    }.items()
]

# Families the converter refuses, saved by transformers: one line naming what is missing.
REFUSED_ = [
    Case(
        "gpt2",
        "gpt2",
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4),
        refused="learned absolute position",
    ),
    Case(
        "opt",
        "opt",
        "OPTConfig",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            ffn_dim=48,
            word_embed_proj_dim=32,
        ),
        refused="learned absolute position",
    ),
]

CASES: tuple[Case, ...] = (
    *ARCHITECTURES_,
    *MODERN_,
    *HEAD_LAYOUTS_,
    *LLAMA_VARIANTS_,
    *REFUSED_,
)
assert len({c.name for c in CASES}) == len(CASES), "case names are unique"
_BY_NAME = {c.name: c for c in CASES}


def case(name: str) -> Case:
    """The case named `name`."""
    return _BY_NAME[name]


def cases(where: Callable[[Case], object] = lambda c: c.refused is None) -> list[Case]:
    """The cases for which `where` holds (by default: every case that converts)."""
    return [c for c in CASES if where(c)]
