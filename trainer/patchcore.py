"""PatchCore scoring (Roth et al., CVPR 2022) in plain numpy.

A memory bank of normal patch features, reduced by greedy coreset selection; a patch's
anomaly is its distance to the nearest bank entry, computed as a matrix product
(|f|^2 - 2 m.f + |m|^2), never as an N x M x D broadcast. The anomaly map is the patch
distances on their grid, lightly blurred; the image's raw score is the map's maximum.

These functions are both how the trainer scores images and the reference the exported ONNX
graph is tested against (trainer/export.py).
"""

from __future__ import annotations

import numpy as np

# The blur over the patch grid: a 3x3 Gaussian with this sigma, in patches.
BLUR_SIGMA = 0.75
# Coreset selection runs on random projections to this many dimensions (the paper's trick).
PROJECTION_DIMS = 64


def greedy_coreset(features: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of `size` rows of `features` [N, C] chosen by greedy k-centre selection.

    Each step adds the row farthest from those already chosen, so the bank covers the whole
    normal feature space with few entries.
    """
    count = features.shape[0]
    if size >= count:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((features.shape[1], PROJECTION_DIMS)).astype(np.float32)
    projected = features @ (projection / np.sqrt(PROJECTION_DIMS))
    squared = np.einsum("ij,ij->i", projected, projected)
    chosen = np.empty(size, dtype=np.intp)
    chosen[0] = int(rng.integers(count))
    nearest = np.full(count, np.inf, dtype=np.float32)
    for step in range(1, size):
        centre = projected[chosen[step - 1]]
        distance = squared - 2.0 * (projected @ centre) + squared[chosen[step - 1]]
        np.minimum(nearest, distance, out=nearest)
        chosen[step] = int(np.argmax(nearest))
    return np.sort(chosen)


def nearest_distances(
    patches: np.ndarray, bank: np.ndarray, excluded: np.ndarray | None = None
) -> np.ndarray:
    """Euclidean distance of each patch column of `patches` [C, P] to its nearest row of `bank` [M, C].

    `excluded` (a boolean mask over the bank's rows) leaves rows out: scoring a training image
    against the bank without its own patches gives the score an unseen normal image would get.
    """
    patch_sq = np.einsum("cp,cp->p", patches, patches)
    bank_sq = np.einsum("mc,mc->m", bank, bank)
    partial = (bank @ patches) * -2.0 + bank_sq[:, None]  # [M, P]
    if excluded is not None:
        partial[excluded] = np.inf
    return np.sqrt(np.maximum(partial.min(axis=0) + patch_sq, 0.0))


def blur_kernel(sigma: float = BLUR_SIGMA) -> np.ndarray:
    """The normalised 3x3 Gaussian kernel."""
    taps = np.exp(-(np.arange(-1, 2) ** 2) / (2 * sigma**2))
    kernel = np.outer(taps, taps)
    return (kernel / kernel.sum()).astype(np.float32)


def blur_normaliser(grid: tuple[int, int], kernel: np.ndarray) -> np.ndarray:
    """1 / (kernel weight inside the grid) per cell, so that the borders are not darkened."""
    return 1.0 / blur(np.ones(grid, dtype=np.float32), kernel, None)


def blur(grid_map: np.ndarray, kernel: np.ndarray, normaliser: np.ndarray | None) -> np.ndarray:
    """3x3 convolution with zero padding, optionally renormalised at the borders."""
    padded = np.pad(grid_map, 1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    out = np.einsum("hwij,ij->hw", windows, kernel)
    return out if normaliser is None else out * normaliser


def anomaly_grid(
    patches: np.ndarray, bank: np.ndarray, grid: tuple[int, int], excluded: np.ndarray | None = None
) -> np.ndarray:
    """The blurred patch-distance map [rows, columns] of one image."""
    kernel = blur_kernel()
    distances = nearest_distances(patches, bank, excluded).reshape(grid)
    return blur(distances, kernel, blur_normaliser(grid, kernel))


def raw_score(grid_map: np.ndarray) -> float:
    """The image's raw anomaly score: its most anomalous (blurred) patch."""
    return float(grid_map.max())


def calibrated_score(raw: np.ndarray | float, centre: float, scale: float) -> np.ndarray:
    """Map raw scores to 0..1 with a logistic curve: `centre` (the raw threshold) maps to 0.5."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(raw, dtype=np.float64) - centre) / scale))
