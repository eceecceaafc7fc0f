"""Keep large request buffers in the heap instead of returning them to the kernel.

Every `byte_data` request allocates several buffers of the image's size (gRPC's receive
buffer, the Python bytes object, ...). glibc serves allocations that large with fresh
mmap()s and unmaps them when freed, so every call pays page faults and zeroing for each
buffer: measured at about 20 ms of agent CPU per 1920x1080 request on a 2-core VM, against
6 to 10 ms once those buffers are recycled from the heap. Raising glibc's mmap and trim
thresholds makes freed buffers reusable; the price is that the heap keeps up to
`TRIM_THRESHOLD` of free memory instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Above the largest bitmap (4096 x 4096 x 3 = 48 MiB), so that every request buffer is recyclable.
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20


def _glibc_function(name: str) -> Any:
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


def recycle_large_buffers() -> bool:
    """Apply the thresholds; returns False where the C library is not glibc (nothing changes)."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        log.info("mallopt is not available; large request buffers are not recycled")
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> None:
    """Hand free heap memory back to the kernel (glibc's malloc_trim), e.g. after a model is
    unloaded: with the raised trim threshold, glibc would otherwise keep it."""
    trim = _glibc_function("malloc_trim")
    if trim is not None:
        trim(0)
