"""The model's weights and the layers without a cache: parameters with logical axes, the
norm, the activations and the MLP (dense or a mixture of experts).

Activations are feature-major (see `jaxsink.traced.decoder`): D hidden, B batch, C chunk,
F mlp, E experts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsink import config as C
from jaxsink.traced import quant

# Every logical axis a weight dimension may carry (None: never sharded).
LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts")


def param(shape: tuple[int, ...], names: tuple[str | None, ...], dtype, fill: float = 0.0):
    """A weight of `shape` whose dimensions carry the logical axis `names` (for sharding)."""
    return nnx.Param(jnp.full(shape, fill, dtype), out_sharding=names, eager_sharding=False)


FLOAT = C.LayerQuant()  # a layer whose matrices are all float


def matrix(shape: tuple[int, ...], names: tuple[str | None, ...], dtype, spec: C.Quant | None):
    """A matrix weight [*out, *in] (read by `quant.product`): a float `param`, or kept
    quantized as `spec` says (`quant.QuantizedWeight`)."""
    if spec is None:
        return param(shape, names, dtype)
    return quant.QuantizedWeight(spec, shape, names)


class Norm(nnx.Module):
    """`config.Norm` with a weight of `shape`, applied to x [..., *shape] (or, with `axis=0`,
    over the leading axis of a feature-major tensor). Statistics over the last `joint` axes of
    `shape` (1: each row of a per-head weight on its own; 2: every head together). Computed in
    float32, returned in the input's dtype."""

    def __init__(self, spec: C.Norm, shape: tuple[int, ...], names, dtype, joint: int = 1):
        self.spec, self.joint = spec, joint
        self.scale = param(shape, names, dtype, 0.0 if spec.kind == "rms_plus_one" else 1.0)
        self.bias = param(shape, names, dtype) if spec.bias else None

    def __call__(self, x: jax.Array, axis: int = -1) -> jax.Array:
        """x: [..., *shape] (axis -1), or [D, ...] with axis 0 -> same shape."""
        spec, axis = self.spec, axis % x.ndim
        stats = tuple(range(x.ndim - self.joint, x.ndim)) if axis == x.ndim - 1 else axis
        x32 = x.astype(jnp.float32)
        if spec.kind == "layer":
            x32 = x32 - jnp.mean(x32, axis=stats, keepdims=True)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=stats, keepdims=True) + spec.eps)

        def along(w):  # weight [*shape] aligned with x's axis
            return w.reshape(w.shape + (1,) * (x.ndim - 1 - axis)) if axis < x.ndim - 1 else w

        w = along(self.scale[...])
        if spec.kind == "rms":  # as Hugging Face Llama: scale times the input-dtype normal
            return w * x32.astype(x.dtype)
        if spec.kind == "rms_plus_one":  # as Gemma: (1 + w) applied in float32
            return (x32 * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
        out = x32 * w.astype(jnp.float32)
        if self.bias is not None:
            out = out + along(self.bias[...]).astype(jnp.float32)
        return out.astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def _gated(spec: C.Mlp, gate: jax.Array, up: jax.Array) -> jax.Array:
    """The gated MLP's hidden activation from its gate and up projections (same shapes)."""
    if spec.activation == "clamped_swiglu":
        gate = jnp.minimum(gate, spec.limit)
        up = jnp.clip(up, -spec.limit, spec.limit)
        return gate * jax.nn.sigmoid(spec.alpha * gate) * (up + 1)
    return ACTIVATIONS[spec.activation](gate) * up


class Mlp(nnx.Module):
    """Gated (`up` [2, F, D]: gate, then up) or plain (`up` [F, D]) MLP, then `down` [D, F];
    optional biases `up_bias` [2, F] / [F] and `down_bias` [D].

    A mixture of experts (`spec.experts`) stacks E such MLPs on a leading `experts` axis
    (`up` [E, 2, F, D], `down` [E, D, F], biases [E, ...]) and adds a `router` [E, D] with an
    optional `router_bias` [E].
    """

    def __init__(self, spec: C.Mlp, hidden: int, dtype, quantized: C.LayerQuant = FLOAT):
        self.spec = spec
        F, moe = spec.size, spec.experts
        lead = ((moe.num,) if moe else ()) + ((2,) if spec.gated else ())
        names = (("experts",) if moe else ()) + ((None,) if spec.gated else ())
        self.up = matrix((*lead, F, hidden), (*names, "mlp", "embed"), dtype, quantized.up)
        self.up_bias = param((*lead, F), (*names, "mlp"), dtype) if spec.bias else None
        lead, names = lead[:1] if moe else (), names[:1] if moe else ()
        self.down = matrix((*lead, hidden, F), (*names, "embed", "mlp"), dtype, quantized.down)
        self.down_bias = param((*lead, hidden), (*names, "embed"), dtype) if spec.bias else None
        self.router = param((moe.num, hidden), ("experts", "embed"), dtype) if moe else None
        self.router_bias = (
            param((moe.num,), ("experts",), dtype) if moe and moe.router_bias else None
        )

    def _hidden(self, up: jax.Array, axis: int) -> jax.Array:
        """The activation from the up projection, whose gate / up halves (if gated) are the
        two entries of `axis` (removed in the result)."""
        if not self.spec.gated:
            return ACTIVATIONS[self.spec.activation](up)
        gate, up = (jnp.take(up, i, axis=axis) for i in (0, 1))
        return _gated(self.spec, gate, up)

    def __call__(self, h: jax.Array) -> jax.Array:
        """Feature-major: h [D, B, C] -> [D, B, C]."""
        if self.spec.experts is not None:
            return self._experts(h)
        up = quant.product(self.up, h)  # [2, F, B, C] or [F, B, C]
        if self.up_bias is not None:
            up += self.up_bias[...][..., None, None]
        out = quant.product(self.down, self._hidden(up, 0))  # [D, B, C]
        return out if self.down_bias is None else out + self.down_bias[...][:, None, None]

    def route(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each token's top-k experts and their weights: h [D, B, C] -> (weights [B, C, k] in
        h's dtype, expert indices [B, C, k])."""
        moe = self.spec.experts
        logits = jnp.einsum("ed,dbc->bce", self.router[...], h, preferred_element_type=jnp.float32)
        if self.router_bias is not None:
            logits += self.router_bias[...].astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, C, E]
        top, chosen = jax.lax.top_k(probs, moe.top_k)
        if moe.normalize:
            top = top / top.sum(axis=-1, keepdims=True)
        return top.astype(h.dtype), chosen

    def _experts(self, h: jax.Array) -> jax.Array:
        """The mixture: each token's top-k experts, weighted by their router probabilities.
        With fewer chosen (token, expert) pairs than experts, only the chosen experts' weights
        are read (`experts_gathered`); otherwise every expert runs on every token
        (`experts_all`), which reads each expert once. `scripts/bench.py --sections experts`
        measures both."""
        _, B, C_ = h.shape
        top, chosen = self.route(h)
        if B * C_ * self.spec.experts.top_k < self.spec.experts.num:
            return self.experts_gathered(h, top, chosen)
        return self.experts_all(h, top, chosen)

    def experts_gathered(self, h: jax.Array, top: jax.Array, chosen: jax.Array) -> jax.Array:
        """Only the chosen experts, one (token, expert) pair per step of a loop that slices
        that expert's weights: h [D, B, C], top / chosen [B, C, k] (`route`) -> [D, B, C].
        (Slicing inside a loop lets XLA:CPU read the slice in place; a gather of the chosen
        weights copies them and was slower than running every expert.)"""
        D, B, C_ = h.shape
        k = chosen.shape[-1]
        tokens = h.reshape(D, B * C_)
        experts, weights = chosen.reshape(-1), top.reshape(-1)  # pair p: token p // k

        def expert(p, out):
            e, t = experts[p], p // k
            x = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)  # [D, 1]
            up = jnp.einsum(
                "...fd,dt->...ft", jax.lax.dynamic_index_in_dim(self.up[...], e, 0, False), x
            )
            if self.up_bias is not None:
                up += jax.lax.dynamic_index_in_dim(self.up_bias[...], e, 0, False)[..., None]
            y = jax.lax.dynamic_index_in_dim(self.down[...], e, 0, False) @ self._hidden(up, 0)
            if self.down_bias is not None:
                y += jax.lax.dynamic_index_in_dim(self.down_bias[...], e, 0, False)[:, None]
            y = y * weights[p] + jax.lax.dynamic_slice_in_dim(out, t, 1, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(out, y, t, axis=1)

        out = jax.lax.fori_loop(0, B * C_ * k, expert, jnp.zeros_like(tokens))
        return out.reshape(D, B, C_)

    def experts_all(self, h: jax.Array, top: jax.Array, chosen: jax.Array) -> jax.Array:
        """Every expert on every token, unchosen ones weighted by zero: same arguments and
        result as `experts_gathered`."""
        weights = jax.nn.one_hot(chosen, self.spec.experts.num, dtype=h.dtype) * top[..., None]
        weights = weights.sum(-2)  # [B, C, E]
        up = jnp.einsum("e...fd,dbc->e...fbc", self.up[...], h)  # [E, (2,) F, B, C]
        if self.up_bias is not None:
            up += self.up_bias[...][..., None, None]
        out = jnp.einsum("edf,efbc->edbc", self.down[...], self._hidden(up, 1))  # [E, D, B, C]
        if self.down_bias is not None:
            out += self.down_bias[...][..., None, None]
        return jnp.einsum("edbc,bce->dbc", out, weights)
