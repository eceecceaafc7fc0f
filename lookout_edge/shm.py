"""POSIX shared-memory segments, mapped without Python's resource tracker.

`multiprocessing.shared_memory` registers every segment it touches with the resource
tracker, which (before Python 3.13) unlinks segments a process merely attached to when
that process exits. The agent must never unlink a client's segment, so segments are
opened here directly under /dev/shm, which is what shm_open(3) does on Linux.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

__all__ = ["SHM_DIR", "OwnedSegment", "SegmentError", "normalize_name", "with_region"]

SHM_DIR = Path("/dev/shm")
NAME_MAX = 255
T = TypeVar("T")


class SegmentError(ValueError):
    """A shared-memory handle that cannot be used; the message says why and what to do."""


def normalize_name(name: str) -> str:
    """Return the segment's file name: the shm_open name without its leading '/'."""
    bare = name[1:] if name.startswith("/") else name
    if not bare:
        raise SegmentError("shared memory name is empty; pass the name given to shm_open, e.g. '/my_segment'")
    if "/" in bare:
        raise SegmentError(
            f"shared memory name {name!r} contains '/' after the first character; "
            "POSIX names are '/name' with no other slash"
        )
    if bare in (".", "..") or "\0" in bare:
        raise SegmentError(f"shared memory name {name!r} is not a valid segment name")
    if len(bare) > NAME_MAX:
        raise SegmentError(f"shared memory name is {len(bare)} characters long; the limit is {NAME_MAX}")
    return bare


def _open_segment(name: str, writable: bool) -> int:
    bare = normalize_name(name)
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(SHM_DIR / bare, flags)
    except FileNotFoundError:
        raise SegmentError(
            f"shared memory segment '/{bare}' does not exist; create it with shm_open before the call"
        ) from None
    except PermissionError:
        access = "write" if writable else "read"
        raise SegmentError(
            f"the agent may not {access} shared memory segment '/{bare}'; "
            "create it with a mode that lets the agent's user or group "
            f"{access} it (for example 0660 and a shared group)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SegmentError(f"shared memory segment '/{bare}' is a symbolic link; refusing it") from None
        raise SegmentError(f"cannot open shared memory segment '/{bare}': {exc.strerror}") from None


def with_region(
    name: str, offset: int, size: int, use: Callable[[np.ndarray], T], writable: bool = False
) -> T:
    """Map `size` bytes at `offset` of an existing segment, call `use` on them, unmap.

    `use` gets a uint8 array that views the mapping; it must not keep a reference to it
    (or to any view of it) after it returns, because the mapping is closed right after.
    """
    fd = _open_segment(name, writable)
    try:
        segment_size = os.fstat(fd).st_size
        end = offset + size
        if end > segment_size:
            raise SegmentError(
                f"shared memory segment '/{normalize_name(name)}' holds {segment_size} bytes, "
                f"but offset {offset} + size {size} = {end} reaches past its end"
            )
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        region = mmap.mmap(fd, end, mmap.MAP_SHARED, prot)
    finally:
        os.close(fd)
    try:
        return use(np.frombuffer(region, dtype=np.uint8, count=size, offset=offset))
    finally:
        # If `use` raised, its traceback may still hold a view: the mapping is then
        # released with the last view, when the exception is gone.
        with contextlib.suppress(BufferError):
            region.close()


@dataclass
class OwnedSegment:
    """A segment this process created and will unlink: the owner's side of the protocol."""

    name: str
    size: int
    _region: mmap.mmap

    @classmethod
    def create(cls, size: int, prefix: str = "lookout_edge", mode: int = 0o660) -> OwnedSegment:
        """Create a new segment of `size` bytes with a unique name under `prefix`."""
        bare = f"{prefix}_{os.getpid()}_{secrets.token_hex(6)}"
        fd = os.open(SHM_DIR / bare, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask
            os.ftruncate(fd, size)
            region = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(SHM_DIR / bare)
            raise
        finally:
            os.close(fd)
        return cls(name="/" + bare, size=size, _region=region)

    def array(self, size: int | None = None) -> np.ndarray:
        """A writable uint8 view of the first `size` bytes (all by default)."""
        return np.frombuffer(self._region, dtype=np.uint8, count=self.size if size is None else size)

    def close(self) -> None:
        """Unmap and unlink the segment. Views returned by `array` must be gone by then."""
        if self._region.closed:
            return
        self._region.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / normalize_name(self.name))

    def __enter__(self) -> OwnedSegment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
