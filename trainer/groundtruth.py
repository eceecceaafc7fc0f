"""Parse SageMaker Ground Truth manifests the way the Lookout for Vision guide defines them.

A manifest is UTF-8 JSON lines, one image per line:

- ``source-ref``: the image;
- a label attribute (``anomaly-label`` or any other name) holding 0 or 1, and ``<name>-metadata`` whose
  ``class-name`` (``normal`` or ``anomaly``) decides the label, as the guide says; any other class name
  leaves the image unlabelled, and unlabelled images are ignored in training;
- for segmentation, a mask attribute whose name ends in ``-ref`` (``anomaly-mask-ref``) and
  ``<name>-metadata`` with an ``internal-color-map`` of ``{"key": {"class-name", "hex-color"}}``.

The guide's colour maps have a ``BACKGROUND`` entry (always ``#ffffff``) at key ``"0"``; real exports
often have none, and use key ``"0"`` for the first anomaly label. Both are accepted: an entry named
``BACKGROUND`` (any case) is the background, every other entry is an anomaly label.

Refs may be relative to the manifest's folder, absolute, ``file://`` URIs or ``s3://`` URIs. S3 objects
are fetched with boto3 (an optional dependency, imported only when a manifest needs it) into a local
cache; each object is written to a temporary name and renamed, so the cache never holds a partial file.

Parsing never raises on bad content: it returns every problem it found, so that the caller can report
them all at once.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from lookout_edge.package import AnomalyLabel

SOURCE_REF = "source-ref"
DEFAULT_LABEL_KEY = "anomaly-label"
DEFAULT_MASK_KEY = "anomaly-mask-ref"
COLOR_MAP_KEY = "internal-color-map"
BACKGROUND_CLASS = "BACKGROUND"
_HEX_COLOR = re.compile(r"^#[0-9A-Fa-f]{6}$")


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest line, its refs resolved to local paths (not yet checked to exist)."""

    line: int
    image: Path
    is_anomalous: bool | None  # None: the class name is neither "normal" nor "anomaly"
    mask: Path | None
    labels: tuple[AnomalyLabel, ...]  # this line's colour map without its background entry
    background: str | None  # the colour of this line's BACKGROUND entry, if it has one


@dataclass(frozen=True)
class ParsedManifest:
    entries: tuple[ManifestEntry, ...]
    problems: tuple[str, ...]


def default_s3_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lookout-edge" / "s3"


def parse_manifest(manifest: Path, s3_cache: Path | None = None) -> ParsedManifest:
    """Read every line of `manifest`; return the entries and every problem found."""
    try:
        text = manifest.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return ParsedManifest((), (f"{manifest} does not exist",))
    except UnicodeDecodeError as exc:
        return ParsedManifest((), (f"{manifest} is not UTF-8 ({exc}); the guide requires UTF-8 manifests",))
    except OSError as exc:
        return ParsedManifest((), (f"{manifest} cannot be read: {exc}",))

    lines: list[tuple[int, dict[str, Any]]] = []
    bad_json: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            bad_json.append(f"line {number}: {exc.msg} at column {exc.colno}")
            continue
        if not isinstance(data, dict):
            bad_json.append(f"line {number}: a JSON {type(data).__name__}, not an object")
            continue
        lines.append((number, data))

    problems: list[str] = []
    if bad_json:
        problems.append(_listing(f"{manifest}: {len(bad_json)} lines are not JSON objects", bad_json))
    if not lines and not bad_json:
        problems.append(f"{manifest} has no JSON lines: add one line per image")

    parser = LineParser(manifest.parent, s3_cache or default_s3_cache())
    entries = [entry for number, data in lines if (entry := parser.parse(number, data)) is not None]
    for title, items in parser.problems.items():
        if items:
            problems.append(_listing(f"{manifest}: {len(items)} lines {title}", items))

    if not problems:  # no point downloading images for a manifest that must be fixed first
        problems.extend(fetch_s3(parser.s3_refs))
    return ParsedManifest(tuple(entries), tuple(problems))


def _listing(title: str, items: Iterable[str]) -> str:
    return title + ":\n" + "\n".join(f"  {item}" for item in items)


_PROBLEM_TITLES = {
    "no_source": "have no 'source-ref' string (the image to use)",
    "no_label": "have no label attribute ('anomaly-label' with 'anomaly-label-metadata')",
    "bad_label": "have an anomaly-label that is not 0 or 1 (use 1 for anomalous, 0 for normal images)",
    "no_color_map": "have a mask attribute without an 'internal-color-map' in its '-metadata'",
    "bad_color": "have colour map entries without a 'class-name' and a '#RRGGBB' 'hex-color'",
    "bad_ref": "have a ref that is not a string, a path, a file:// or an s3:// URI",
}


class LineParser:
    """Turns JSON objects into entries, collecting problems by kind so they are reported together."""

    def __init__(self, base: Path, s3_cache: Path) -> None:
        self.base = base
        self.s3_cache = s3_cache
        self.s3_refs: dict[str, Path] = {}
        self.problems: dict[str, list[str]] = {title: [] for title in _PROBLEM_TITLES.values()}

    def _report(self, kind: str, item: str) -> None:
        self.problems[_PROBLEM_TITLES[kind]].append(item)

    def parse(self, number: int, data: dict[str, Any]) -> ManifestEntry | None:
        where = f"line {number}"
        source = data.get(SOURCE_REF)
        if not isinstance(source, str) or not source:
            self._report("no_source", where)
            return None
        image = self.resolve(source, where)
        is_anomalous = self._label(data, where)
        mask: Path | None = None
        labels: tuple[AnomalyLabel, ...] = ()
        background: str | None = None
        mask_key = _pick_attribute(data, DEFAULT_MASK_KEY, lambda key: key.endswith("-ref"))
        if mask_key is not None:
            ref = data[mask_key]
            if isinstance(ref, str):
                mask = self.resolve(ref, where)
            else:
                self._report("bad_ref", f"{where}: {mask_key} = {json.dumps(ref)}")
            color_map = data[f"{mask_key}-metadata"].get(COLOR_MAP_KEY)
            if not isinstance(color_map, dict):
                self._report("no_color_map", f"{where}: {mask_key}-metadata")
            else:
                labels, background = self._color_map(color_map, where)
        if image is None:
            return None
        return ManifestEntry(number, image, is_anomalous, mask, labels, background)

    def _label(self, data: dict[str, Any], where: str) -> bool | None:
        key = _pick_attribute(data, DEFAULT_LABEL_KEY, lambda key: not key.endswith("-ref"))
        if key is None:
            self._report("no_label", where)
            return None
        value = data[key]
        if isinstance(value, bool) or value not in (0, 1):
            self._report("bad_label", f"{where}: {key} = {json.dumps(value)}")
        class_name = data[f"{key}-metadata"].get("class-name")
        if not isinstance(class_name, str):
            return None
        return {"normal": False, "anomaly": True}.get(class_name.lower())

    def _color_map(
        self, color_map: dict[str, Any], where: str
    ) -> tuple[tuple[AnomalyLabel, ...], str | None]:
        labels: list[AnomalyLabel] = []
        background: str | None = None
        for key in sorted(color_map, key=_map_order):
            item = color_map[key]
            name = item.get("class-name") if isinstance(item, dict) else None
            color = item.get("hex-color") if isinstance(item, dict) else None
            if (
                not isinstance(name, str)
                or not name
                or not isinstance(color, str)
                or not _HEX_COLOR.match(color)
            ):
                self._report("bad_color", f"{where}: {COLOR_MAP_KEY}[{key!r}] = {json.dumps(item)}")
                continue
            if name.upper() == BACKGROUND_CLASS:
                background = color.upper()
            else:
                labels.append(AnomalyLabel(name=name, color=color.upper()))
        return tuple(labels), background

    def resolve(self, ref: str, where: str) -> Path | None:
        if ref.startswith("s3://"):
            parsed = urlparse(ref)
            key = unquote(parsed.path.lstrip("/"))
            if not parsed.netloc or not key or ".." in Path(key).parts:
                self._report("bad_ref", f"{where}: {ref}")
                return None
            # The cache mirrors bucket/key, so the entry can point at the local copy right away.
            self.s3_refs[ref] = self.s3_cache / parsed.netloc / key
            return self.s3_refs[ref]
        if ref.startswith("file://"):
            return Path(url2pathname(unquote(urlparse(ref).path)))
        if "://" in ref:
            self._report("bad_ref", f"{where}: {ref}")
            return None
        path = Path(ref).expanduser()
        return path if path.is_absolute() else self.base / path


def _map_order(key: str) -> tuple[int, int | str]:
    """Colour-map keys in numeric order ("2" before "10"), non-numeric keys after them."""
    return (0, int(key)) if key.isdigit() else (1, key)


def _pick_attribute(data: dict[str, Any], default: str, accept: Callable[[str], bool]) -> str | None:
    """The attribute named `default`, else the only other key with a `-metadata` object that `accept`s."""
    if default in data and isinstance(data.get(f"{default}-metadata"), dict):
        return default
    candidates = [
        key
        for key in data
        if key != SOURCE_REF
        and not key.endswith("-metadata")
        and accept(key)
        and isinstance(data.get(f"{key}-metadata"), dict)
    ]
    return candidates[0] if len(candidates) == 1 else None


def fetch_s3(wanted: dict[str, Path]) -> list[str]:
    """Download the s3:// objects not cached yet; return a problem per object that could not be fetched.

    Cached objects are not fetched again: delete the cache folder to pick up changed objects.
    """
    missing = {uri: path for uri, path in sorted(wanted.items()) if not path.is_file()}
    if not missing:
        return []
    try:
        boto3 = importlib.import_module("boto3")
    except ImportError:
        example = next(iter(missing))
        return [
            f"the manifest refers to {len(missing)} s3:// objects (e.g. {example}) and boto3 is not "
            "installed: `pip install boto3` (with AWS credentials configured), or copy the images next "
            "to the manifest and make the refs relative to its folder"
        ]
    client = boto3.client("s3")
    failed = []
    for uri, path in missing.items():
        parsed = urlparse(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        os.close(fd)
        try:
            client.download_file(parsed.netloc, unquote(parsed.path.lstrip("/")), partial)
            os.replace(partial, path)
        except Exception as exc:  # botocore reports missing objects, credentials and access as exceptions
            failed.append(f"{uri}: {exc}")
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    if not failed:
        return []
    return [_listing(f"{len(failed)} s3:// objects could not be downloaded", failed)]
