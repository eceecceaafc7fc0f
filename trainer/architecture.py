"""EfficientNet-Lite0 as a list of batch-norm-folded convolutions.

The layout follows the upstream EfficientNet-Lite builder (Tan & Le 2019, "lite" variant): ReLU6
instead of swish, no squeeze-and-excitation, TensorFlow "SAME" padding, batch-norm epsilon 1e-3, and
inputs scaled as ``(pixel - 127) / 128``. Parameter names are those of the pretrained checkpoint.

Both the ONNX graph builder and the numpy reference consume the folded layers produced here, so the
network's structure is written down once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BN_EPSILON = 1e-3
INPUT_MEAN = 127.0
INPUT_STD = 128.0
STEM_CHANNELS = 32
# The network downsamples by 32 overall; its input must be a multiple of that.
NETWORK_STRIDE = 32


@dataclass(frozen=True)
class StageSpec:
    """A run of inverted-residual blocks; only the first may change stride or channel count."""

    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    out_channels: int


STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)


def stage_stride(stage: int) -> int:
    """Total downsampling factor at the output of ``STAGES[stage]`` (the stem halves the input)."""
    return 2 * math.prod(spec.stride for spec in STAGES[: stage + 1])


@dataclass(frozen=True)
class FoldedConv:
    """A convolution with its batch norm folded in; weight is OIHW (I = 1 for depthwise)."""

    weight: np.ndarray
    bias: np.ndarray
    stride: int
    groups: int
    relu6: bool

    @property
    def kernel(self) -> int:
        return int(self.weight.shape[-1])


@dataclass(frozen=True)
class Block:
    """Inverted residual: optional 1x1 expansion, depthwise conv, linear 1x1 projection."""

    expand: FoldedConv | None
    depthwise: FoldedConv
    project: FoldedConv
    residual: bool

    @property
    def convs(self) -> tuple[tuple[str, FoldedConv], ...]:
        """The block's convolutions in execution order, with their role names."""
        expand = () if self.expand is None else (("expand", self.expand),)
        return (*expand, ("depthwise", self.depthwise), ("project", self.project))


@dataclass(frozen=True)
class FoldedBackbone:
    stem: FoldedConv
    stages: tuple[tuple[Block, ...], ...]


class WeightsMismatchError(ValueError):
    """The state dict does not have the EfficientNet-Lite0 parameters this module expects."""


def feature_name(stage: int) -> str:
    """Name of the graph output (and reference feature) holding the output of ``STAGES[stage]``."""
    return f"stage{stage}"


def check_config(network_size: tuple[int, int], stages: tuple[int, ...]) -> None:
    """Reject a network input size or stage selection the backbone cannot produce."""
    if not stages or list(stages) != sorted(set(stages)) or not 0 <= stages[0] <= stages[-1] < len(STAGES):
        raise ValueError(f"stages must be distinct, increasing indices in 0..{len(STAGES) - 1}, got {stages}")
    if any(side <= 0 or side % NETWORK_STRIDE for side in network_size):
        raise ValueError(f"network_size must be positive multiples of {NETWORK_STRIDE}, got {network_size}")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) along one axis; the extra pixel goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def fold_batchnorm(
    weight: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = BN_EPSILON,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold inference-mode batch norm into the preceding bias-free conv: returns (weight, bias) in float64.

    BN(conv(x, W)) = gamma * (conv(x, W) - mean) / sqrt(var + eps) + beta
                   = conv(x, W * s) + (beta - mean * s),  with s = gamma / sqrt(var + eps) per out channel.
    """
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    folded_weight = weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    folded_bias = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return folded_weight, folded_bias


def _folded_conv(
    weights: dict[str, np.ndarray],
    conv: str,
    bn: str,
    shape: tuple[int, int, int, int],
    stride: int,
    relu6: bool,
    groups: int = 1,
) -> FoldedConv:
    gamma, beta, mean, var = (
        _param(weights, f"{bn}.{name}", shape[:1])
        for name in ("weight", "bias", "running_mean", "running_var")
    )
    weight, bias = fold_batchnorm(_param(weights, f"{conv}.weight", shape), gamma, beta, mean, var)
    return FoldedConv(weight.astype(np.float32), bias.astype(np.float32), stride, groups, relu6)


def _param(weights: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        value = weights[name]
    except KeyError:
        raise WeightsMismatchError(
            f"parameter {name!r} is missing; expected an EfficientNet-Lite0 state dict "
            "(see trainer.weights.load_pretrained_weights)"
        ) from None
    if value.shape != shape:
        raise WeightsMismatchError(f"parameter {name!r} has shape {value.shape}, expected {shape}")
    return value


def fold_backbone(weights: dict[str, np.ndarray], last_stage: int = len(STAGES) - 1) -> FoldedBackbone:
    """Fold the stem and ``STAGES[: last_stage + 1]`` of an EfficientNet-Lite0 state dict."""
    if not 0 <= last_stage < len(STAGES):
        raise ValueError(f"last_stage must be in 0..{len(STAGES) - 1}, got {last_stage}")
    stem = _folded_conv(weights, "_conv_stem", "_bn0", (STEM_CHANNELS, 3, 3, 3), stride=2, relu6=True)
    stages: list[tuple[Block, ...]] = []
    in_channels = STEM_CHANNELS
    index = 0
    for spec in STAGES[: last_stage + 1]:
        blocks = []
        for repeat in range(spec.repeats):
            stride = spec.stride if repeat == 0 else 1
            blocks.append(_block(weights, f"_blocks.{index}", spec, in_channels, stride))
            in_channels = spec.out_channels
            index += 1
        stages.append(tuple(blocks))
    return FoldedBackbone(stem, tuple(stages))


def _block(
    weights: dict[str, np.ndarray], prefix: str, spec: StageSpec, in_channels: int, stride: int
) -> Block:
    hidden = in_channels * spec.expand_ratio
    expand = None
    if spec.expand_ratio != 1:
        expand = _folded_conv(
            weights, f"{prefix}._expand_conv", f"{prefix}._bn0", (hidden, in_channels, 1, 1), 1, relu6=True
        )
    k = spec.kernel
    depthwise = _folded_conv(
        weights,
        f"{prefix}._depthwise_conv",
        f"{prefix}._bn1",
        (hidden, 1, k, k),
        stride,
        relu6=True,
        groups=hidden,
    )
    project = _folded_conv(
        weights,
        f"{prefix}._project_conv",
        f"{prefix}._bn2",
        (spec.out_channels, hidden, 1, 1),
        1,
        relu6=False,
    )
    residual = stride == 1 and in_channels == spec.out_channels
    return Block(expand, depthwise, project, residual)
