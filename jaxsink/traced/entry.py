"""The model's jitted entry points: pure functions of `(weights, cache, tokens, valid)` with the
module's graph definition static, each an `EntryPoint` (jitted with its static and donated
arguments; `jaxsink.executables.compiled` compiles one ahead of time).
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsink.traced import cache as kv

# Python-side trace counter: jit traces once per compilation, so this counts compilations of
# the jitted entry points (tests assert on it).
TRACES: collections.Counter = collections.Counter()


class EntryPoint:
    """`fun` jitted with `static` (trailing parameters, by name) and `donate` (by name)."""

    def __init__(self, fun: Callable, static: tuple[str, ...], donate: tuple[str, ...], doc=""):
        self.fun, self.static, self.donate = fun, static, donate
        self.jitted = jax.jit(fun, static_argnames=static, donate_argnames=donate)
        self.__doc__ = doc
        self.__name__ = fun.__name__.lstrip("_")

    def __call__(self, *args, **kwargs):
        return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def with_shardings(self, in_shardings: tuple, out_shardings) -> Callable:
        """The same function jitted with explicit shardings of its dynamic arguments and results
        (static arguments then go positionally, after the dynamic ones)."""
        params = list(inspect.signature(self.fun).parameters)
        n = len(params) - len(self.static)
        if params[n:] != list(self.static):
            raise TypeError(f"{self.__name__}: static parameters must come last")
        return jax.jit(
            self.fun,
            static_argnums=tuple(range(n, len(params))),
            donate_argnums=tuple(params.index(d) for d in self.donate),
            in_shardings=in_shardings,
            out_shardings=out_shardings,
        )


def forward(weights: nnx.State, cache: kv.KVCache, tokens, valid, graphdef: nnx.GraphDef):
    """`Decoder.__call__` as a pure function of the weights' state: -> (hidden [B, C, D],
    cache)."""
    return nnx.merge(graphdef, weights)(cache, tokens, valid)


def logits(weights: nnx.State, hidden: jax.Array, graphdef: nnx.GraphDef) -> jax.Array:
    """`Decoder.logits` as a pure function: hidden [..., D] -> float32 [V, ...]."""
    return nnx.merge(graphdef, weights).logits(hidden)


def _step(weights, cache, tokens, valid, graphdef):
    TRACES["step"] += 1
    module = nnx.merge(graphdef, weights)
    hidden, cache = module(cache, tokens, valid)
    return jnp.moveaxis(module.logits(hidden), 0, -1), cache


step = EntryPoint(
    _step,
    static=("graphdef",),
    donate=("cache",),
    doc="""Jitted `(weights, cache, tokens [B, C], valid [B, C], graphdef) -> (logits
[B, C, V] float32, cache)`: `weights`, `graphdef` from `nnx.split(Decoder)` (`Model.weights`,
`Model.graphdef`).

The cache is donated (updated in place): do not reuse the cache passed in.
""",
)


def _last_logits(weights, cache, tokens, valid, graphdef):
    TRACES["last_logits"] += 1
    module = nnx.merge(graphdef, weights)
    hidden, cache = module(cache, tokens, valid)
    return module.logits(last_valid(hidden, valid)).T, cache


def last_valid(hidden: jax.Array, valid: jax.Array) -> jax.Array:
    """Each row's hidden state at its last valid token: hidden [B, C, D], valid [B, C] ->
    [B, D] (the first position for a row with none)."""
    last = jnp.maximum(valid.sum(axis=1) - 1, 0)  # [B]
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


last_logits = EntryPoint(
    _last_logits,
    static=("graphdef",),
    donate=("cache",),
    doc="""Jitted prefill chunk: like `step`, but only the logits of each row's last
valid token ([B, V]), which skips the vocabulary projection of every other position.""",
)


def _nll_chunk(weights, cache, tokens, targets, valid, graphdef):
    TRACES["nll_chunk"] += 1
    module = nnx.merge(graphdef, weights)
    hidden, cache = module(cache, tokens, valid)
    logits = module.logits(hidden)  # [V, B, C] float32
    target_logit = jnp.take_along_axis(logits, targets[None], axis=0)[0]
    nll = jax.nn.logsumexp(logits, axis=0) - target_logit  # [B, C]
    return jnp.where(valid, nll, 0.0), cache


nll_chunk = EntryPoint(
    _nll_chunk,
    static=("graphdef",),
    donate=("cache",),
    doc="""Jitted `(weights, cache, tokens [B, C], targets [B, C], valid [B, C]) ->
(nll [B, C] float32, cache)`: -log p(target | the token's view under the contract), 0 where not valid.""",
)
