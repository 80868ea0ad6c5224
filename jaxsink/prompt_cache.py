"""A prompt cache of stream states: the rows' whole states after given token-id prefixes, kept
in host memory and restored into a row instead of feeding those tokens again.

A sink stream's state after any prefix is a bounded object (`engine.RowState`: the sinks, the
ring, the position, the next-token logits), exact for a prefix of any length, so an entry of a
100k-token conversation takes the same bytes as one of a 1k-token conversation. An entry keeps
only the slots its tokens fill (the first min(n, K) of each layer's cache: token t < K sits in
slot t), so a short prompt's entry is small too; the empty slots come back as zeros, which no
query sees. Entries are keyed by the exact token ids their stream consumed: a state reaches
another request only when its ids are a true prefix of that request's, so one conversation's
state never reaches another that merely shares some text. The cache is a least-recently-used
map bounded in bytes.

This is the same kind of object a parked session or a saved stream keeps (`Engine.export`); the
prompt cache indexes such states by what they consumed instead of by a session's name.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jaxsink.engine import RowState
from jaxsink.memory import host_memory
from jaxsink.traced import cache as kv


def trimmed(state: RowState) -> RowState:
    """`state` keeping only the cache slots its tokens fill."""

    def cut(x, axis, used, _):
        return np.take(np.asarray(x), np.arange(used), axis=axis)  # a copy of those slots only

    layers = kv.with_first_slots(state.cache.layers, state.index, cut)
    return dataclasses.replace(state, cache=state.cache.replace(layers=layers))


def padded(state: RowState) -> RowState:
    """A `trimmed` state with its empty slots back, as zeros: the engine's layout."""

    def pad(x, axis, _, n):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, n - x.shape[axis])
        return np.pad(x, widths)

    layers = kv.with_first_slots(state.cache.layers, state.index, pad)
    return dataclasses.replace(state, cache=state.cache.replace(layers=layers))


def state_bytes(state: RowState) -> int:
    """The host bytes a state holds: its cache's arrays, logits and key."""
    leaves = jax.tree.leaves(state.cache.layers)
    return sum(np.asarray(x).nbytes for x in leaves) + state.logits.nbytes + state.key.nbytes


def default_bytes() -> int:
    """The default bound: an eighth of this machine's physical memory (2-3 GiB on a 16-24 GiB
    machine: dozens of SmolLM2 streams of 1,024 slots in float32, 47 MB each), or 1 GiB
    where the memory cannot be read."""
    return host_memory() // 8 or 1 << 30


@dataclasses.dataclass
class Hit:
    """A cached state whose ids are a prefix of a request's: `tokens` of them."""

    tokens: int
    state: RowState


class PromptCache:
    """Stream states keyed by the token ids they consumed, least recently used evicted first
    once their bytes exceed `max_bytes` (0: nothing is ever kept)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the prompt cache's bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[RowState, int]] = (
            collections.OrderedDict()
        )
        self._lengths: collections.Counter[int] = collections.Counter()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ids: Sequence[int]) -> bool:
        return tuple(ids) in self._entries

    def lookup(self, ids: Sequence[int]) -> Hit | None:
        """The state of the longest cached prefix of `ids` (the whole of `ids` included), now
        the most recently used; None when no cached key is a prefix."""
        ids = tuple(ids)
        for n in sorted(self._lengths, reverse=True):
            key = ids[:n]
            if n <= len(ids) and key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return Hit(n, padded(self._entries[key][0]))
        self.misses += 1
        return None

    def touch(self, ids: Sequence[int]) -> bool:
        """Mark the entry of exactly `ids` used; whether there is one (then storing it again
        is not needed)."""
        key = tuple(ids)
        if key not in self._entries:
            return False
        self._entries.move_to_end(key)
        return True

    def store(self, ids: Sequence[int], state: RowState) -> None:
        """Keep `state`, the stream after exactly `ids`, evicting the least recently used
        entries until the bound holds; a state larger than the bound is not kept."""
        key = tuple(ids)
        state = trimmed(state)
        size = state_bytes(state)
        if not key or size > self.max_bytes:
            return
        self._drop(key)
        self._entries[key] = (state, size)
        self._lengths[len(key)] += 1
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def _drop(self, key: tuple[int, ...]) -> None:
        if key in self._entries:
            _, size = self._entries.pop(key)
            self.bytes -= size
            self._lengths[len(key)] -= 1
            if not self._lengths[len(key)]:
                del self._lengths[len(key)]

    def stats(self) -> dict:
        return {
            "prompt_cache_entries": len(self._entries),
            "prompt_cache_bytes": self.bytes,
            "prompt_cache_max_bytes": self.max_bytes,
            "prompt_cache_hits": self.hits,
            "prompt_cache_misses": self.misses,
            "prompt_cache_evictions": self.evictions,
        }
