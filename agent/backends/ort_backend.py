"""The ONNX Runtime backends: the CPU (`cpu`), and the CUDA (`cuda`) or TensorRT and CUDA
(`ort-tensorrt`) execution providers of onnxruntime-gpu (the `gpu` extra).

The session is checked against the graph contract (lookout_edge.contract). This module is where
ONNX Runtime's exceptions become ours: a GPU allocation failure is `GpuOutOfMemory`, any other
failure to load is `PackageError`; the code above it tells them apart by type only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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

from .base import BackendUnavailable, GpuOutOfMemory, Inference

CPU_PROVIDER = "CPUExecutionProvider"
# How ONNX Runtime's CUDA provider and arena word a failed GPU allocation (see _raise_gpu_out_of_memory).
_GPU_OOM_SIGNS = ("out of memory", "failed to allocate", "memoryallocation")
Provider = str | tuple[str, dict[str, str]]


class OnnxModel:
    """A loaded model graph; `run` is safe to call from several threads at once.

    `providers` are ONNX Runtime execution providers in order of preference (`ort_gpu_backend`
    passes the CUDA and TensorRT ones); the default is the CPU. `name` is the backend's name.
    """

    status_note = ""

    def __init__(
        self,
        package: ModelPackage,
        name: str = "cpu",
        providers: Sequence[Provider] = (CPU_PROVIDER,),
    ) -> None:
        self.name = name
        self._on_gpu = any(_provider_name(provider) != CPU_PROVIDER for provider in providers)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(package.model_file.path), sess_options=options, providers=list(providers)
            )
        except Exception as exc:  # onnxruntime raises several unrelated exception types
            self._raise_gpu_out_of_memory(exc)
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

    def _raise_gpu_out_of_memory(self, exc: Exception) -> None:
        """Raise GpuOutOfMemory if `exc`, ONNX Runtime's own exception, is a GPU allocation failure.

        ONNX Runtime has no exception type for it (its CUDA arena and provider raise the generic
        RuntimeException or Fail), so its message is all there is to recognise it by. This is the
        one place that reads it, on the original exception.
        """
        text = str(exc).lower()
        if self._on_gpu and any(sign in text for sign in _GPU_OOM_SIGNS):
            raise GpuOutOfMemory(str(exc)) from None

    def run(self, image: np.ndarray) -> Inference:
        """Run one [H, W, 3] uint8 image."""
        try:
            values = self._session.run(self._outputs, {INPUT_NAME: image})
        except Exception as exc:  # a GPU session allocates its arena on the first runs
            self._raise_gpu_out_of_memory(exc)
            raise
        results = dict(zip(self._outputs, values, strict=True))
        confidence = results.get(CONFIDENCE_OUTPUT)
        label_map = results.get(LABEL_MAP_OUTPUT)
        return Inference(
            anomaly_score=float(np.asarray(results[SCORE_OUTPUT]).reshape(-1)[0]),
            confidence=None if confidence is None else float(np.asarray(confidence).reshape(-1)[0]),
            label_map=None if label_map is None else np.asarray(label_map).reshape(image.shape[:2]),
        )

    @property
    def providers(self) -> list[str]:
        """The execution providers the session actually got (ONNX Runtime drops unusable ones)."""
        return list(self._session.get_providers())

    def close(self) -> None:
        """Release the session (and with a GPU provider, its device memory)."""
        self._session = None


def _provider_name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def ort_gpu_backend(package: ModelPackage, tensorrt: bool, engine_cache_dir: Path, fp16: bool) -> OnnxModel:
    """ONNX Runtime with the CUDA (and optionally TensorRT) execution providers."""
    wanted = "TensorrtExecutionProvider" if tensorrt else "CUDAExecutionProvider"
    if wanted not in ort.get_available_providers():
        raise BackendUnavailable(f"ONNX Runtime has no {wanted}: install the `gpu` extra (onnxruntime-gpu)")
    providers: list[Provider] = ["CUDAExecutionProvider", CPU_PROVIDER]
    if tensorrt:
        options = {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(engine_cache_dir / "onnxruntime"),
            "trt_fp16_enable": str(fp16),
        }
        providers.insert(0, ("TensorrtExecutionProvider", options))
    model = OnnxModel(package, "ort-tensorrt" if tensorrt else "cuda", providers)
    if wanted not in model.providers:
        model.close()
        raise BackendUnavailable(
            f"ONNX Runtime could not start its {wanted} (no usable CUDA device or library)"
        )
    return model
