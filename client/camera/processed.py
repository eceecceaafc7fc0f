"""Which files of a watched folder were processed, kept under `state_dir` across restarts.

A folder source takes every file not processed yet, whatever its modification time (`cp -p`,
`rsync -t` and `mv` from a staging directory keep old ones), and after a restart neither
repeats a file nor skips one. A file is identified by its name, size and mtime: one replaced
under the same name is a new image.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

from .files import LineFile

log = logging.getLogger(__name__)

COMPACT_SLACK = 1000  # journal lines beyond twice the live entries before it is rewritten


class FileKey(NamedTuple):
    name: str
    size: int
    mtime_ns: int


class ProcessedFiles:
    """A journal of JSON lines, one per processed file, appended durably as each file is done.

    Entries of files that left the folder are forgotten, and the journal rewritten once it
    holds mostly such entries, so it stays about as large as the folder's listing.
    """

    def __init__(self, path: Path, present: set[str]) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._entries = {key.name: key for key in _read(path) if key.name in present}
        self._lines = 0
        self._journal = self._rewrite()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, FileKey) and self._entries.get(key.name) == key

    def add(self, key: FileKey) -> None:
        """Record a file as processed; raises OSError if the journal cannot be written (it is
        still skipped until the daemon stops)."""
        self._entries[key.name] = key
        self._journal.append(_line(key))
        self._lines += 1

    def retain(self, present: set[str]) -> None:
        """Forget the files that are no longer in the folder."""
        for name in self._entries.keys() - present:
            del self._entries[name]
        if self._lines > 2 * len(self._entries) + COMPACT_SLACK:
            self._journal.close()
            self._journal = self._rewrite()

    def _rewrite(self) -> LineFile:
        """Replace the journal by the live entries, atomically; the file to append to."""
        temporary = self._path.with_name(f".{self._path.name}.tmp")
        with temporary.open("wb") as file:
            file.writelines(_line(key) for key in self._entries.values())
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self._path)
        self._lines = len(self._entries)
        return LineFile(self._path, sync=True)

    def close(self) -> None:
        self._journal.close()


def _line(key: FileKey) -> bytes:
    return json.dumps(key._asdict(), separators=(",", ":")).encode() + b"\n"


def _read(path: Path) -> list[FileKey]:
    """The journal's entries; a line cut short (a power cut) is skipped."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    keys = []
    for line in lines:
        try:
            keys.append(FileKey(**json.loads(line)))
        except (ValueError, TypeError):
            log.warning("%s: skipping a damaged line", path)
    return keys
