"""The GPU backends on a real device. They run wherever agent/backends/cuda.py finds an NVIDIA GPU and
the backend's package is installed, and skip elsewhere with the reason (no GPU reaches this project's CI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lookout_edge.agent.backends import cuda
from lookout_edge.agent.backends.ort_backend import OnnxModel, ort_gpu_backend
from lookout_edge.agent.backends.trt_backend import TensorRTModel
from lookout_edge.package import read_package
from tests.sample_models import write_sample_package

GPU = cuda.probe()
needs_gpu = pytest.mark.skipif(GPU is None, reason="no NVIDIA GPU found through libcudart on this machine")


@pytest.fixture
def package(tmp_path: Path):
    return read_package(write_sample_package(tmp_path / "seg", "seg", 128, 96, segmentation=True))


def _agrees_with_cpu(model: object, package: object) -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    expected = OnnxModel(package).run(image)  # type: ignore[arg-type]
    got = model.run(image)  # type: ignore[attr-defined]
    assert abs(got.anomaly_score - expected.anomaly_score) < 1e-2
    assert np.mean(got.label_map == expected.label_map) > 0.99


@needs_gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="onnxruntime-gpu is not installed"
)
@pytest.mark.parametrize("tensorrt", [False, True])
def test_onnxruntime_gpu_providers(package: object, tmp_path: Path, tensorrt: bool) -> None:
    if tensorrt and "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu has no TensorRT provider here")
    model = ort_gpu_backend(package, tensorrt, tmp_path, fp16=False)  # type: ignore[arg-type]
    _agrees_with_cpu(model, package)
    model.close()


@needs_gpu
@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None, reason="the tensorrt package is not installed"
)
def test_native_tensorrt_builds_caches_and_frees(package: object, tmp_path: Path) -> None:
    assert GPU is not None
    free_before = cuda.probe().free_bytes  # type: ignore[union-attr]
    model = TensorRTModel(package, GPU, tmp_path, "fp32")  # type: ignore[arg-type]
    _agrees_with_cpu(model, package)
    assert len(list(tmp_path.glob("*.engine"))) == 1
    model.close()
    again = TensorRTModel(package, GPU, tmp_path, "fp32")  # type: ignore[arg-type]  # from the cache
    _agrees_with_cpu(again, package)
    again.close()
    assert cuda.probe().free_bytes >= free_before - (64 << 20)  # type: ignore[union-attr]
