"""Memory a request needs against what the machine has: an oversized window, dense stream or
model is refused before anything is allocated, never silently shrunk."""

from __future__ import annotations

import os

import numpy as np

from jaxsink.config import ConfigError, ModelConfig, StreamConfig

HEADROOM = 0.9  # the share of the available memory one request may take


def host_memory() -> int:
    """This machine's physical memory in bytes, 0 when it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def available_bytes() -> int | None:
    """Bytes free for new buffers: on an accelerator its limit minus what is in use, else the
    host's MemAvailable (reclaimable page cache counts as free); None when unknown."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: int, what: str, advice: str) -> None:
    """Raise ConfigError "`what` needs N GiB, more than this machine has available (M GiB):
    `advice`" when `need` bytes exceed the available memory's headroom."""
    avail = available_bytes()
    if avail is not None and need > HEADROOM * avail:
        raise ConfigError(
            f"{what} needs {_gib(need)}, more than this machine has available "
            f"({_gib(avail)}): {advice}"
        )


def cache_bytes_at_least(cfg: ModelConfig, stream: StreamConfig, batch: int, itemsize: int) -> int:
    """A lower bound of the cache's bytes, in closed form: the full layers' keys and values
    over the stream's capacity (the exact figure, `cache.cache_bytes`, builds every block's
    shape, which for an absurd window would itself take forever)."""
    return batch * stream.capacity * cfg.cache_bytes_per_token(itemsize)


def check_cache_fits(cfg: ModelConfig, stream: StreamConfig, batch: int, dtype) -> None:
    """Refuse a cache of `stream` that would not fit in this machine's memory, naming the flag
    that sets its size."""
    from jaxsink.traced import cache as kv

    itemsize = np.dtype(dtype).itemsize
    what = _describe(stream, batch)
    advice = _advice(stream)
    check_fits(cache_bytes_at_least(cfg, stream, batch, itemsize), what, advice)
    check_fits(kv.cache_bytes(cfg, stream, batch, dtype), what, advice)


def check_run_fits(cfg: ModelConfig, dtype, streams: list[StreamConfig], batch: int = 1) -> None:
    """Refuse, before the weights are loaded, a run whose weights (at the run-time numpy
    `dtype`) and largest cache would not fit in this machine's memory."""
    from jaxsink.layout import abstract, param_bytes

    itemsize = np.dtype(dtype).itemsize
    for stream in streams:
        check_cache_fits(cfg, stream, batch, dtype)
    weights = param_bytes(abstract(cfg, dtype)[1])  # quantized weights at their own sizes
    cache = max(cache_bytes_at_least(cfg, s, batch, itemsize) for s in streams)
    check_fits(
        weights + cache,
        f"the model's weights ({_gib(weights)} in {np.dtype(dtype).name}) and its cache",
        "use a smaller model, bfloat16 (--dtype bfloat16) or a smaller --window",
    )


def _describe(stream: StreamConfig, batch: int) -> str:
    rows = f" for {batch} streams" if batch > 1 else ""
    if stream.mode == "dense":
        return f"a dense cache of {stream.capacity} tokens{rows}"
    flags = f"--sinks {stream.sinks} --window {stream.window}"
    if stream.mode == "window":
        flags = "--sinks + --window"
    return f"a {stream.mode} cache of {stream.capacity} slots{rows} ({flags})"


def _advice(stream: StreamConfig) -> str:
    if stream.mode == "dense":
        return "use sink mode, or fewer tokens (--n-tokens, --max-new-tokens)"
    return "use a smaller --window"


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
