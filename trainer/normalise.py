"""Per-position normalisation of the anomaly map: the noisy image border scored, not ignored.

The outer patches of the grid are where the backbone's zero padding and the 3x3 feature
aggregation reach past the image, and where the image edge cuts through whatever lies there at a
position that jitters from shot to shot: normal images' distances are larger and more variable
there, so the maximum of a normal image's map is often its border. Ignoring the border (a score
margin) makes the model blind to defects there; this module instead measures how much noisier
each part of the border is on the training normals and scales it down to the interior's level.

Position classes on the rows x cols patch grid, `depth` R (3): a row's class is its index for
the first R rows, 2R - (distance from the bottom) for the last R, and R for every other row;
columns likewise. A position's class is the pair: each corner position its own class, each side
R classes of depth along it, and everything at least R patches from every border one interior
class. Mean and SD are pooled per class over all its positions and all training normals' maps
(their leave-one-out maps, which training computes for the calibration anyway).

The floor "never amplify": a class's mean and SD are raised to at least the interior's, so the
transform only ever brings a noisier class down to the interior's level. Written in distance
units, per position

    map' = A * map + B,  A = sd_int / sd_c',  B = mu_int - A * mu_c'

(A = 1, B = 0 in the interior and wherever the class is no noisier than it), which the graph
applies as one Mul and one Add by two [grid] constants (trainer/export.py). A border defect stays
scoreable: it needs a raw distance larger by 1 / A (1.31x on the ELPV cells' outer ring, 1.03x
on cookies; docs/trainer.md, "Ranking: what was measured").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Positions this many patches or more from every border form the interior class.
INTERIOR_DEPTH = 3


def position_classes(grid: tuple[int, int], depth: int = INTERIOR_DEPTH) -> np.ndarray:
    """[rows, cols] class index of each patch position (module docstring); the interior's is
    `interior_class(depth)`."""
    rows, cols = grid

    def along(count: int) -> np.ndarray:
        index = np.arange(count)
        from_end = count - 1 - index
        return np.where(index < depth, index, np.where(from_end < depth, 2 * depth - from_end, depth))

    return along(rows)[:, None] * (2 * depth + 1) + along(cols)[None, :]


def interior_class(depth: int = INTERIOR_DEPTH) -> int:
    """The class index `position_classes` gives the interior."""
    return depth * (2 * depth + 1) + depth


@dataclass(frozen=True)
class MapNormalisation:
    """map' = gain * map + offset per patch position, both [rows, cols] float32."""

    gain: np.ndarray
    offset: np.ndarray

    @classmethod
    def identity(cls, grid: tuple[int, int]) -> MapNormalisation:
        return cls(np.ones(grid, np.float32), np.zeros(grid, np.float32))

    def apply(self, grid_map: np.ndarray) -> np.ndarray:
        """The normalised map of one blurred map [rows, cols] (or a stack [n, rows, cols]), in
        float32 as the graph computes it."""
        return (grid_map.astype(np.float32, copy=False) * self.gain + self.offset).astype(np.float32)


def fit_normalisation(maps: np.ndarray, depth: int = INTERIOR_DEPTH) -> MapNormalisation:
    """The normalisation measured on the training normals' (leave-one-out) maps [n, rows, cols].

    The identity when there is nothing to measure: a grid too small to have an interior (under
    2 x depth + 1 patches across), or maps that are not finite or do not vary in the interior
    (a single normal image scored without its own patches has an empty bank).
    """
    maps = np.asarray(maps, dtype=np.float64)
    grid = (int(maps.shape[1]), int(maps.shape[2]))
    classes = position_classes(grid, depth)
    inner = classes == interior_class(depth)
    if len(maps) == 0 or not inner.any() or not np.isfinite(maps).all():
        return MapNormalisation.identity(grid)
    mu_int, sd_int = float(maps[:, inner].mean()), float(maps[:, inner].std())
    if sd_int <= 0.0:
        return MapNormalisation.identity(grid)
    gain, offset = np.ones(grid), np.zeros(grid)
    for value in np.unique(classes):
        where = classes == value
        pooled = maps[:, where]
        mu, sd = max(float(pooled.mean()), mu_int), max(float(pooled.std()), sd_int)
        gain[where] = sd_int / sd
        offset[where] = mu_int - gain[where] * mu
    return MapNormalisation(gain.astype(np.float32), offset.astype(np.float32))
