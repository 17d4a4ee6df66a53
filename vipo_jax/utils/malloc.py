"""A cap on glibc's malloc arenas, so that checkpointing does not ratchet up a run's memory.

glibc gives threads their own heaps ("arenas", up to 8 per core) and hands memory freed inside them
back to the OS only from the top of each heap. Orbax's checkpoint writer (TensorStore's thread
pools) allocates and frees the whole train state on every save, interleaved with XLA's buffers:
with the default number of arenas the process's RSS grew by about 3 MB per checkpoint of the toy
run, for as long as the run lasted, while no Python object or jax array accumulated
(``benchmarks/soak.py``; ``benchmarks/RESULTS.md``). With two arenas it stays flat. The cap only
applies to threads that start allocating after it is set, hence its call at the start of
``training.run.train``, before the world and the checkpointer start theirs.
"""

from __future__ import annotations

import ctypes
import os
import sys

#: ``mallopt`` parameter number of ``M_ARENA_MAX`` (glibc ``malloc.h``)
M_ARENA_MAX = -8
#: arenas allowed: the usual setting for many-threaded servers; malloc is not on the hot path of a
#: jax program (XLA's buffers are few and large)
DEFAULT_ARENAS = 2


def limit_malloc_arenas(n: int = DEFAULT_ARENAS) -> bool:
    """Cap glibc's malloc arenas at ``n`` for the threads started from now on; returns whether the cap
    was set. Nothing is changed when ``MALLOC_ARENA_MAX`` is in the environment (the user's setting,
    which glibc applied at start-up) or the C library is not glibc (macOS, musl)."""
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_ARENA_MAX, n) == 1
