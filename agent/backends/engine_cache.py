"""On-disk cache of built TensorRT engines, so that a restart does not rebuild them.

An entry is keyed by the model's SHA-256, the TensorRT version, the GPU's compute capability and
the precision. Each file carries a header with its key and the payload's size and SHA-256; an
entry whose header, key or digest does not match is deleted and rebuilt, never handed to
TensorRT. Entries are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
MAGIC = b"LOOKOUT-EDGE-TRT-ENGINE\n"
Engine = TypeVar("Engine")


@dataclass(frozen=True)
class EngineKey:
    model_sha256: str
    tensorrt_version: str
    compute_capability: str  # "7.2"
    precision: str  # "fp16" or "fp32"

    def file_name(self) -> str:
        version, capability = self.tensorrt_version, self.compute_capability
        return f"{self.model_sha256}-trt{version}-sm{capability}-{self.precision}.engine"


class EngineCache:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, key: EngineKey) -> Path:
        return self.directory / key.file_name()

    def read(self, key: EngineKey) -> bytes | None:
        """The cached engine bytes, or None (absent, or corrupt and now deleted)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        payload = _payload(data, key)
        if payload is None:
            log.warning("engine cache entry %s is corrupt or not for this key; rebuilding it", path)
            path.unlink(missing_ok=True)
        return payload

    def write(self, key: EngineKey, engine: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        header = json.dumps(
            {"key": asdict(key), "size": len(engine), "sha256": hashlib.sha256(engine).hexdigest()},
            sort_keys=True,
        ).encode()
        handle, temporary = tempfile.mkstemp(prefix=".engine-", dir=self.directory)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(MAGIC + len(header).to_bytes(4, "big") + header + engine)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def load_or_build(
        self,
        key: EngineKey,
        build: Callable[[], bytes],
        deserialize: Callable[[bytes], Engine | None],
    ) -> Engine:
        """A cached engine if one deserializes, else a freshly built (and cached) one."""
        cached = self.read(key)
        if cached is not None:
            engine = deserialize(cached)
            if engine is not None:
                log.info("using cached TensorRT engine %s", self.path(key))
                return engine
            log.warning("cached TensorRT engine %s does not deserialize; rebuilding it", self.path(key))
            self.path(key).unlink(missing_ok=True)
        serialized = build()
        engine = deserialize(serialized)
        if engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine it has just built")
        try:
            self.write(key, serialized)
        except OSError as exc:  # a read-only or full disk costs a rebuild next time, nothing more
            log.warning("cannot cache the TensorRT engine in %s: %s", self.directory, exc)
        return engine


def _payload(data: bytes, key: EngineKey) -> bytes | None:
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        return None
    start = len(MAGIC) + 4
    length = int.from_bytes(data[len(MAGIC) : start], "big")
    try:
        header = json.loads(data[start : start + length])
    except ValueError:
        return None
    payload = data[start + length :]
    if not isinstance(header, dict) or header.get("key") != asdict(key):
        return None
    if header.get("size") != len(payload) or header.get("sha256") != hashlib.sha256(payload).hexdigest():
        return None
    return payload
