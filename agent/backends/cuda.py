"""The GPU boundary: what NVIDIA GPU the device has, and device memory for the native TensorRT
backend, through the CUDA runtime library (ctypes).

Nothing here needs a Python CUDA package: JetPack and CUDA installs ship `libcudart.so`. Where
it is missing or finds no device, `probe()` returns None and the agent serves on the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import weakref
from dataclasses import dataclass
from functools import cache

_LIBRARIES = ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so.10.2")
_COMPUTE_MAJOR, _COMPUTE_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor/Minor


class CudaError(RuntimeError):
    """A CUDA runtime call failed; `out_of_memory` tells cudaErrorMemoryAllocation apart."""

    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} failed with CUDA error {code}")
        self.out_of_memory = code == 2


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    free_bytes: int
    total_bytes: int


@cache
def _runtime() -> ctypes.CDLL | None:
    names = [*_LIBRARIES, ctypes.util.find_library("cudart") or ""]
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _check(call: str, code: int) -> None:
    if code != 0:
        raise CudaError(call, code)


def probe() -> GpuInfo | None:
    """Device 0, or None without the CUDA runtime or a device."""
    lib = _runtime()
    if lib is None:
        return None
    count = ctypes.c_int(0)
    if lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    _check("cudaDeviceGetAttribute", lib.cudaDeviceGetAttribute(ctypes.byref(major), _COMPUTE_MAJOR, 0))
    _check("cudaDeviceGetAttribute", lib.cudaDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_MINOR, 0))
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    _check("cudaMemGetInfo", lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)))
    return GpuInfo(
        f"CUDA device 0 (sm_{major.value}{minor.value})", (major.value, minor.value), free.value, total.value
    )


class DeviceBuffer:
    """One cudaMalloc'd buffer; `free()` returns it to the GPU.

    cudaFree runs exactly once: at `free()`, or when the buffer is dropped without it (a backend
    that was never closed), so a lost buffer cannot keep GPU memory for the rest of the process.
    """

    def __init__(self, size: int) -> None:
        lib = _runtime()
        if lib is None:
            raise CudaError("loading libcudart", -1)
        self._lib = lib
        self.size = size
        pointer = ctypes.c_void_p()
        _check("cudaMalloc", lib.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(size)))
        self.pointer = pointer
        self._free = weakref.finalize(self, lib.cudaFree, pointer)
        self._free.atexit = False  # the driver frees a process's memory when it exits

    def upload(self, host: bytes | memoryview) -> None:
        _check("cudaMemcpy", self._lib.cudaMemcpy(self.pointer, bytes(host), ctypes.c_size_t(len(host)), 1))

    def download(self, host: ctypes.Array[ctypes.c_char]) -> None:
        _check("cudaMemcpy", self._lib.cudaMemcpy(host, self.pointer, ctypes.c_size_t(self.size), 2))

    def free(self) -> None:
        self._free()  # a finalizer runs once: later calls, and the drop, do nothing
        self.pointer = ctypes.c_void_p()
