import numpy as np
import pytest

from lookout_edge.trainer.architecture import (
    STAGES,
    FoldedConv,
    WeightsMismatchError,
    check_config,
    fold_backbone,
    fold_batchnorm,
    same_padding,
    stage_stride,
)
from lookout_edge.trainer.reference import conv2d


@pytest.mark.parametrize(
    ("in_channels", "groups", "kernel", "stride"), [(3, 1, 3, 2), (6, 6, 5, 1), (4, 1, 1, 1)]
)
def test_batchnorm_folding_matches_conv_then_batchnorm(
    in_channels: int, groups: int, kernel: int, stride: int
) -> None:
    rng = np.random.default_rng(1)
    out_channels = 6
    weight = rng.normal(size=(out_channels, in_channels // groups, kernel, kernel))
    gamma, beta, mean = rng.normal(size=(3, out_channels))
    var = rng.uniform(0.0, 3.0, out_channels)
    var[0] = 0.0  # the shipped stem has dead channels with zero running variance
    x = rng.normal(size=(in_channels, 11, 9))

    folded_weight, folded_bias = fold_batchnorm(weight, gamma, beta, mean, var)
    folded = conv2d(x, FoldedConv(folded_weight, folded_bias, stride, groups, relu6=False))
    plain = conv2d(x, FoldedConv(weight, np.zeros(out_channels), stride, groups, relu6=False))
    per_channel = (slice(None), None, None)
    batchnormed = (plain - mean[per_channel]) / np.sqrt(var[per_channel] + 1e-3) * gamma[per_channel]
    batchnormed += beta[per_channel]

    np.testing.assert_allclose(folded, batchnormed, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [(224, 3, 2, (0, 1)), (112, 5, 2, (1, 2)), (14, 5, 1, (2, 2)), (7, 1, 1, (0, 0)), (7, 3, 2, (1, 1))],
)
def test_same_padding_matches_tensorflow(
    size: int, kernel: int, stride: int, expected: tuple[int, int]
) -> None:
    assert same_padding(size, kernel, stride) == expected


def test_fold_backbone_builds_lite0_layout(weights: dict[str, np.ndarray]) -> None:
    backbone = fold_backbone(weights)
    assert [len(stage) for stage in backbone.stages] == [spec.repeats for spec in STAGES]
    blocks = [block for stage in backbone.stages for block in stage]
    assert len(blocks) == 16
    assert [block.residual for block in blocks].count(True) == 9
    assert blocks[0].expand is None
    assert blocks[-1].project.weight.shape == (320, 1152, 1, 1)
    assert [stage_stride(i) for i in range(len(STAGES))] == [2, 4, 8, 16, 16, 32, 32]


def test_fold_backbone_stops_at_last_stage(weights: dict[str, np.ndarray]) -> None:
    assert len(fold_backbone(weights, last_stage=2).stages) == 3


def test_fold_backbone_names_missing_or_misshapen_parameter(weights: dict[str, np.ndarray]) -> None:
    missing = {k: v for k, v in weights.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(WeightsMismatchError, match=r"'_blocks.3._bn1.running_var' is missing"):
        fold_backbone(missing)
    misshapen = {**weights, "_conv_stem.weight": np.zeros((16, 3, 3, 3), np.float32)}
    with pytest.raises(WeightsMismatchError, match=r"'_conv_stem.weight' has shape \(16, 3, 3, 3\)"):
        fold_backbone(misshapen)


@pytest.mark.parametrize(
    ("network_size", "stages", "message"),
    [
        ((224, 200), (2, 4), "multiples of 32"),
        ((224, 224), (4, 2), "increasing"),
        ((224, 224), (), "increasing"),
        ((224, 224), (2, 7), "0..6"),
    ],
)
def test_check_config_rejects_bad_choices(
    network_size: tuple[int, int], stages: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_config(network_size, stages)
