"""Bilinear resizing as two matrix products, for graphs every TensorRT version can take.

TensorRT 7.1's ONNX parser resizes only with "asymmetric" coordinates, which shift a
feature map by up to half a cell against the image. Resizing a small map with the proper
half-pixel geometry is cheap as `rows @ map @ columns.T` with fixed interpolation matrices,
and MatMul is supported everywhere.
"""

from __future__ import annotations

import numpy as np


def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of 1-D linear interpolation with half-pixel centres and
    clamped edges (ONNX Resize "linear", coordinate_transformation_mode "half_pixel")."""
    source = np.clip((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0, size_in - 1)
    low = np.floor(source).astype(np.intp)
    high = np.minimum(low + 1, size_in - 1)
    fraction = source - low
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    np.add.at(matrix, (np.arange(size_out), low), 1 - fraction)
    np.add.at(matrix, (np.arange(size_out), high), fraction)
    return matrix.astype(np.float32)
