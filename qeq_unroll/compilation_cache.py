"""JAX's persistent compilation cache, switched on by one call.

A process compiles each energy function the first time it meets a structure size; with the cache
on, a later process loads the compiled code from disk instead (``benchmarks/bench_first_call.py``:
the first call at 4096 atoms falls from 19 s to 5.4 s). The library never switches it on by itself (it changes
JAX's global configuration); the command line does, unless ``--no-compilation-cache``.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


def default_cache_dir() -> Path:
    """``$QEQ_UNROLL_CACHE_DIR``, else ``$XDG_CACHE_HOME/qeq-unroll/jax`` (``~/.cache/...``)."""
    if os.environ.get("QEQ_UNROLL_CACHE_DIR"):
        return Path(os.environ["QEQ_UNROLL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qeq-unroll" / "jax"


def enable_compilation_cache(path: "str | os.PathLike | None" = None) -> Path:
    """Switch on JAX's persistent compilation cache in ``path`` (None: :func:`default_cache_dir`)
    for every compilation, however short, and return the folder. This sets JAX's global
    configuration for the whole process: call it once, at the start of a program."""
    folder = Path(path) if path is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
