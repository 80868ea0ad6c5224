"""The policies section: decode tok/s of B = 1 and B = 16 streams under each eviction policy
(`--policy sink|tova|h2o`) at the same K, interleaved; the ratios to `sink` are the figures.
Then one layer's cache at the widest batch, timed alone: what the attention read costs, what
rotating the keys by their ranks adds (as an evicting layer does at every step), and the two
passes a re-rotation of stored keys would be held to, against the per-layer time a 0.8x target
leaves (`layer_costs`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from measure import seconds

from benchmarks.harness import Harness, log
from benchmarks.sizes import SINKS, WINDOW
from jaxsink import config as C
from jaxsink.config import POLICIES, StreamConfig
from jaxsink.traced import attention
from jaxsink.traced import cache as kv
from jaxsink.traced.rope import rotary_table, rotate

TARGET = 0.8  # the decode speed an evicting policy is asked to keep, relative to sink


def run(h: Harness) -> dict:
    """The policies section."""
    sz, net = h.sizes, h.net
    steps = sz["batch_steps"]
    streams = {p: StreamConfig.for_mode("sink", SINKS, WINDOW, policy=p) for p in POLICIES}
    batches = (1, max(sz["batches"]))
    setups = {
        (B, p): h.decode_setup(net, stream, B, sz["batch_prompt"], steps, net.dtype)
        for B in batches
        for p, stream in streams.items()
    }
    runs: dict = {key: [] for key in setups}
    for _ in range(2 * h.repeats):  # every setup in each round: ratios of the same load
        for key, timer in setups.items():
            runs[key].append(timer())
    out = []
    for B in batches:
        sink = min(runs[B, "sink"])
        for p, stream in streams.items():
            best = min(runs[B, p])
            out.append(
                {
                    "batch": B,
                    "policy": p,
                    "aggregate_tok_s": B * steps / best,
                    "ms_per_step": best / steps * 1e3,
                    "vs_sink": sink / best,
                    "cache_bytes": kv.cache_bytes(net.cfg, stream, B, net.dtype),
                }
            )
            log(f"policies B={B} {p}: {B * steps / best:.1f} tok/s, {sink / best:.2f}x sink")
            h.row(
                "policies",
                f"decode, B={B}, --policy {p}",
                f"{B * steps / best:.1f} tok/s",
                f"{best / steps * 1e3:.1f} ms/step; {sink / best:.2f}x sink",
            )
    widest = max(batches)
    layers = layer_costs(h, widest, min(runs[widest, "sink"]) / steps * 1e3)
    return {
        "by_policy": out,
        "layer_costs": layers,
        "steps_timed": steps,
        "note": f"sink mode K = {SINKS + WINDOW}, each row prefilled with its own "
        f"{sz['batch_prompt']} random tokens (a decode step's cost does not depend on whether "
        "the cache is full: every slot is read and the eviction computed either way); every "
        "setup timed in each round, best round",
    }


def layer_costs(h: Harness, batch: int, sink_ms_per_step: float) -> dict:
    """One full layer's keys and values ([batch, kv heads, H, K], [batch, kv heads, K, H] in
    the run's dtype, K = S + W, ranks a permutation of 0 .. K-1 per row), each computation
    jitted alone and timed (best of `h.repeats` rounds of 20 calls), in ms:
      - attention: the read of one query per row over the block (`attention.read_block`,
        the form sink decode runs);
      - at_ranks: the keys rotated by their ranks (`attention.at_ranks`), which an evicting
        layer adds to every step, and attention_at_ranks the two together;
      - elementwise_pass: the keys times a constant, in place (donated): the least any pass
        over the keys costs;
      - rerotate_masked: the keys after an eviction, those of a later rank turned back one
        position, in place as far as XLA manages it: what re-rotating stored keys would add.
    budget_ms is the time per layer that TARGET leaves beside sink's step."""
    spec = next(s.attention for s in h.net.cfg.layers if s.attention.position is not None)
    position = spec.position
    if not isinstance(position, C.Rotary):
        return {"skipped": "the model's layers carry no rotary positions"}
    dtype, slots = h.net.dtype, SINKS + WINDOW
    kv_heads, group, dim = spec.num_kv_heads, spec.group, spec.head_dim
    rng = np.random.default_rng(0)
    keys = jnp.asarray(rng.standard_normal((batch, kv_heads, dim, slots)), dtype)
    values = jnp.asarray(rng.standard_normal((batch, kv_heads, slots, dim)), dtype)
    q = jnp.asarray(rng.standard_normal((batch, kv_heads, 1, 1, group, dim)), dtype)
    seen = jnp.ones((batch, 1, 1, slots), bool)
    ranks = jnp.asarray(np.stack([rng.permutation(slots) for _ in range(batch)]), jnp.int32)
    table = jnp.asarray(rotary_table(slots + 1, position), dtype)
    back = rotary_table(2, position, scaled=False)[1]  # [2, R/2]: one position
    one_back = (jnp.asarray(back[0], dtype)[:, None], jnp.asarray(-back[1], dtype)[:, None])

    def read(keys):
        return attention.read_block(q, keys, values, seen, None, spec.softcap)

    def rerotate(keys, ranks):
        moved = (ranks > ranks[:, :1])[:, None, None, :]  # later than an evicted slot
        return jnp.where(moved, rotate(keys, one_back, position, axis=2).astype(keys.dtype), keys)

    def ranked(k, t, r):
        return attention.at_ranks(k, t, r, position)

    cases = {  # name: (a function of the keys and more arguments, those arguments, in place)
        "attention": (read, (), False),
        "at_ranks": (ranked, (table, ranks), False),
        "attention_at_ranks": (lambda k, t, r: read(ranked(k, t, r)), (table, ranks), False),
        "elementwise_pass": (lambda k: k * jnp.asarray(1.0001, k.dtype), (), True),
        "rerotate_masked": (rerotate, (ranks,), True),
    }
    best = {name: _best_ms(h, keys, *case) for name, case in cases.items()}
    n_layers = h.net.cfg.num_layers
    budget = (1 / TARGET - 1) * sink_ms_per_step / n_layers
    for name, ms in best.items():
        log(f"policies layer, B={batch}: {name} {ms:.3f} ms")
    h.row(
        "policies",
        f"one layer, B={batch}: rotation by ranks / budget at {TARGET}x",
        f"{best['at_ranks']:.2f} / {budget:.2f} ms",
        f"attention {best['attention']:.2f} ms, with the rotation "
        f"{best['attention_at_ranks']:.2f}; re-rotation {best['rerotate_masked']:.2f} "
        f"(an elementwise pass {best['elementwise_pass']:.2f})",
    )
    return {
        "batch": batch,
        "slots": slots,
        "ms": best,
        "budget_ms": budget,
        "layers": n_layers,
        "note": f"one layer's cache timed alone (it may stay in the last-level cache, where a "
        f"step's {n_layers} layers do not); budget: (1/{TARGET} - 1) x sink's ms per step at "
        "this batch / layers",
    }


def _best_ms(h: Harness, keys, fn, more: tuple, in_place: bool, calls: int = 20) -> float:
    """The best ms per call of fn(keys, *more) jitted, over `h.repeats` rounds of `calls`
    calls after a warm-up; in_place: the keys donated, each call's result the next's keys."""
    jitted = jax.jit(fn, donate_argnums=(0,) if in_place else ())
    state = [jnp.array(keys)]  # a copy: donation deletes it

    def run():
        for _ in range(calls):
            out = jitted(state[0], *more)
            if in_place:
                state[0] = out
        return out

    run()
    return min(seconds(run) for _ in range(h.repeats)) / calls * 1e3
