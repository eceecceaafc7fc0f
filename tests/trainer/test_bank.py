"""The memory bank: exact coreset for small sets, streamed two-stage coreset for large ones."""

from __future__ import annotations

import numpy as np
import pytest

from lookout_edge.trainer import bank as bank_module
from lookout_edge.trainer.bank import BankBuilder, BankOptions
from lookout_edge.trainer.patchcore import greedy_coreset

OPTIONS = BankOptions(coreset_ratio=0.1, coreset_max=3000, seed=0)


def images(count: int, channels: int = 16, patches: int = 200, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((channels, patches)).astype(np.float32) for _ in range(count)]


def build(
    features: list[np.ndarray], options: BankOptions = OPTIONS
) -> tuple[BankBuilder, np.ndarray, np.ndarray]:
    builder = BankBuilder(options, expected_images=len(features), patches_per_image=features[0].shape[1])
    for f in features:
        builder.add(f)
    bank, origin = builder.build()
    return builder, bank, origin


def test_a_small_set_gets_the_exact_coreset_of_all_patches() -> None:
    features = images(10)
    builder, bank, origin = build(features)
    assert not builder.streamed
    patches = np.concatenate([f.T for f in features])
    chosen = greedy_coreset(patches, 200, seed=0)
    np.testing.assert_array_equal(bank, patches[chosen])
    np.testing.assert_array_equal(origin, chosen // 200)


def test_a_large_set_is_streamed_and_keeps_a_rare_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bank_module, "EXACT_CANDIDATES", 1000)
    features = images(30)
    rare = np.full(16, 25.0, dtype=np.float32)
    features[17][:, 123] = rare
    builder, bank, origin = build(features)
    assert builder.streamed
    assert bank.dtype == np.float32 and bank.shape == (600, 16)  # 10 % of 30 x 200 patches
    # The one patch unlike every other survives both stages, and remembers its image.
    hit = np.flatnonzero(np.abs(bank - rare).max(axis=1) < 0.01)
    assert hit.size == 1 and origin[hit[0]] == 17
    # Every bank row is one of its image's patches (float16-rounded).
    for row, image in zip(bank[:50], origin[:50], strict=True):
        assert np.abs(features[image].T - row).max(axis=1).min() < 0.01


def test_the_streamed_bank_covers_the_patches_nearly_as_well(monkeypatch: pytest.MonkeyPatch) -> None:
    """The largest distance of a patch to its nearest bank entry: the quantity the coreset
    minimises. The streamed selection stays within a few per cent of the exact one."""
    features = images(30, seed=3)
    patches = np.concatenate([f.T for f in features])
    _, exact, _ = build(features)
    monkeypatch.setattr(bank_module, "EXACT_CANDIDATES", 1000)
    _, streamed, _ = build(features)

    def coverage(bank: np.ndarray) -> float:
        squared = (patches**2).sum(1)[:, None] - 2 * patches @ bank.T + (bank**2).sum(1)[None, :]
        return float(np.sqrt(np.maximum(squared.min(axis=1), 0)).max())

    assert coverage(streamed) <= 1.1 * coverage(exact)


def test_no_image_is_an_error() -> None:
    builder = BankBuilder(OPTIONS, expected_images=0, patches_per_image=10)
    with pytest.raises(ValueError, match="no normal image"):
        builder.build()
