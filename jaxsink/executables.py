"""The jitted entry points' executables, compiled ahead of time once per process.

`compiled` lowers and compiles an entry point (`jaxsink.traced.entry.EntryPoint`) once per set
of argument shapes, dtypes, pytree structures (the cache's static stream included), shardings and static arguments, and
serves every later call with the same: a second generation or perplexity run in the same
process compiles nothing. Given shardings (a mesh's, `jaxsink.sharding`), it compiles the
entry point with them as `in_shardings` / `out_shardings`.

`use_compilation_cache` keeps compiled executables across processes (the CLIs call it).
"""

from __future__ import annotations

import time

import jax

_EXECUTABLES: dict = {}
XLA_CACHE_BYTES = 8 << 30  # the compilation cache's size limit (least recently used go first)


def use_compilation_cache() -> None:
    """Keep compiled executables across runs in JAX's persistent compilation cache, under
    `$JAXSINK_HOME/compilation-cache` unless the user chose a folder
    (JAX_COMPILATION_CACHE_DIR): the model's layers run unrolled, which takes seconds to compile.

    Processes share the folder. JAX (0.10) writes an entry in place, not by an atomic rename,
    and takes its cross-process file lock around reads and writes only when a cache size limit
    is set; so jaxsink's folder has one, and no process reads an entry another is still
    writing. (An entry cut short by a killed writer fails to decompress: JAX warns and compiles
    again, it never runs it.) JAX's eviction needs an access-time file per entry, which
    entries written without a limit lack: hence a folder of its own, not the older `xla-cache`.
    """
    from jaxsink.paths import jaxsink_home

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(jaxsink_home() / "compilation-cache"))
        if jax.config.jax_compilation_cache_max_size == -1:
            jax.config.update("jax_compilation_cache_max_size", XLA_CACHE_BYTES)


def compiled(fn, name: str, args: tuple, static: dict, shardings=None):
    """AOT-compile entry point `fn` (an `EntryPoint`) for these arguments once per process; returns (executable,
    seconds spent compiling now: 0 when it was compiled before).

    shardings: None (placement follows the arguments), or (in_shardings of `args`,
    out_shardings of the results).
    """
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype, getattr(x, "sharding", None)), args)
    key = (
        name,
        jax.tree.structure(args),
        tuple(jax.tree.leaves(shapes)),
        tuple(sorted(static.items())),
        None if shardings is None else tuple(jax.tree.leaves(shardings)),
    )
    if key in _EXECUTABLES:
        return _EXECUTABLES[key], 0.0
    start = time.perf_counter()
    if shardings is None:
        exe = fn.lower(*args, **static).compile()
    else:
        jitted = fn.with_shardings(*shardings)
        exe = jitted.lower(*args, *(static[s] for s in fn.static)).compile()
    _EXECUTABLES[key] = exe
    return exe, time.perf_counter() - start
