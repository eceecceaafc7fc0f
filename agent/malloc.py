"""Keep large request buffers in the heap instead of returning them to the kernel.

Every `byte_data` request allocates several buffers of the image's size (gRPC's receive
buffer, the Python bytes object, ...). glibc serves allocations that large with fresh
mmap()s and unmaps them when freed, so every call pays page faults and zeroing for each
buffer: measured at about 20 ms of agent CPU per 1920x1080 request on a 2-core VM, against
6 to 10 ms once those buffers are recycled from the heap. Raising glibc's mmap and trim
thresholds makes freed buffers reusable; the price is that the heap keeps up to
`TRIM_THRESHOLD` of free memory instead of returning it.

glibc also gives threads arenas of their own (up to 8 per core), and each arena keeps the
buffers its threads freed. gRPC's worker threads and the model-loading threads then hold
several copies of that memory: with one 1920x1080 model running after the benchmark's calls,
the agent's resident memory was 294 MB with glibc's default and 239 MB with two arenas, at the
same latencies (`bench/bench_agent.py`, 2-core VM). A MALLOC_ARENA_MAX set in the environment
is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENA_MAX = 2
# Above the largest bitmap (4096 x 4096 x 3 = 48 MiB), so that every request buffer is recyclable.
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20


def _glibc_function(name: str) -> Any:
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def tune_malloc() -> bool:
    """Apply the thresholds and the arena limit, before the process starts threads; returns
    False where the C library is not glibc (nothing changes)."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        log.info("mallopt is not available; large request buffers are not recycled")
        return False
    settings = [(M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    if "MALLOC_ARENA_MAX" not in os.environ:
        settings.append((M_ARENA_MAX, ARENA_MAX))
    return all(mallopt(option, value) for option, value in settings)


def release_free_memory() -> None:
    """Hand free heap memory back to the kernel (glibc's malloc_trim), e.g. after a model is
    unloaded: with the raised trim threshold, glibc would otherwise keep it."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)
