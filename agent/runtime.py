"""Running a model package's ONNX graph with ONNX Runtime, checked against the graph contract
(lookout_edge.contract)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from lookout_edge.contract import (
    CONFIDENCE_OUTPUT,
    INPUT_NAME,
    LABEL_MAP_OUTPUT,
    SCORE_OUTPUT,
    check_graph_io,
    session_graph_io,
)
from lookout_edge.package import ModelPackage, PackageError


@dataclass
class Inference:
    anomaly_score: float
    confidence: float | None
    label_map: np.ndarray | None


class OnnxModel:
    """A loaded model graph; `run` is safe to call from several threads at once.

    `providers` are ONNX Runtime execution providers in order of preference (agent/backends.py
    passes the CUDA and TensorRT ones); the default is the CPU.
    """

    name = "cpu"
    status_note = ""

    def __init__(
        self,
        package: ModelPackage,
        intra_op_threads: int = 0,
        providers: Sequence[str | tuple[str, dict[str, str]]] = ("CPUExecutionProvider",),
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        self._model_bytes = package.model_file.size
        try:
            self._session = ort.InferenceSession(
                str(package.model_file.path), sess_options=options, providers=list(providers)
            )
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            raise PackageError(f"{package.model_file.path} cannot be loaded by ONNX Runtime: {exc}") from None
        inputs, outputs = session_graph_io(self._session)
        check_graph_io(
            inputs, outputs, package.width, package.height, package.is_segmentation, package.model_file.path
        )
        self._outputs = [SCORE_OUTPUT]
        names = {output.name for output in self._session.get_outputs()}
        if CONFIDENCE_OUTPUT in names:
            self._outputs.append(CONFIDENCE_OUTPUT)
        if package.is_segmentation:
            self._outputs.append(LABEL_MAP_OUTPUT)

    def run(self, image: np.ndarray) -> Inference:
        """Run one [H, W, 3] uint8 image."""
        results = dict(zip(self._outputs, self._session.run(self._outputs, {INPUT_NAME: image}), strict=True))
        confidence = results.get(CONFIDENCE_OUTPUT)
        label_map = results.get(LABEL_MAP_OUTPUT)
        return Inference(
            anomaly_score=float(np.asarray(results[SCORE_OUTPUT]).reshape(-1)[0]),
            confidence=None if confidence is None else float(np.asarray(confidence).reshape(-1)[0]),
            label_map=None if label_map is None else np.asarray(label_map).reshape(image.shape[:2]),
        )

    # -- the backend interface (agent/backends.py) -----------------------------------------------

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually got (ONNX Runtime drops unusable ones)."""
        return list(self._session.get_providers())

    def run_batch(self, images: Sequence[np.ndarray]) -> list[Inference]:
        """The graph takes one image (the package contract), so a batch is a sequence of runs."""
        return [self.run(image) for image in images]

    def memory_bytes(self) -> int:
        """Weights as loaded; ONNX Runtime does not report its arena, so this is a lower bound."""
        return self._model_bytes

    def close(self) -> None:
        """Release the session (and with a GPU provider, its device memory)."""
        self._session = None
