"""The progress counter of long training steps."""

from __future__ import annotations

import io

from lookout_edge.trainer.progress import Progress


def test_an_enabled_counter_counts_every_item_and_ends_its_line() -> None:
    stream = io.StringIO()
    items = list(Progress(enabled=True, stream=stream).each("features", range(5)))
    assert items == [0, 1, 2, 3, 4]
    assert stream.getvalue().startswith("\rfeatures 1/5")
    assert stream.getvalue().endswith("\rfeatures 5/5\n")


def test_a_disabled_counter_writes_nothing() -> None:
    stream = io.StringIO()
    assert list(Progress(enabled=False, stream=stream).each("features", iter("abc"))) == ["a", "b", "c"]
    assert stream.getvalue() == ""


def test_an_iterator_of_unknown_length_is_counted_without_a_total() -> None:
    stream = io.StringIO()
    list(Progress(enabled=True, stream=stream).each("scoring", iter(range(3))))
    assert stream.getvalue().endswith("\rscoring 3\n")
