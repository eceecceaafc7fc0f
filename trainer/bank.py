"""The memory bank: a coreset of the normal images' patches, exact for small sets, streamed for large.

Greedy k-centre selection (trainer/patchcore.py) costs `bank size x candidates` distance
evaluations. For a few dozen images every patch is a candidate. For thousands of images (a
2,000-image dataset at 576x768 has 2.8 million patches) that is hours, and the patch matrix
alone is gigabytes, so the bank is built in two stages instead: each image contributes the
greedy coreset of its own patches (the same `coreset_ratio`), computed as its features
arrive, and the final greedy selection runs over these candidates only. Coresets compose:
a patch far from everything else of its image survives the first stage, and the second stage
keeps what is far from everything else of the dataset, so rare normal appearance is kept
while the candidates are `coreset_ratio` of the patches. Only the candidates are kept in
memory, in float16 (the bank itself is float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lookout_edge.trainer.patchcore import greedy_coreset

# Up to this many patches in all, every patch is a candidate for the bank (exact PatchCore).
EXACT_CANDIDATES = 300_000


@dataclass(frozen=True)
class BankOptions:
    coreset_ratio: float
    coreset_max: int
    seed: int


@dataclass
class BankBuilder:
    """Collects normal images' patch features [C, P] one at a time; `build` returns the bank.

    `expected_images` (how many will be added) decides between the exact and the streamed
    selection before the first image arrives, so that the exact path keeps every patch and the
    streamed one keeps only each image's coreset.
    """

    options: BankOptions
    expected_images: int
    patches_per_image: int
    _rows: list[np.ndarray] = field(default_factory=list)
    _origins: list[np.ndarray] = field(default_factory=list)

    @property
    def streamed(self) -> bool:
        return self.expected_images * self.patches_per_image > EXACT_CANDIDATES

    def add(self, features: np.ndarray) -> None:
        """Add one image's [C, P] patch features."""
        rows = features.T
        if self.streamed:
            local = max(1, round(rows.shape[0] * self.options.coreset_ratio))
            rows = rows[greedy_coreset(rows, local, self.options.seed + len(self._rows))]
        self._origins.append(np.full(rows.shape[0], len(self._rows), dtype=np.int32))
        self._rows.append(rows.astype(np.float16 if self.streamed else np.float32))

    def build(self) -> tuple[np.ndarray, np.ndarray]:
        """(bank [M, C] float32, the index of the image each bank row came from [M])."""
        if not self._rows:
            raise ValueError("no normal image was added to the memory bank")
        candidates = np.concatenate(self._rows)
        origins = np.concatenate(self._origins)
        total = len(self._rows) * self.patches_per_image
        size = min(self.options.coreset_max, max(1, int(total * self.options.coreset_ratio)))
        chosen = greedy_coreset(candidates.astype(np.float32, copy=False), size, self.options.seed)
        return candidates[chosen].astype(np.float32), origins[chosen].astype(np.intp)
