"""Write small legacy-format PyTorch checkpoints without torch, to exercise the loader's edge cases.

``pickle`` only emits a global reference to an object it can import again, so the writer installs
stand-in ``torch`` modules into ``sys.modules`` while it pickles.
"""

from __future__ import annotations

import collections
import pickle
import struct
import sys
import types
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}

_STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}


def _stand_in(module: str, name: str) -> Any:
    obj = type(name, (), {}) if name.endswith("Storage") else (lambda *args: None)
    obj.__module__, obj.__qualname__, obj.__name__ = module, name, name
    return obj


class _FakeTorch:
    def __enter__(self) -> dict[str, Any]:
        torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
        for name in _STORAGE_NAMES.values():
            setattr(torch, name, _stand_in("torch", name))
        vars(utils)["_rebuild_tensor_v2"] = _stand_in("torch._utils", "_rebuild_tensor_v2")
        self.saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
        sys.modules.update({"torch": torch, "torch._utils": utils})
        return {"torch": torch, "utils": utils}

    def __exit__(self, *exc: object) -> None:
        for name, module in self.saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _Tensor:
    """Pickles as torch does: _rebuild_tensor_v2(storage, offset, shape, strides, False, OrderedDict())."""

    def __init__(self, rebuild: Any, key: str, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
        self.args: tuple[Any, ...] = (("storage", key), 0, shape, strides, False, collections.OrderedDict())
        self.rebuild = rebuild

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.rebuild, self.args


def write_checkpoint(path: Path, tensors: dict[str, np.ndarray], *, transpose: bool = False) -> None:
    """Write ``tensors`` as a legacy state dict; with ``transpose``, store each one in reversed-axis memory
    order (as the shipped checkpoint does for its convolution kernels)."""
    with _FakeTorch() as fake, path.open("wb") as file:
        storages: dict[str, tuple[Any, np.ndarray]] = {}
        state = collections.OrderedDict()
        for index, (name, value) in enumerate(tensors.items()):
            key = str(index)
            memory = np.ascontiguousarray(value.T if transpose else value)
            strides = tuple(s // value.itemsize for s in (memory.T.strides if transpose else memory.strides))
            storages[key] = (getattr(fake["torch"], _STORAGE_NAMES[value.dtype]), memory)
            state[name] = _Tensor(fake["utils"]._rebuild_tensor_v2, key, value.shape, strides)

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj: object) -> object:
                if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "storage":
                    storage_type, memory = storages[obj[1]]
                    return ("storage", storage_type, obj[1], "cpu", memory.size, None)
                return None

        for header in (MAGIC_NUMBER, PROTOCOL_VERSION, SYS_INFO):
            pickle.dump(header, file, protocol=2)
        Pickler(file, protocol=2).dump(state)
        pickle.dump(list(storages), file, protocol=2)
        for _, memory in storages.values():
            _write_storage(file, memory)


def _write_storage(file: BinaryIO, memory: np.ndarray) -> None:
    file.write(struct.pack("<q", memory.size))
    file.write(memory.tobytes())
