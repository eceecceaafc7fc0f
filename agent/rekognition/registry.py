"""What the endpoint itself creates, persisted: projects made by CreateProject and versions made
by CreateProjectVersion (their ARNs, training status and request), in one small JSON file of the
models directory. The file is rewritten atomically (temporary file, fsync, rename), so a crash
leaves the previous or the new registry, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REGISTRY_NAME = ".rekognition-registry.json"  # hidden: package_dirs ignores it
FORMAT_VERSION = 1


class RegistryError(ValueError):
    """A registry file that cannot be read; the message names it."""


@dataclass(frozen=True)
class ProjectRecord:
    name: str
    arn: str
    created: datetime


@dataclass(frozen=True)
class VersionRecord:
    """A version trained by the endpoint; `request` holds its CreateProjectVersion parameters."""

    project: str
    version_name: str
    arn: str
    created: datetime
    status: str  # TRAINING_IN_PROGRESS, TRAINING_COMPLETED or TRAINING_FAILED
    status_message: str
    request: dict[str, Any] = field(default_factory=dict)
    training_ended: datetime | None = None
    package_dir: str | None = None  # the package's directory name in the models directory
    summary: dict[str, str] | None = None  # the evaluation summary's S3Object, once copied there


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _json(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    raise TypeError(type(value).__name__)


class Registry:
    """The registry file of one models directory; thread-safe."""

    def __init__(self, models_dir: Path) -> None:
        self.path = models_dir / REGISTRY_NAME
        self._lock = threading.Lock()
        self._projects: dict[str, ProjectRecord] = {}
        self._versions: dict[tuple[str, str], VersionRecord] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{self.path} cannot be read: {exc}; move it away to start afresh") from None
        try:
            for item in data["projects"]:
                self._projects[item["name"]] = ProjectRecord(
                    item["name"], item["arn"], _time(item["created"])
                )
            for item in data["versions"]:
                item = {
                    **item,
                    "created": _time(item["created"]),
                    "training_ended": item.get("training_ended") and _time(item["training_ended"]),
                }
                record = VersionRecord(**item)
                self._versions[(record.project, record.version_name)] = record
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"{self.path} is not a registry of this endpoint ({exc!r})") from None

    def _save(self) -> None:
        document = {
            "format_version": FORMAT_VERSION,
            "projects": [asdict(record) for record in self._projects.values()],
            "versions": [asdict(record) for record in self._versions.values()],
        }
        content = json.dumps(document, indent=2, default=_json).encode()
        fd, staging = tempfile.mkstemp(prefix=f"{REGISTRY_NAME}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, self.path)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise

    def projects(self) -> list[ProjectRecord]:
        with self._lock:
            return list(self._projects.values())

    def versions(self) -> list[VersionRecord]:
        with self._lock:
            return list(self._versions.values())

    def add_project(self, record: ProjectRecord) -> bool:
        """Record a new project; False (and no change) when one of that name exists."""
        with self._lock:
            if record.name in self._projects:
                return False
            self._projects[record.name] = record
            self._save()
            return True

    def add_version(self, record: VersionRecord) -> bool:
        """Record a new version; False (and no change) when its project has one of that name."""
        with self._lock:
            if (record.project, record.version_name) in self._versions:
                return False
            self._versions[(record.project, record.version_name)] = record
            self._save()
            return True

    def update_version(self, record: VersionRecord, **changes: Any) -> VersionRecord:
        with self._lock:
            updated = replace(self._versions[(record.project, record.version_name)], **changes)
            self._versions[(record.project, record.version_name)] = updated
            self._save()
            return updated
