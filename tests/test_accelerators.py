"""Backend selection, CPU fallback, compile targets and the engine cache, on this GPU-less machine.

Where a GPU is needed, the tests replace the GPU boundary only: `Environment` (what agent/cuda.py
and the installed packages report) and the GPU backend factories. Everything else is the real code.
The GPU paths themselves are in test_gpu_backends.py and run only where a device is found.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from lookout_edge.agent.backends import BackendSelector, Environment, GpuOutOfMemory
from lookout_edge.agent.cuda import GpuInfo
from lookout_edge.agent.engine_cache import EngineCache, EngineKey
from lookout_edge.agent.errors import ResourceExhausted
from lookout_edge.agent.models import FAILED, RUNNING, STOPPED, ModelRegistry
from lookout_edge.agent.runtime import Inference, OnnxModel
from lookout_edge.package import ModelPackage, PackageError, read_package
from lookout_edge.target import CompileTarget, parse_target
from tests.sample_models import write_sample_package

XAVIER = {"device": "jetson_xavier"}
T4 = {
    "platform": {"os": "linux", "arch": "x86_64", "accelerator": "NVIDIA"},
    "compiler_options": {"gpu-code": "sm_75", "trt-ver": "8.2", "cuda-ver": "10.2"},
}
NO_GPU = Environment(gpu=None, ort_providers=("CPUExecutionProvider",), tensorrt_version=None)


def gpu_env(
    capability: tuple[int, int] = (7, 5), free_mb: int = 8000, trt: str | None = "8.2.1"
) -> Environment:
    """A device as agent/cuda.py and the installed packages would report it (mocked GPU boundary)."""
    gpu = GpuInfo(f"Test GPU (sm_{capability[0]}{capability[1]})", capability, free_mb << 20, 16000 << 20)
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    return Environment(gpu=gpu, ort_providers=providers, tensorrt_version=trt)


def package_with(tmp_path: Path, target: dict) -> ModelPackage:
    directory = write_sample_package(tmp_path / "models" / "m", "m", 64, 64)
    manifest = directory / "manifest.json"
    import json

    data = json.loads(manifest.read_text())
    data["target"] = target
    manifest.write_text(json.dumps(data))
    return read_package(directory)


class FakeGpuBackend:
    """Stands in for a GPU backend (mocked GPU boundary): counts its closes."""

    name = "tensorrt"
    status_note = ""
    closed = 0

    def __init__(self, package: ModelPackage) -> None:
        self.inner = OnnxModel(package)

    def run(self, image: np.ndarray) -> Inference:
        return self.inner.run(image)

    def run_batch(self, images: list[np.ndarray]) -> list[Inference]:
        return self.inner.run_batch(images)

    def memory_bytes(self) -> int:
        return 1

    def close(self) -> None:
        FakeGpuBackend.closed += 1


def failing(message: str, kind: type[Exception] = RuntimeError):
    def factory(package: ModelPackage) -> None:
        raise kind(message)

    return factory


# -- compile targets ---------------------------------------------------------------------------


def test_targets_of_the_guide_parse() -> None:
    assert parse_target({}, "m") == CompileTarget()
    xavier = parse_target(XAVIER, "m")
    assert (xavier.arch, xavier.gpu_code, xavier.compute_capability) == ("aarch64", "sm_72", (7, 2))
    t4 = parse_target(T4, "m")
    assert (t4.arch, t4.gpu_code, t4.trt_version, t4.cuda_version) == ("x86_64", "sm_75", "8.2", "10.2")
    assert parse_target({"platform": {"os": "LINUX", "arch": "X86_64"}}, "m").wants_gpu is False


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"device": "jetson_nano"}, "target device 'jetson_nano' is not one of jetson_xavier"),
        ({**XAVIER, "platform": T4["platform"]}, "names a device and a platform"),
        ({"platform": {"os": "linux", "arch": "x86_64", "accelerator": "NVIDIA"}}, "needs compiler_options"),
        ({**T4, "compiler_options": {"gpu-code": "75"}}, "gpu-code '75' is malformed"),
        ({**T4, "compiler_options": {"gpu_code": "sm_75"}}, "unknown compiler option(s) gpu_code"),
        ({"platform": {"os": "windows", "arch": "x86_64"}}, "os 'windows'"),
    ],
)
def test_bad_targets_are_refused_with_the_reason(target: dict, message: str) -> None:
    with pytest.raises(PackageError, match=None) as caught:
        parse_target(target, "manifest.json")
    assert message in str(caught.value)


# -- selection ------------------------------------------------------------------------------------


def test_auto_without_gpu_runs_on_cpu_and_warns_when_the_package_wants_one(tmp_path: Path) -> None:
    selector = BackendSelector(environment=lambda: NO_GPU)
    plain = selector(package_with(tmp_path / "a", {}))
    assert (plain.name, plain.status_note) == ("cpu", "")
    gpu_package = selector(package_with(tmp_path / "b", T4))
    assert gpu_package.name == "cpu"
    assert "targets linux/x86_64/NVIDIA (sm_75)" in gpu_package.status_note
    assert "no usable NVIDIA GPU" in gpu_package.status_note


def test_auto_prefers_tensorrt_then_falls_back_in_order(tmp_path: Path) -> None:
    package = package_with(tmp_path, T4)
    selector = BackendSelector(environment=gpu_env, factories={"tensorrt": FakeGpuBackend})
    assert selector(package).name == "tensorrt"
    broken = {
        "tensorrt": failing("engine build failed"),
        "ort-tensorrt": failing("no TensorRT provider"),
        "cuda": failing("no CUDA provider"),
    }
    fallback = BackendSelector(environment=gpu_env, factories=broken)(package)
    assert fallback.name == "cpu"
    assert "no GPU backend could run on Test GPU (sm_75)" in fallback.status_note
    assert "tensorrt: engine build failed" in fallback.status_note


def test_explicit_accelerator_never_falls_back(tmp_path: Path) -> None:
    package = package_with(tmp_path, {})
    with pytest.raises(Exception, match="no CUDA provider"):
        BackendSelector("cuda", environment=gpu_env, factories={"cuda": failing("no CUDA provider")})(package)
    # The real onnxruntime here has no CUDA provider: the message says what to install.
    with pytest.raises(Exception, match="install the `gpu` extra"):
        BackendSelector("cuda", environment=lambda: NO_GPU)(package)
    assert BackendSelector("cpu", environment=gpu_env)(package).name == "cpu"


def test_package_for_another_gpu_fails_naming_both(tmp_path: Path) -> None:
    package = package_with(tmp_path, XAVIER)
    selector = BackendSelector(environment=lambda: gpu_env((7, 5)), factories={"tensorrt": FakeGpuBackend})
    with pytest.raises(PackageError) as caught:
        selector(package)
    assert "jetson_xavier (sm_72)" in str(caught.value) and "Test GPU (sm_75)" in str(caught.value)
    assert (
        selector.__class__(environment=lambda: gpu_env((7, 2)), factories={"tensorrt": FakeGpuBackend})(
            package
        ).name
        == "tensorrt"
    )


# -- the registry with a (mocked) GPU ------------------------------------------------------------------


def wait_for(registry: ModelRegistry, name: str, status: int) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = registry.describe(name)
        if info.status == status:
            return info.status_message
        assert info.status not in (FAILED, RUNNING) or info.status == status, info.status_message
        time.sleep(0.02)
    raise AssertionError(f"{name} never reached {status}")


def registry_for(tmp_path: Path, target: dict, env: Environment, factories: dict) -> ModelRegistry:
    package_with(tmp_path, target)
    selector = BackendSelector(environment=lambda: env, factories=factories)
    return ModelRegistry(tmp_path / "models", loader=selector, fits_device=selector.check_fits)


def test_start_beyond_free_gpu_memory_is_resource_exhausted(tmp_path: Path) -> None:
    registry = registry_for(tmp_path, T4, gpu_env(free_mb=1), {"tensorrt": FakeGpuBackend})
    with pytest.raises(ResourceExhausted, match="MiB of GPU memory; Test GPU \\(sm_75\\) has 1 MiB free"):
        registry.start("m")
    assert registry.describe("m").status == STOPPED


def test_gpu_out_of_memory_while_loading_fails_the_model(tmp_path: Path) -> None:
    oom = failing("cudaMalloc: out of memory", GpuOutOfMemory)
    registry = registry_for(tmp_path, T4, gpu_env(), {"tensorrt": oom})
    registry.start("m")
    assert "not enough GPU memory" in wait_for(registry, "m", FAILED)


def test_stop_closes_the_backend_and_fallback_shows_in_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = registry_for(tmp_path / "gpu", T4, gpu_env(), {"tensorrt": FakeGpuBackend})
    registry.start("m")
    assert wait_for(registry, "m", RUNNING) == "model is running"
    before = FakeGpuBackend.closed
    registry.stop("m")
    assert FakeGpuBackend.closed == before + 1
    caplog.set_level(logging.WARNING)
    cpu = registry_for(tmp_path / "cpu", T4, NO_GPU, {})
    cpu.start("m")
    message = wait_for(cpu, "m", RUNNING)
    assert message.startswith("model is running; warning: the package targets")
    assert "running on the CPU" in caplog.text


# -- engine cache -------------------------------------------------------------------------------------------


KEY = EngineKey("ab" * 32, "8.2.1", "7.2", "fp16")


def test_engine_cache_builds_once_and_keys_every_part(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    builds = []

    def build() -> bytes:
        builds.append(1)
        return b"engine-bytes"

    assert cache.load_or_build(KEY, build, bytes.decode) == "engine-bytes"
    assert cache.load_or_build(KEY, build, bytes.decode) == "engine-bytes"
    assert len(builds) == 1
    for other in (
        EngineKey("cd" * 32, "8.2.1", "7.2", "fp16"),
        EngineKey("ab" * 32, "8.4.0", "7.2", "fp16"),
        EngineKey("ab" * 32, "8.2.1", "7.5", "fp16"),
        EngineKey("ab" * 32, "8.2.1", "7.2", "fp32"),
    ):
        assert cache.path(other) != cache.path(KEY)
        cache.load_or_build(other, build, bytes.decode)
    assert len(builds) == 5


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "other-key"])
def test_corrupt_cache_entries_are_rebuilt_never_used(tmp_path: Path, damage: str) -> None:
    cache = EngineCache(tmp_path)
    cache.write(KEY, b"good engine")
    path = cache.path(KEY)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-3])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:  # a valid entry written for another key, copied over this one
        cache.write(EngineKey("ee" * 32, "8.2.1", "7.2", "fp16"), b"other engine")
        path.write_bytes(cache.path(EngineKey("ee" * 32, "8.2.1", "7.2", "fp16")).read_bytes())
    seen = []
    result = cache.load_or_build(KEY, lambda: b"rebuilt", lambda data: seen.append(data) or data)
    assert result == b"rebuilt" and seen == [b"rebuilt"]
    assert cache.read(KEY) == b"rebuilt"


def test_entry_that_tensorrt_cannot_deserialize_is_rebuilt(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    cache.write(KEY, b"stale")
    result = cache.load_or_build(KEY, lambda: b"fresh", lambda data: None if data == b"stale" else data)
    assert result == b"fresh" and cache.read(KEY) == b"fresh"


def test_accelerator_settings_are_checked() -> None:
    from lookout_edge.agent.config import ConfigError, load_config

    assert load_config(environ={"LOOKOUT_EDGE_ACCELERATOR": "tensorrt"}).accelerator == "tensorrt"
    with pytest.raises(ConfigError, match="accelerator 'gpu' is not one of auto, cpu, cuda, tensorrt"):
        load_config(overrides={"accelerator": "gpu"}, environ={})
    with pytest.raises(ConfigError, match="tensorrt_precision 'int8'"):
        load_config(overrides={"tensorrt_precision": "int8"}, environ={})


def test_start_with_a_package_for_another_gpu_fails_the_model_not_the_call(tmp_path: Path) -> None:
    registry = registry_for(tmp_path, XAVIER, gpu_env((8, 6)), {"tensorrt": FakeGpuBackend})
    registry.start("m")
    message = wait_for(registry, "m", FAILED)
    assert "jetson_xavier (sm_72)" in message and "(sm_86)" in message
