"""The per-position map normalisation (trainer/normalise.py): classes, floor, transform."""

from __future__ import annotations

import numpy as np
import pytest

from lookout_edge.trainer.normalise import (
    MapNormalisation,
    fit_normalisation,
    interior_class,
    position_classes,
)

GRID = (10, 12)


def test_position_classes() -> None:
    classes = position_classes(GRID, depth=3)
    interior = classes == interior_class(3)
    # Everything 3 or more patches from every border is one class, the rest is border.
    expected = np.zeros(GRID, bool)
    expected[3:-3, 3:-3] = True
    np.testing.assert_array_equal(interior, expected)
    # The four corner positions, and each corner's 3 x 3 block, are distinct classes.
    corners = [classes[r, c] for r in (0, 1, 2, -3, -2, -1) for c in (0, 1, 2, -3, -2, -1)]
    assert len(set(corners)) == 36
    # Along a side a class is a depth: the whole top row between the corner blocks is one class,
    # distinct from the second row and from the bottom row.
    assert len(set(classes[0, 3:-3])) == 1 and len(set(classes[1, 3:-3])) == 1
    assert (
        len({classes[0, 5], classes[1, 5], classes[2, 5], classes[-1, 5], classes[5, 0], classes[5, -1]}) == 6
    )
    # 4 corner blocks of 9, 4 sides of 3 depths, one interior.
    assert len(np.unique(classes)) == 4 * 9 + 4 * 3 + 1


def _maps(border_scale: float, seed: int = 0) -> np.ndarray:
    """Normal maps: the interior N(10, 1), the outer ring N(10 * border_scale, border_scale)."""
    rng = np.random.default_rng(seed)
    maps = rng.normal(10.0, 1.0, (40, *GRID))
    ring = position_classes(GRID, depth=1) != interior_class(1)
    maps[:, ring] = rng.normal(10.0 * border_scale, border_scale, (40, int(ring.sum())))
    return maps.astype(np.float32)


def test_a_noisier_border_is_scaled_down_to_the_interior() -> None:
    maps = _maps(border_scale=2.0)
    fitted = fit_normalisation(maps)
    ring = position_classes(GRID, depth=1) != interior_class(1)
    inside = position_classes(GRID) == interior_class()
    assert (fitted.gain[ring] < 0.7).all()
    assert (fitted.gain[inside] == 1.0).all() and (fitted.offset[inside] == 0.0).all()
    # Depths 1 and 2 are as noisy as the interior: left alone up to sampling noise.
    assert (fitted.gain[~ring] > 0.9).all()
    # In distance units: a normal border patch lands where a normal interior patch does.
    normalised = fitted.apply(maps)
    assert normalised[:, ring].mean() == pytest.approx(normalised[:, ~ring].mean(), abs=0.1)
    assert normalised[:, ring].std() == pytest.approx(normalised[:, ~ring].std(), rel=0.1)
    # A border defect is still scoreable: it needs 1 / gain the interior's raw distance.
    interior_needs = 20.0
    border_needs = (interior_needs - fitted.offset[0, 5]) / fitted.gain[0, 5]
    assert fitted.gain[0, 5] * border_needs + fitted.offset[0, 5] == pytest.approx(interior_needs)
    assert np.isfinite(border_needs)


def test_a_quieter_border_is_never_amplified() -> None:
    fitted = fit_normalisation(_maps(border_scale=0.5))
    ring = position_classes(GRID, depth=1) != interior_class(1)
    # Mean and SD floored at the interior's: the identity wherever the class is quieter...
    assert (fitted.gain[ring] == 1.0).all() and (fitted.offset[ring] == 0.0).all()
    # ... and nowhere a gain above 1 (depths 1 and 2, as noisy as the interior, by sampling noise
    # at most a little below it).
    assert (fitted.gain <= 1.0).all() and (fitted.gain > 0.9).all()


def test_nothing_to_measure_is_the_identity() -> None:
    identity = MapNormalisation.identity((5, 12))
    for maps in (
        _maps(2.0)[:, :5],  # 5 rows: no position is 3 from both the top and the bottom
        np.full((3, *GRID), np.inf, np.float32),  # one normal scored without its own patches
        np.ones((3, *GRID), np.float32),  # no spread in the interior
    ):
        fitted = fit_normalisation(maps)
        assert (fitted.gain == 1.0).all() and (fitted.offset == 0.0).all()
    assert identity.apply(np.arange(60.0).reshape(5, 12)).dtype == np.float32
