"""POSIX shared-memory segments: the caller's side (`OwnedSegment`) and the agent's (`Region`).

`multiprocessing.shared_memory` registers every segment it touches with the resource
tracker, which (before Python 3.13) unlinks segments a process merely attached to when
that process exits. The agent must never unlink a client's segment, so segments are
opened here directly under /dev/shm, which is what shm_open(3) does on Linux.

The agent never maps a caller's segment. A mapped page that the caller truncates away, or that
a full tmpfs cannot back, raises SIGBUS, which kills a Python process; so `Region` copies the
image into the agent's memory with pread(2) and writes the mask with pwrite(2), where the same
faults are a short read or ENOSPC: clean errors. It opens only regular files, non-blocking (a
FIFO or a directory under the name is refused, never waited on), and only segments whose mode
lets the agent's callers use them themselves (see `Region.open`, docs/agent.md#security).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import mmap
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookout_edge.files import NotRegularFile, open_regular

__all__ = [
    "SHM_DIR",
    "OwnedSegment",
    "Region",
    "SegmentAccess",
    "SegmentError",
    "SegmentFull",
    "normalize_name",
]

SHM_DIR = Path("/dev/shm")
NAME_MAX = 255


class SegmentError(ValueError):
    """A shared-memory handle that cannot be used; the message says why and what to do."""


class SegmentFull(SegmentError):
    """The shared-memory filesystem has no space left for the pages a write needs."""


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


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class Region:
    """`size` bytes at `offset` of a caller's segment, checked and open for one call."""

    def __init__(self, fd: int, name: str, offset: int, size: int) -> None:
        self._fd, self.name, self.offset, self.size = fd, name, offset, size

    @classmethod
    def open(cls, name: str, offset: int, size: int, writable: bool, access: SegmentAccess | None) -> Region:
        """Open and check a region; SegmentError says what is wrong and what to do. `access`
        says whose segments the agent may use on its callers' behalf; None: any it can open."""
        bare = normalize_name(name)
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW
        wanted = "write" if writable else "read"
        try:
            fd, info = open_regular(SHM_DIR / bare, flags)
        except NotRegularFile:
            raise SegmentError(
                f"'/{bare}' is not a shared memory segment (a FIFO, directory or device has that name); "
                "create the segment with shm_open"
            ) from None
        except FileNotFoundError:
            raise SegmentError(
                f"shared memory segment '/{bare}' does not exist; create it with shm_open before the call"
            ) from None
        except PermissionError:
            raise SegmentError(
                f"the agent may not {wanted} shared memory segment '/{bare}'; create it with a mode that "
                f"lets the agent's user or group {wanted} it (for example 0660 and a shared group)"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SegmentError(
                    f"shared memory segment '/{bare}' is a symbolic link; refusing it"
                ) from None
            raise SegmentError(f"cannot open shared memory segment '/{bare}': {exc.strerror}") from None
        try:
            if access is not None:
                access.check(bare, info, writable)
            if offset + size > info.st_size:
                raise SegmentError(
                    f"shared memory segment '/{bare}' holds {info.st_size} bytes, "
                    f"but offset {offset} + size {size} = {offset + size} reaches past its end"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, "/" + bare, offset, size)

    def read(self) -> np.ndarray:
        """The region's bytes, copied into a new uint8 array."""
        out = np.empty(self.size, dtype=np.uint8)
        view = out.data
        done = 0
        while done < self.size:
            try:
                count = os.preadv(self._fd, [view[done:]], self.offset + done)
            except OSError as exc:
                raise SegmentError(
                    f"reading shared memory segment '{self.name}' failed: {exc.strerror}"
                ) from None
            if count == 0:
                raise SegmentError(
                    f"shared memory segment '{self.name}' was truncated to {self.offset + done} bytes "
                    "while the agent read it; keep the segment's size while a call uses it"
                )
            done += count
        return out

    def write(self, data: np.ndarray) -> None:
        """Write `data` (exactly `size` bytes) into the region."""
        view = np.ascontiguousarray(data).reshape(-1).data.cast("B")
        if len(view) != self.size:
            raise ValueError(f"{len(view)} bytes for a region of {self.size}")
        done = 0
        while done < self.size:
            try:
                done += os.pwrite(self._fd, view[done:], self.offset + done)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise SegmentFull(
                        f"no space left to write the mask into shared memory segment '{self.name}': the "
                        "shared-memory filesystem is full; free space in /dev/shm or write the segment's "
                        "mask area once when creating it, so that its pages exist"
                    ) from None
                raise SegmentError(
                    f"writing shared memory segment '{self.name}' failed: {exc.strerror}"
                ) from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Region:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class SegmentAccess:
    """Which segments the agent uses for callers it cannot tell apart.

    gRPC does not tell the agent who is calling: anyone who can connect to its socket may name
    any segment. So the agent uses a segment only if every such caller could use it directly:
    the segment grants the access to everyone, or to `callers_gid` (the socket's group), or it
    belongs to `owner`, the agent's own user when that is not root (Greengrass runs the agent
    and its client components as the same user, and the guide's samples create 0600 segments).
    A caller can never make the agent read or overwrite another user's, or root's, segment.
    """

    callers_gid: int
    owner: int | None

    @classmethod
    def for_socket(cls, socket: os.stat_result) -> SegmentAccess | None:
        """The rule for the callers of a socket with this status; None (any segment the agent can
        open) when the socket admits its owner alone, whose callers are that user and root."""
        if not socket.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            return None
        euid = os.geteuid()
        return cls(socket.st_gid, None if euid == 0 else euid)

    def check(self, bare: str, info: os.stat_result, writable: bool) -> None:
        group_bit, other_bit = (stat.S_IWGRP, stat.S_IWOTH) if writable else (stat.S_IRGRP, stat.S_IROTH)
        if info.st_mode & other_bit or info.st_uid == self.owner:
            return
        if info.st_gid == self.callers_gid and info.st_mode & group_bit:
            return
        access = "write" if writable else "read"
        callers = _group_name(self.callers_gid)
        raise SegmentError(
            f"shared memory segment '/{bare}' (mode {stat.S_IMODE(info.st_mode):04o}, group "
            f"{_group_name(info.st_gid)}) does not let the agent's callers (group {callers}) {access} it; "
            f"the agent uses only segments its callers could {access} themselves: create it with "
            f"mode 0660 and group {callers}"
        )


@dataclass
class OwnedSegment:
    """A segment this process created and will unlink: the owner's side of the protocol."""

    name: str
    size: int
    _region: mmap.mmap

    @classmethod
    def create(
        cls, size: int, prefix: str = "lookout_edge", mode: int = 0o660, group: int | None = None
    ) -> OwnedSegment:
        """Create a new segment of `size` bytes with a unique name under `prefix`, owned by
        `group` if given (the agent's socket group, so that the agent will use it)."""
        bare = f"{prefix}_{os.getpid()}_{secrets.token_hex(6)}"
        fd = os.open(SHM_DIR / bare, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)  # not narrowed by the umask
            if group is not None:
                os.fchown(fd, -1, group)
            # Allocated, not sparse: on a full /dev/shm creation fails here, not a later write.
            os.posix_fallocate(fd, 0, size)
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
