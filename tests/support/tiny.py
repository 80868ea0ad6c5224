"""Tiny random models in jaxsink's layout, and a loop that feeds a stream in fixed chunks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from jaxsink import config as C
from jaxsink import layout
from jaxsink.checkpoint import param_shapes, save_checkpoint
from jaxsink.config import Attention, LayerSpec, Mlp, ModelConfig, Norm, Rotary, StreamConfig
from jaxsink.engine import padded_chunks
from jaxsink.loading import Model
from jaxsink.traced import cache as kv
from jaxsink.traced import entry

VOCAB = 97
RMS = Norm("rms", 1e-5)
SILU_MLP = Mlp(48, "silu")


def tiny_config(
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    norm: Norm = RMS,
    mlp: Mlp = SILU_MLP,
    residual: str = "sequential",
    position=None,
    **attention,
) -> ModelConfig:
    """A small Llama-shaped model; every part of its layers can be replaced by keyword."""
    position = Rotary(10000.0, head_dim) if position is None else position
    spec = Attention(num_heads, num_kv_heads, head_dim, position, head_dim**-0.5, **attention)
    return ModelConfig(
        architecture="llama",
        vocab_size=97,
        hidden_size=32,
        layers=(LayerSpec(spec, mlp, norm, residual),) * num_layers,
        final_norm=norm,
        max_position_embeddings=128,
        tie_embeddings=True,
    )


def block_config(**kw) -> ModelConfig:
    """A tiny model whose every matrix input (hidden 64, head dim 32, MLP 64) holds blocks."""
    cfg = tiny_config(head_dim=32, **({"mlp": Mlp(64, "silu")} | kw))
    return dataclasses.replace(cfg, hidden_size=64)


# `quantized_params` kinds for `block_config`: every kept GGUF kind at every product site
# (layer 1's down stays float).
MIXED_KINDS = {
    "embed": "q8_0",
    "layers.0.attn.qkv": "q4_1",
    "layers.0.attn.out": "q4_0",
    "layers.0.mlp.up": "q8_0",
    "layers.0.mlp.down": "q4_1",
    "layers.1.attn.qkv": "q8_0",
    "layers.1.attn.out": "q4_1",
    "layers.1.mlp.up": "q4_0",
}


def random_flat_params(cfg: ModelConfig, seed: int = 0, scale: float = 0.3) -> dict:
    """Random checkpoint arrays: norms near their identity, everything else N(0, scale)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in param_shapes(cfg).items():
        noise = rng.standard_normal(shape)
        if name.endswith("norm.scale"):
            plus_one = "rms_plus_one" in (cfg.final_norm.kind, cfg.layers[0].norm.kind)
            flat[name] = (0.1 * noise if plus_one else 1 + 0.1 * noise).astype(np.float32)
        else:
            flat[name] = (scale * noise).astype(np.float32)
    return flat


def tiny_model(cfg: ModelConfig, flat: dict, dtype=jnp.float32) -> Model:
    """A `jaxsink.Model` (no tokenizer) holding the checkpoint arrays `flat`."""
    graphdef, weights = layout.from_flat(cfg, flat, dtype)
    return Model(cfg=cfg, graphdef=graphdef, weights=weights, tokenizer=None, path=None)


def feed(m: Model, stream: StreamConfig, tokens: np.ndarray, chunk: int, cache=None):
    """Feed tokens [B, N] in chunks of `chunk` (last one padded); returns (logits [B, N, V], cache)."""
    cache = kv.init_cache(m.cfg, stream, tokens.shape[0], m.dtype) if cache is None else cache
    outs = []
    for padded, valid, n in padded_chunks(tokens, chunk):
        logits, cache = entry.step(m.weights, cache, padded, valid, graphdef=m.graphdef)
        outs.append(np.asarray(logits)[:, :n])
    return np.concatenate(outs, axis=1), cache


def quantized_params(cfg: ModelConfig, kinds: dict[str, str], seed: int = 0):
    """A random model with the weights named in `kinds` (e.g. {"embed": "q8_0",
    "layers.0.mlp.up": "q4_1"}) quantized by the `gguf` package: (its config, its checkpoint
    arrays, and the same weights dequantized to float32 under `cfg`)."""
    import gguf

    from jaxsink.config import Quant
    from jaxsink.convert.gguf import gguf_blocks

    flat = random_flat_params(cfg, seed)
    stored, dense = {}, dict(flat)
    for name, kind in kinds.items():
        w = flat[name]
        raw = gguf.quants.quantize(
            w.reshape(-1, w.shape[-1]), gguf.GGMLQuantizationType[kind.upper()]
        )
        blocks = gguf_blocks(raw, kind)
        lead = w.shape[:-1]
        blocks = type(blocks)(
            blocks.spec,
            blocks.codes.reshape(w.shape),
            blocks.scales.reshape(*lead, -1),
            None if blocks.mins is None else blocks.mins.reshape(*lead, -1),
        )
        dense[name] = blocks.dequantize()
        stored |= {f"{name}.{part}": a for part, a in blocks.stored().items()}
    stored |= {k: v for k, v in flat.items() if k not in kinds}
    qcfg = C.quantize_config(cfg, {name: Quant(kind) for name, kind in kinds.items()})
    return qcfg, stored, dense


def write_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer over `t0 .. t{n-1}`: enough for conversion and loading."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


# A chat template in the tiny word-level vocabulary (`write_tokenizer`): a user turn is
# t3 ... t4, a reply t5 ... t4 (ChatML's shape).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}t5 {{ m['content'] }} t4 "
    "{% else %}t3 {{ m['content'] }} t4 {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}t5 {% endif %}"
)


def tiny_checkpoint(path: Path, seed: int = 0, tokenizer_config: dict | None = None) -> Path:
    """A tiny random checkpoint `path/ckpt` (`tiny_config`, float32 weights of `seed`) with the
    word-level tokenizer (`write_tokenizer`) and, if given, a `tokenizer_config.json` of
    `tokenizer_config`, both also written to `path`. Returns the checkpoint's path."""
    path.mkdir(parents=True, exist_ok=True)
    write_tokenizer(path)
    names = ["tokenizer.json"]
    if tokenizer_config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        names.append("tokenizer_config.json")
    cfg = tiny_config()
    files = {n: (path / n).read_bytes() for n in names}
    return save_checkpoint(path / "ckpt", cfg, random_flat_params(cfg, seed=seed), "float32", files)


def chat_checkpoint(path: Path, seed: int = 5) -> Path:
    """A `tiny_checkpoint` with `CHAT_TEMPLATE` and EOS `t2` (`t0` ... `t96`): what a server or
    chat needs. Returns its path."""
    return tiny_checkpoint(path, seed, {"chat_template": CHAT_TEMPLATE, "eos_token": "t2"})
