"""Progress of long training steps, as one overwritten line on stderr.

Training thousands of images takes minutes; a terminal shows `features 812/2000` and the
like. A plain counter is enough (no dependency): it writes only when enabled, which the CLI
does when stderr is a terminal and `--json` was not asked for, so logs and JSON output stay
clean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TextIO, TypeVar

T = TypeVar("T")

# Redraw at most this often, in seconds: a counter that flickers costs more than it tells.
REDRAW_SECONDS = 0.2


class Progress:
    """`progress.each("features", items)` yields the items and counts them on the line."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr

    def each(self, step: str, items: Iterable[T], total: int | None = None) -> Iterator[T]:
        if not self.enabled:
            yield from items
            return
        if total is None:
            total = len(items) if isinstance(items, Sized) else 0
        shown = 0.0
        done = 0
        for done, item in enumerate(items, start=1):
            yield item
            now = time.monotonic()
            if now - shown >= REDRAW_SECONDS:
                self._draw(step, done, total)
                shown = now
        self._draw(step, done, total)
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, step: str, done: int, total: int) -> None:
        self.stream.write(f"\r{step} {done}/{total}" if total else f"\r{step} {done}")
        self.stream.flush()


QUIET = Progress(enabled=False)
