"""Backend selection, CPU fallback, compile targets and the engine cache, on this GPU-less machine.

Where a GPU is needed, the tests replace the GPU boundary only: `Environment` (what
agent/backends/cuda.py and the installed packages report), the GPU backend factories, and, for
device buffers, the CUDA runtime library itself. Everything else is the real code. The GPU paths
themselves are in test_gpu_backends.py and run only where a device is found.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lookout_edge.agent.backends import cuda, ort_backend
from lookout_edge.agent.backends.base import GpuOutOfMemory, Inference
from lookout_edge.agent.backends.cuda import GpuInfo
from lookout_edge.agent.backends.engine_cache import EngineCache, EngineKey
from lookout_edge.agent.backends.ort_backend import OnnxModel
from lookout_edge.agent.backends.selector import BackendSelector, Environment, Selection
from lookout_edge.agent.errors import ResourceExhausted
from lookout_edge.agent.models import FAILED, RUNNING, STOPPED, ModelRegistry
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
    """A device as agent/backends/cuda.py and the installed packages would report it (mocked GPU boundary)."""
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

    def close(self) -> None:
        FakeGpuBackend.closed += 1


def failing(message: str, kind: type[Exception] = RuntimeError):
    def factory(package: ModelPackage) -> None:
        raise kind(message)

    return factory


def select(selector: BackendSelector, package: ModelPackage) -> Selection:
    """What the registry does to start a model: plan (probing the device), then load."""
    return selector.load(package, selector.plan(package))


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
    plain = select(selector, package_with(tmp_path / "a", {}))
    assert (plain.backend.name, plain.note) == ("cpu", "")
    gpu_package = select(selector, package_with(tmp_path / "b", T4))
    assert gpu_package.backend.name == "cpu"
    assert "targets linux/x86_64/NVIDIA (sm_75)" in gpu_package.note
    assert "no usable NVIDIA GPU" in gpu_package.note


def test_auto_prefers_tensorrt_then_falls_back_in_order(tmp_path: Path) -> None:
    package = package_with(tmp_path, T4)
    selector = BackendSelector(environment=gpu_env, factories={"tensorrt": FakeGpuBackend})
    assert select(selector, package).backend.name == "tensorrt"
    broken = {
        "tensorrt": failing("engine build failed"),
        "ort-tensorrt": failing("no TensorRT provider"),
        "cuda": failing("no CUDA provider"),
    }
    fallback = select(BackendSelector(environment=gpu_env, factories=broken), package)
    assert fallback.backend.name == "cpu"
    assert "no GPU backend could run on Test GPU (sm_75)" in fallback.note
    assert "tensorrt: engine build failed" in fallback.note


def test_explicit_accelerator_never_falls_back(tmp_path: Path) -> None:
    package = package_with(tmp_path, {})
    with pytest.raises(Exception, match="no CUDA provider"):
        select(
            BackendSelector("cuda", environment=gpu_env, factories={"cuda": failing("no CUDA provider")}),
            package,
        )
    # The real onnxruntime here has no CUDA provider: the message says what to install.
    with pytest.raises(Exception, match="install the `gpu` extra"):
        select(BackendSelector("cuda", environment=lambda: NO_GPU), package)
    assert select(BackendSelector("cpu", environment=gpu_env), package).backend.name == "cpu"


def test_package_for_another_gpu_fails_naming_both(tmp_path: Path) -> None:
    package = package_with(tmp_path, XAVIER)
    selector = BackendSelector(environment=lambda: gpu_env((7, 5)), factories={"tensorrt": FakeGpuBackend})
    with pytest.raises(PackageError) as caught:
        selector.plan(package)
    assert "jetson_xavier (sm_72)" in str(caught.value) and "Test GPU (sm_75)" in str(caught.value)
    matching = BackendSelector(environment=lambda: gpu_env((7, 2)), factories={"tensorrt": FakeGpuBackend})
    assert select(matching, package).backend.name == "tensorrt"


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
    return ModelRegistry(tmp_path / "models", backends=selector)


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


# -- closing backends, probing the device, device buffers ---------------------------------------------


class BlockingBackend:
    """A backend whose calls, after the registry's warm-up, wait until the test lets them finish."""

    name = "cpu"
    status_note = ""

    def __init__(self, package: ModelPackage) -> None:
        self.runs = 0
        self.running = threading.Event()
        self.finish = threading.Event()
        self.closed = 0

    def run(self, image: np.ndarray) -> Inference:
        self.runs += 1
        if self.runs > 1:  # the first run is the registry's warm-up
            self.running.set()
            assert self.finish.wait(30)
        return Inference(anomaly_score=0.5, confidence=None, label_map=None)

    def close(self) -> None:
        self.closed += 1


def blocking_registry(tmp_path: Path) -> tuple[ModelRegistry, list[BlockingBackend]]:
    made: list[BlockingBackend] = []

    def factory(package: ModelPackage) -> BlockingBackend:
        made.append(BlockingBackend(package))
        return made[-1]

    registry = registry_for(tmp_path, {}, NO_GPU, {"cpu": factory})
    registry.start("m")
    wait_for(registry, "m", RUNNING)
    return registry, made


def test_package_removed_during_a_call_is_closed_once_by_the_last_release(tmp_path: Path) -> None:
    """A TensorRT backend's GPU memory is only freed by `close`: removing its package mid-call must
    still close it, once the call is done. BlockingBackend stands in for the GPU backend."""
    registry, (backend,) = blocking_registry(tmp_path)

    def call() -> None:
        with registry.acquire("m") as (package, model):
            model.run(np.zeros((package.height, package.width, 3), dtype=np.uint8))

    caller = threading.Thread(target=call)
    caller.start()
    assert backend.running.wait(30)
    shutil.rmtree(tmp_path / "models" / "m")
    assert "m" not in {info.name for info in registry.list()}
    assert backend.closed == 0  # the call still runs on it
    backend.finish.set()
    caller.join(30)
    assert backend.closed == 1
    registry.refresh()
    assert backend.closed == 1


def test_package_removed_without_calls_is_closed_at_once(tmp_path: Path) -> None:
    """BlockingBackend stands in for the GPU backend (the mocked GPU boundary)."""
    registry, (backend,) = blocking_registry(tmp_path)
    shutil.rmtree(tmp_path / "models" / "m")
    registry.refresh()
    assert backend.closed == 1


def test_start_probes_the_device_once_and_outside_the_registry_locks(tmp_path: Path) -> None:
    """`environment` stands in for the CUDA probe (the mocked GPU boundary): it must run once per
    StartModel, with no registry lock held, so DescribeModel answers meanwhile."""
    package_with(tmp_path, T4)
    probes = []

    def environment() -> Environment:
        assert not registry._start_lock.locked() and not registry._lock.locked()
        described: list[int] = []  # another caller is answered while the device is probed
        other = threading.Thread(target=lambda: described.append(registry.describe("m").status))
        other.start()
        other.join(10)
        assert described == [STOPPED]
        probes.append(1)
        return gpu_env()

    registry = ModelRegistry(
        tmp_path / "models",
        backends=BackendSelector(environment=environment, factories={"tensorrt": FakeGpuBackend}),
    )
    registry.start("m")
    assert wait_for(registry, "m", RUNNING) == "model is running"
    assert len(probes) == 1
    registry.stop("m")
    registry.start("m")
    wait_for(registry, "m", RUNNING)
    assert len(probes) == 2


class FakeCudaRuntime:
    """Stands in for libcudart, the GPU boundary: hands out addresses and records each cudaFree."""

    def __init__(self) -> None:
        self.next_address = 0x10000
        self.freed: list[int] = []

    def cudaMalloc(self, pointer: Any, size: ctypes.c_size_t) -> int:
        pointer._obj.value = self.next_address  # `pointer` is ctypes.byref(a c_void_p)
        self.next_address += size.value
        return 0

    def cudaFree(self, pointer: ctypes.c_void_p) -> int:
        self.freed.append(pointer.value or 0)
        return 0


def test_device_buffers_are_freed_exactly_once_whether_freed_or_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA runtime library is replaced by FakeCudaRuntime (the mocked GPU boundary)."""
    runtime = FakeCudaRuntime()
    monkeypatch.setattr(cuda, "_runtime", lambda: runtime)
    dropped = cuda.DeviceBuffer(256)
    dropped_address = dropped.pointer.value
    del dropped  # a backend dropped without close(): its buffers must not keep GPU memory
    gc.collect()
    assert runtime.freed == [dropped_address]
    freed = cuda.DeviceBuffer(512)
    freed_address = freed.pointer.value
    freed.free()
    freed.free()
    del freed
    gc.collect()
    assert runtime.freed == [dropped_address, freed_address]


@pytest.mark.parametrize(
    ("providers", "error"),
    [
        (("CUDAExecutionProvider", "CPUExecutionProvider"), GpuOutOfMemory),
        (("CPUExecutionProvider",), PackageError),
    ],
)
def test_onnx_runtime_allocation_failure_is_gpu_out_of_memory_only_on_a_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, providers: tuple[str, ...], error: type[Exception]
) -> None:
    """onnxruntime's session is replaced by one failing as its CUDA arena does (mocked GPU boundary)."""

    def session(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc(&p, size)")

    monkeypatch.setattr(ort_backend.ort, "InferenceSession", session)
    with pytest.raises(error, match="out of memory"):
        ort_backend.OnnxModel(package_with(tmp_path, {}), "cuda", providers)
