"""What every backend is: the `Backend` interface, its result, its errors, the setting's names.

A backend holds one loaded model package: `run` is called from several threads at once, `close`
once when the model stops or its package is removed, and releases the backend's memory (GPU
memory included). The selector (selector.py) picks and builds backends; the registry
(agent/models.py) only runs and closes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

# The agent's `accelerator` setting (docs/accelerators.md).
ACCELERATORS = ("auto", "cpu", "cuda", "tensorrt")
DEFAULT_ENGINE_CACHE_DIR = "/var/lib/lookout-edge/engines"


@dataclass
class Inference:
    """One image's outputs, as the package's graph contract names them (lookout_edge.contract)."""

    anomaly_score: float
    confidence: float | None
    label_map: np.ndarray | None


class Backend(Protocol):
    """A loaded model. `name` and `status_note` are read-only to everyone but the backend."""

    @property
    def name(self) -> str:
        """The backend's name: cpu, cuda, ort-tensorrt or tensorrt."""

    @property
    def status_note(self) -> str:
        """The backend's own remark for the model's status message; usually empty."""

    def run(self, image: np.ndarray) -> Inference:
        """Run one [H, W, 3] uint8 image."""

    def close(self) -> None:
        """Release the model; no call runs on it afterwards."""


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (a missing package, provider or device, or a graph it rejects)."""


class GpuOutOfMemory(RuntimeError):
    """The GPU has not enough free memory for the model."""
