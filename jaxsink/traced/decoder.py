"""The network: one generic Flax NNX decoder block, configured per layer, reading and writing
the sink + ring cache.

`Decoder(cfg)` is an `nnx.Module` whose every weight is an `nnx.Param` with logical axis names
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`; see `layers.LOGICAL_AXES`), readable
with `nnx.get_partition_spec`. The cache is never module state: `Decoder.__call__(cache, tokens,
valid)` takes it and returns the new one, and the jitted entry points (`jaxsink.traced.entry`)
are pure functions of `(weights, cache, tokens, valid)`, with the module's `nnx.GraphDef`
static: `nnx.merge` rebuilds the module inside the trace.

Static (a change recompiles): the graph definition (the `ModelConfig` included),
`cache.stream` and every shape (batch B, chunk length C, capacity K). Everything that moves
with the stream (`cache.pos`, the tokens, which of them are valid) is an array, so one
compilation serves a stream of any length.

Letters: B batch, C chunk, D hidden, V vocab, N segments' tokens laid end to end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsink import config as C
from jaxsink.config import ModelConfig
from jaxsink.traced import cache as kv
from jaxsink.traced import quant
from jaxsink.traced.attention import Attention, joined, split
from jaxsink.traced.layers import Mlp, Norm, matrix, param
from jaxsink.traced.view import attention_view, span


class Block(nnx.Module):
    """One decoder layer as its `LayerSpec` says: norms, residual kind, attention, MLP."""

    def __init__(self, spec: C.LayerSpec, hidden: int, dtype):
        self.spec = spec

        def norm(wanted: bool):
            return Norm(spec.norm, (hidden,), (None,), dtype) if wanted else None

        pre, post = spec.norms in ("pre", "pre_post"), spec.norms in ("post", "pre_post")
        self.norm = norm(pre)
        self.mlp_norm = norm(pre and spec.residual != "parallel_shared")
        self.post_attn_norm, self.post_mlp_norm = norm(post), norm(post)
        self.attn = Attention(spec.attention, hidden, dtype, spec.quant)
        self.mlp = Mlp(spec.mlp, hidden, dtype, spec.quant)

    def __call__(self, x: jax.Array, lcs: tuple, views: tuple, shapes: tuple):
        """x: [D, B, C] (or segments laid end to end, see `Attention`) -> (x, the layer's
        updated caches, one per segment)."""

        def apply(norm, y):  # an optional norm over the feature axis
            return y if norm is None else norm(y, axis=0)

        h = apply(self.norm, x)
        attn, lcs = self.attn(h, lcs, views, shapes)
        if self.spec.residual == "sequential":
            x = x + apply(self.post_attn_norm, attn)
            return x + apply(self.post_mlp_norm, self.mlp(apply(self.mlp_norm, x))), lcs
        mlp_in = h if self.mlp_norm is None else self.mlp_norm(x, axis=0)
        return x + attn + self.mlp(mlp_in), lcs


class Decoder(nnx.Module):
    """The whole network: embedding, one `Block` per `cfg.layers` entry, final norm, output
    projection. Weights: `embed` [V, D], `layers[i]`, `final_norm`, and unless tied `lm_head`
    [V, D]; `lm_head_bias` [V] if the config says so. The matrices the config quantizes
    (`config.Quant`) are `quant.QuantizedWeight`s, read through `quant.product` like the others.

    Layers run unrolled over per-layer weight and cache buffers: XLA:CPU copies a slice of a
    stacked [L, ...] weight before a matrix product reads it, which would double the bytes a
    decode step moves; compile time grows with depth instead (the persistent compilation cache
    hides it after the first run). Activations between the products are feature-major
    ([D, tokens]) and every matrix output-major ([out, in]): on XLA:CPU with SmolLM2's shapes
    8-14% faster than [tokens, in] x [in, out] at one token and as fast or faster at 16 to 256.
    """

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32):
        self.cfg = cfg
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed = matrix((V, D), ("vocab", "embed"), dtype, cfg.embed_quant)
        self.embed_norm = (
            None if cfg.embed_norm is None else Norm(cfg.embed_norm, (D,), (None,), dtype)
        )
        self.layers = nnx.List([Block(spec, D, dtype) for spec in cfg.layers])
        self.final_norm = Norm(cfg.final_norm, (D,), (None,), dtype)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else matrix((V, D), ("vocab", "embed"), dtype, cfg.lm_head_quant)
        )
        self.lm_head_bias = param((V,), ("vocab",), dtype) if cfg.lm_head_bias else None

    @property
    def dtype(self):
        """The float dtype the network runs in (its float weights')."""
        return self.final_norm.scale[...].dtype

    def __call__(self, cache: kv.KVCache, tokens: jax.Array, valid: jax.Array):
        """Run a chunk of tokens through the model, reading and updating the cache.

        tokens: [B, C] int32; valid: [B, C] bool (False = padding: the token is skipped, its
        stream index is not consumed). Each valid query sees exactly its own window of the
        streaming contract, so a chunk gives the same result as feeding its tokens one by one.
        Returns (final hidden states [B, C, D] after the final norm, updated cache).
        """
        return self.segments(((cache, tokens, valid),))[0]

    def segments(self, parts: tuple) -> list:
        """Several batches in one pass: parts, each (cache, tokens [B, C], valid [B, C]) as
        `__call__` takes them, with their own B and C (a serving step's decode rows, one
        token each, beside prefilling rows' chunks). Every matrix product runs once over all
        their tokens, reading each weight once; attention runs per part over its own cache.
        Returns each part's (hidden [B, C, D], updated cache), as `__call__` would."""
        cfg = self.cfg
        dtype = self.dtype
        shapes = tuple(tokens.shape for _, tokens, _ in parts)
        views, xs = [], []
        for cache, tokens, valid in parts:
            valid = valid.astype(bool)
            # One view per cache layout: the full layers' sinks + ring, each native window's.
            streams = [lc.stream for lc in cache.layers]
            views.append(
                {
                    stream: attention_view(
                        stream,
                        cache.pos,
                        valid,
                        [
                            s.attention.position
                            for s, ls in zip(cfg.layers, streams, strict=True)
                            if ls == stream
                        ],
                        span(cache.stream),
                        dtype,
                        cache.int8,
                    )
                    for stream in dict.fromkeys(streams)
                }
            )
            xs.append(quant.take(self.embed, tokens, dtype).transpose(2, 0, 1))  # [D, B, C]
        x = joined(xs)
        if cfg.embed_scale != 1.0:
            x = x * jnp.asarray(cfg.embed_scale, x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x, axis=0)
        layers = [[] for _ in parts]
        for i, block in enumerate(self.layers):
            lcs = tuple(cache.layers[i] for cache, _, _ in parts)
            seen = tuple(v[lc.stream] for v, lc in zip(views, lcs, strict=True))
            x, lcs = block(x, lcs, seen, shapes)
            for new, lc in zip(layers, lcs, strict=True):
                new.append(lc)
        out = []
        for part, new, (cache, _, valid) in zip(split(x, shapes), layers, parts, strict=True):
            hidden = self.final_norm(part.transpose(1, 2, 0))
            fed = valid.astype(bool).sum(axis=1, dtype=jnp.int32)
            pos, epoch = kv.fold(cache, cache.pos + fed)
            out.append((hidden, cache.replace(layers=tuple(new), pos=pos, epoch=epoch)))
        return out

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Next-token logits, float32, vocabulary-major: hidden [..., D] -> [V, ...].

        Vocabulary-major because XLA:CPU runs the product several times faster when the
        vocabulary is the output's major axis (SmolLM2, 16 tokens: 3.9 vs 5.5 ms; 128 tokens:
        16 vs 69 ms), so reductions over the vocabulary (sampling, log-softmax) run along axis 0.
        """
        cfg = self.cfg
        head = self.embed if self.lm_head is None else self.lm_head  # [V, D]
        hidden = jnp.moveaxis(hidden, -1, 0)  # [D, ...]
        out = quant.product(head, hidden, preferred_element_type=jnp.float32)  # [V, ...]
        if self.lm_head_bias is not None:
            bias = self.lm_head_bias[...].astype(jnp.float32)
            out = out + bias.reshape(bias.shape + (1,) * (out.ndim - 1))
        if cfg.logit_scale != 1.0:
            out = out * cfg.logit_scale
        if cfg.final_softcap is not None:
            out = cfg.final_softcap * jnp.tanh(out / cfg.final_softcap)
        return out
