"""Model packages: a directory with `manifest.json` and the ONNX graph it describes.

The format is documented in docs/model-package.md. Reading a manifest never raises on
bad content in a way that can reach the gRPC layer: `read_package` turns every problem
into a `PackageError` whose message names the file and what to fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lookout_edge.files import NotRegularFile, open_regular

__all__ = [
    "MANIFEST_NAME",
    "AnomalyLabel",
    "ModelPackage",
    "PackageError",
    "SelfCheck",
    "SelfCheckReference",
    "find_package",
    "package_dirs",
    "read_package",
    "write_package",
]

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
MODEL_TYPES = ("classification", "segmentation")
# Custom Labels models (lookout_edge/custom_labels.py) share the format but not the Edge Agent.
LABEL_MODEL_TYPES = ("image-classification", "multi-label-classification", "object-localisation")
MIN_SIDE = 64
MAX_SIDE = 4096
BACKGROUND_NAME = "background"
BACKGROUND_COLOR = "#FFFFFF"
_HEX_COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")
_LABEL_VALUE = re.compile(r"[0-9]{1,3}")
# Entries of a models directory whose names start with this are packages being written.
STAGING_PREFIX = "."
# The optional manifest key of the self-check (docs/model-package.md, "Self-check").
SELF_CHECK_KEY = "self_check"
MAX_SELF_CHECK_REFERENCES = 8
# A manifest is a few KiB; anything much larger is not one, and is not read into memory.
MAX_MANIFEST_BYTES = 1 << 20


class PackageError(ValueError):
    """A model package that cannot be served; the message says what is wrong."""


@dataclass(frozen=True)
class AnomalyLabel:
    name: str
    color: str  # "#RRGGBB"

    @property
    def rgb(self) -> tuple[int, int, int]:
        value = int(self.color[1:], 16)
        return (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF


@dataclass(frozen=True)
class PackageFile:
    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class SelfCheckReference:
    """One reference input of the self-check and the outputs the trainer measured on it."""

    file: PackageFile  # a PNG, RGB, at the package's image size
    image: str  # the training image it was taken from, for messages
    anomaly_score: float
    anomalous: bool  # the verdict at the self-check's threshold
    # Segmentation: label value (1 = the first label) -> fraction of the label map's pixels with it.
    label_fractions: dict[int, float] | None


@dataclass(frozen=True)
class SelfCheck:
    """The manifest's `self_check`: reference inputs the agent runs before serving the model."""

    threshold: float  # the threshold the recorded verdicts were taken at
    measured_with: str  # the runtime that measured them, e.g. "onnxruntime 1.32.0 CPU"
    references: tuple[SelfCheckReference, ...]


@dataclass(frozen=True)
class ModelPackage:
    """What the agent needs to know about one model package."""

    directory: Path
    component_name: str
    model_arn: str
    model_type: str
    width: int
    height: int
    threshold: float
    labels: tuple[AnomalyLabel, ...]
    model_file: PackageFile
    files: tuple[PackageFile, ...]
    target: dict[str, Any] = field(default_factory=dict)
    self_check: SelfCheck | None = None  # None: an older package, started without a self-check

    @property
    def is_segmentation(self) -> bool:
        return self.model_type == "segmentation"

    @property
    def image_bytes(self) -> int:
        return self.width * self.height * 3

    def verify_files(self) -> None:
        """Check every listed file's size and SHA-256; raise PackageError on the first mismatch."""
        verify_package_files(self.files)


def verify_package_files(files: tuple[PackageFile, ...]) -> None:
    """Check every file's size and SHA-256 against the manifest; PackageError on the first mismatch."""
    for entry in files:
        try:
            actual_size = entry.path.stat().st_size
        except FileNotFoundError:
            raise PackageError(f"{entry.path} is listed in the manifest but missing") from None
        if actual_size != entry.size:
            raise PackageError(
                f"{entry.path} is {actual_size} bytes, the manifest says {entry.size}: "
                "the package is incomplete or was modified; redeploy it"
            )
        if file_sha256(entry.path) != entry.sha256:
            raise PackageError(
                f"{entry.path} does not match its SHA-256 in the manifest: "
                "the package is corrupt or was modified; redeploy it"
            )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def require_key(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: Path) -> Any:
    if key not in data:
        raise PackageError(f"{where}: required key '{key}' is missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PackageError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def _read_labels(data: dict[str, Any], manifest: Path) -> tuple[AnomalyLabel, ...]:
    labels = []
    for index, item in enumerate(data.get("labels", [])):
        if not isinstance(item, dict):
            raise PackageError(f"{manifest}: labels[{index}] must be an object with 'name' and 'color'")
        name = require_key(item, "name", str, manifest)
        color = require_key(item, "color", str, manifest)
        if not _HEX_COLOR.match(color):
            raise PackageError(f"{manifest}: label '{name}' has colour {color!r}; expected '#RRGGBB'")
        if name.lower() == BACKGROUND_NAME:
            raise PackageError(f"{manifest}: '{name}' is reserved for the background; rename the label")
        labels.append(AnomalyLabel(name=name, color=color.upper()))
    if len({label.name for label in labels}) != len(labels):
        raise PackageError(f"{manifest}: label names must be unique")
    if len(labels) > 255:
        raise PackageError(f"{manifest}: {len(labels)} labels; at most 255 are supported")
    return tuple(labels)


def read_package_files(data: dict[str, Any], directory: Path, manifest: Path) -> tuple[PackageFile, ...]:
    files = require_key(data, "files", dict, manifest)
    entries = []
    for relative, info in sorted(files.items()):
        path = (directory / relative).resolve()
        if directory.resolve() not in path.parents:
            raise PackageError(f"{manifest}: file '{relative}' lies outside the package directory")
        if not isinstance(info, dict):
            raise PackageError(f"{manifest}: files['{relative}'] must be an object with 'sha256' and 'size'")
        sha = require_key(info, "sha256", str, manifest)
        size = require_key(info, "size", int, manifest)
        entries.append(PackageFile(path=path, sha256=sha.lower(), size=size))
    return tuple(entries)


def read_manifest_object(manifest: Path) -> dict[str, Any]:
    """A manifest's JSON object, its format version checked; PackageError for anything else."""
    try:
        data = json.loads(_read_manifest(manifest).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{manifest} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PackageError(f"{manifest} must hold a JSON object")
    version = require_key(data, "format_version", int, manifest)
    if version != FORMAT_VERSION:
        raise PackageError(
            f"{manifest}: format_version {version} is not supported by this agent "
            f"(it reads {FORMAT_VERSION}); "
            "upgrade the agent or repackage the model"
        )
    return data


def read_package(directory: Path) -> ModelPackage:
    """Parse and check a package's manifest (file digests are checked at load time)."""
    manifest = directory / MANIFEST_NAME
    data = read_manifest_object(manifest)
    name = require_key(data, "component_name", str, manifest)
    if not name:
        raise PackageError(f"{manifest}: component_name is empty")
    model_type = require_key(data, "model_type", str, manifest)
    if model_type in LABEL_MODEL_TYPES:
        raise PackageError(
            f"{manifest}: model_type {model_type!r} is a Custom Labels model; "
            "serve it with `lookout-edge rekognition` (docs/custom-labels.md)"
        )
    if model_type not in MODEL_TYPES:
        raise PackageError(f"{manifest}: model_type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    image = require_key(data, "image", dict, manifest)
    width = require_key(image, "width", int, manifest)
    height = require_key(image, "height", int, manifest)
    for side, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise PackageError(f"{manifest}: image {side} {value} is outside {MIN_SIDE}..{MAX_SIDE}")
    threshold = require_key(data, "threshold", (int, float), manifest)
    if not 0.0 <= threshold <= 1.0:
        raise PackageError(f"{manifest}: threshold {threshold} is outside 0..1")
    labels = _read_labels(data, manifest)
    if model_type == "segmentation" and not labels:
        raise PackageError(f"{manifest}: a segmentation model needs at least one label")
    files = read_package_files(data, directory, manifest)
    model_name = require_key(data, "model_file", str, manifest)
    model_path = (directory / model_name).resolve()
    model_file = next((entry for entry in files if entry.path == model_path), None)
    if model_file is None:
        raise PackageError(f"{manifest}: model_file '{model_name}' is not listed under 'files'")
    target = data.get("target", {})
    if not isinstance(target, dict):
        raise PackageError(f"{manifest}: 'target' must be an object")
    self_check = None
    if SELF_CHECK_KEY in data:
        self_check = _read_self_check(
            data[SELF_CHECK_KEY], files, directory, len(labels), model_type, manifest
        )
    return ModelPackage(
        directory=directory,
        component_name=name,
        model_arn=str(data.get("model_arn", "")),
        model_type=model_type,
        width=width,
        height=height,
        threshold=float(threshold),
        labels=labels,
        model_file=model_file,
        files=files,
        target=target,
        self_check=self_check,
    )


def _read_self_check(
    value: Any,
    files: tuple[PackageFile, ...],
    directory: Path,
    label_count: int,
    model_type: str,
    manifest: Path,
) -> SelfCheck:
    """The `self_check` key, checked; PackageError naming the key for anything malformed."""
    key = SELF_CHECK_KEY

    def bad(where: str, what: str) -> PackageError:
        return PackageError(f"{manifest}: '{where}' {what}; retrain or repackage the model")

    if not isinstance(value, dict):
        raise bad(key, "must be an object with 'threshold', 'measured_with' and 'references'")
    threshold = _unit_number(value.get("threshold"))
    if threshold is None:
        raise bad(f"{key}.threshold", "must be a number in 0..1")
    measured_with = value.get("measured_with")
    if not isinstance(measured_with, str):
        raise bad(f"{key}.measured_with", "must be a string")
    references = value.get("references")
    if not isinstance(references, list) or not 1 <= len(references) <= MAX_SELF_CHECK_REFERENCES:
        raise bad(f"{key}.references", f"must be a list of 1 to {MAX_SELF_CHECK_REFERENCES} references")
    by_path = {entry.path: entry for entry in files}
    read = []
    for index, item in enumerate(references):
        where = f"{key}.references[{index}]"
        if not isinstance(item, dict):
            raise bad(where, "must be an object")
        name = item.get("file")
        if not isinstance(name, str) or not name.endswith(".png"):
            raise bad(f"{where}.file", "must name a PNG file of the package")
        file = by_path.get((directory / name).resolve())
        if file is None:
            raise bad(f"{where}.file", f"names '{name}', which is not listed under 'files'")
        image = item.get("image", "")
        if not isinstance(image, str):
            raise bad(f"{where}.image", "must be a string")
        score = _unit_number(item.get("anomaly_score"))
        if score is None:
            raise bad(f"{where}.anomaly_score", "must be a number in 0..1")
        anomalous = item.get("anomalous")
        if not isinstance(anomalous, bool):
            raise bad(f"{where}.anomalous", "must be true or false")
        if anomalous != (score >= threshold):  # the verdict rule of lookout_edge.contract
            raise bad(f"{where}.anomalous", f"disagrees with its anomaly_score at threshold {threshold}")
        fractions = _read_label_fractions(item.get("label_fractions"), label_count, model_type, where, bad)
        read.append(SelfCheckReference(file, image, score, anomalous, fractions))
    return SelfCheck(threshold, measured_with, tuple(read))


def _read_label_fractions(
    value: Any, label_count: int, model_type: str, where: str, bad: Callable[[str, str], PackageError]
) -> dict[int, float] | None:
    where = f"{where}.label_fractions"
    if model_type != "segmentation":
        if value is not None:
            raise bad(where, "is for segmentation models only")
        return None
    if not isinstance(value, dict):
        raise bad(where, "must be an object from label value ('1' for the first label) to a fraction")
    fractions = {}
    for label, fraction in value.items():
        if not (_LABEL_VALUE.fullmatch(label) and 1 <= int(label) <= label_count):
            raise bad(where, f"has key {label!r}; keys are label values '1'..'{label_count}'")
        share = _unit_number(fraction)
        if share is None:
            raise bad(where, f"['{label}'] must be a fraction in 0..1")
        fractions[int(label)] = share
    return fractions


def _unit_number(value: Any) -> float | None:
    """`value` as a float if it is a JSON number in 0..1, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return None  # NaN fails the range test too
    return float(value)


def package_dirs(models_dir: Path) -> list[Path]:
    """The package candidates directly below `models_dir`, by name: every entry that is a
    directory, or that cannot be examined (a symlink loop, a dead mount: `read_package` then
    says why), except packages still being written.

    Raises PackageError when `models_dir` itself cannot be listed (missing, not a directory,
    unreadable).
    """
    try:
        entries = list(os.scandir(models_dir))
    except FileNotFoundError:
        raise PackageError(f"models_dir {models_dir} does not exist; create it or set models_dir") from None
    except NotADirectoryError:
        raise PackageError(f"models_dir {models_dir} is not a directory; set models_dir to one") from None
    except OSError as exc:
        raise PackageError(f"models_dir {models_dir} cannot be listed: {exc.strerror}") from None
    return sorted(
        Path(entry.path)
        for entry in entries
        if not entry.name.startswith(STAGING_PREFIX) and _may_be_package(entry)
    )


def _may_be_package(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return True


def find_package(models_dir: Path, component_name: str) -> ModelPackage | None:
    """The readable package of `models_dir` that serves `component_name`, if there is one
    (none when `models_dir` cannot be listed)."""
    try:
        directories = package_dirs(models_dir)
    except PackageError:
        return None
    for directory in directories:
        try:
            package = read_package(directory)
        except PackageError:
            continue
        if package.component_name == component_name:
            return package
    return None


def write_package(
    directory: Path,
    manifest: dict[str, Any],
    files: dict[str, bytes],
    model_file: str = "model.onnx",
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Write a package atomically: all of it appears at `directory`, or nothing changes.

    `manifest` holds every key but `format_version`, `model_file` and `files`, which are
    filled in here (sizes and SHA-256 of `files`). `check` reads the staged package back and
    raises if it is not servable (default: `read_package`, the Edge Agent's reader). An
    existing package at `directory` is replaced. The package is assembled in a hidden sibling
    directory, which the agent ignores, and renamed into place.
    """
    if model_file not in files:
        raise PackageError(f"model file '{model_file}' is not among the files to write")
    check = check or read_package
    directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{directory.name}.", dir=directory.parent))
    try:
        entries = {}
        for relative, content in sorted(files.items()):
            _write_synced(staging / relative, content)
            entries[relative] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
        document = {"format_version": FORMAT_VERSION, **manifest, "model_file": model_file, "files": entries}
        _write_synced(
            staging / MANIFEST_NAME, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()
        )
        check(staging)  # never publish a package its server would refuse
        os.chmod(staging, 0o755)
        if directory.exists():
            retired = Path(
                tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{directory.name}.old.", dir=directory.parent)
            )
            os.replace(directory, retired / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(retired)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _read_manifest(manifest: Path) -> bytes:
    """The manifest's bytes, read without ever blocking: a FIFO or a device in its place would
    otherwise hang the reader (and with it the agent's rescan), and a huge file fill memory."""
    try:
        fd, info = open_regular(manifest)
    except NotRegularFile:
        raise PackageError(
            f"{manifest} is not a regular file; replace it with the package's manifest"
        ) from None
    except FileNotFoundError:
        raise PackageError(
            f"{manifest} is missing: not a model package, or it is still being copied"
        ) from None
    except OSError as exc:
        raise PackageError(f"{manifest} cannot be read: {exc.strerror}") from None
    try:
        if info.st_size > MAX_MANIFEST_BYTES:
            raise PackageError(
                f"{manifest} is {info.st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES} bytes"
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            content = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise PackageError(f"{manifest} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(content) > MAX_MANIFEST_BYTES:  # it grew after fstat
        raise PackageError(
            f"{manifest} is larger than {MAX_MANIFEST_BYTES} bytes, the most a manifest may be"
        )
    return content


def _write_synced(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())
