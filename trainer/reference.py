"""A plain-numpy forward pass of the backbone, in float64, to check the ONNX graph against.

Written for clarity, not speed: fine for the small images tests use.
"""

from __future__ import annotations

import numpy as np

from lookout_edge.trainer.architecture import (
    INPUT_MEAN,
    INPUT_STD,
    FoldedConv,
    check_config,
    feature_name,
    fold_backbone,
    same_padding,
)


def resize_bilinear(image: np.ndarray, height: int, width: int, asymmetric: bool = False) -> np.ndarray:
    """Bilinear resize of a CHW array with edge clamping (ONNX Resize "linear"), with half-pixel
    centres or, with `asymmetric`, ``coordinate_transformation_mode="asymmetric"``."""
    rows = _taps(image.shape[1], height, asymmetric)
    cols = _taps(image.shape[2], width, asymmetric)
    out = image[:, rows[0], :] * rows[2][None, :, None] + image[:, rows[1], :] * (1 - rows[2])[None, :, None]
    return out[:, :, cols[0]] * cols[2][None, None, :] + out[:, :, cols[1]] * (1 - cols[2])[None, None, :]


def _taps(size_in: int, size_out: int, asymmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position: the two source indices and the weight of the first."""
    scale = size_in / size_out
    source = np.arange(size_out) * scale if asymmetric else (np.arange(size_out) + 0.5) * scale - 0.5
    source = np.clip(source, 0, size_in - 1)
    low = np.floor(source).astype(np.intp)
    high = np.minimum(low + 1, size_in - 1)
    return low, high, 1 - (source - low)


def conv2d(x: np.ndarray, conv: FoldedConv) -> np.ndarray:
    """One folded convolution (TensorFlow "SAME" padding, optional ReLU6) on a CHW array."""
    k, s = conv.kernel, conv.stride
    pad_h = same_padding(x.shape[1], k, s)
    pad_w = same_padding(x.shape[2], k, s)
    padded = np.pad(x, ((0, 0), pad_h, pad_w))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))[:, ::s, ::s]
    weight = conv.weight.astype(np.float64)
    if conv.groups == 1:
        out = np.tensordot(weight, windows, axes=([1, 2, 3], [0, 3, 4]))
    else:
        out = np.einsum("chwij,cij->chw", windows, weight[:, 0])
    out = out + conv.bias.astype(np.float64)[:, None, None]
    return np.clip(out, 0.0, 6.0) if conv.relu6 else out


def reference_features(
    weights: dict[str, np.ndarray],
    image: np.ndarray,
    network_size: tuple[int, int] = (224, 224),
    stages: tuple[int, ...] = (2, 4),
) -> dict[str, np.ndarray]:
    """The backbone's feature maps for one uint8 HWC RGB image, as float64 NCHW arrays keyed like the
    outputs of :func:`trainer.backbone.build_backbone_graph`."""
    check_config(network_size, stages)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 with shape [H, W, 3], got {image.dtype} {image.shape}")
    backbone = fold_backbone(weights, last_stage=stages[-1])

    x = image.astype(np.float64).transpose(2, 0, 1)
    if x.shape[1:] != network_size:
        x = resize_bilinear(x, *network_size, asymmetric=True)
    x = conv2d((x - INPUT_MEAN) / INPUT_STD, backbone.stem)

    features = {}
    for index, stage in enumerate(backbone.stages):
        for block in stage:
            y = x
            for _, conv in block.convs:
                y = conv2d(y, conv)
            x = x + y if block.residual else y
        if index in stages:
            features[feature_name(index)] = x[None]
    return features


def average_pool_3x3(x: np.ndarray) -> np.ndarray:
    """3x3 mean over each cell's neighbourhood of a CHW array, borders averaging only what exists
    (ONNX AveragePool with pads 1 and ``count_include_pad=0``)."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    sums = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2)).sum(axis=(3, 4))
    ones = np.pad(np.ones(x.shape[1:]), 1)
    counts = np.lib.stride_tricks.sliding_window_view(ones, (3, 3)).sum(axis=(2, 3))
    return sums / counts


def reference_patches(
    weights: dict[str, np.ndarray],
    image: np.ndarray,
    network_size: tuple[int, int],
    grid: tuple[int, int],
    stages: tuple[int, ...] = (2, 4),
) -> np.ndarray:
    """The [C, P] patch features of trainer/features.py, from the numpy backbone: each stage's map
    averaged over 3x3 neighbourhoods, resized onto `grid`, concatenated and flattened."""
    maps = reference_features(weights, image, network_size, stages)
    aggregated = []
    for stage in stages:
        pooled = average_pool_3x3(maps[feature_name(stage)][0])
        if pooled.shape[1:] != grid:
            pooled = resize_bilinear(pooled, *grid)
        aggregated.append(pooled)
    stacked = np.concatenate(aggregated, axis=0)
    return stacked.reshape(stacked.shape[0], -1)
