"""Inference backends and the choice between them.

A backend loads one model package and runs it (`run`, `run_batch`), reports its memory use and
releases it on `close`. Three kinds:

- `cpu`: ONNX Runtime on the CPU (agent/runtime.py), always there;
- `cuda` / `ort-tensorrt`: ONNX Runtime with the CUDA, or TensorRT and CUDA, execution providers
  (the `gpu` extra, onnxruntime-gpu);
- `tensorrt`: native TensorRT as JetPack ships it (the `tensorrt` extra, agent/trt_backend.py).

`BackendSelector` turns the agent's `accelerator` setting (auto|cpu|cuda|tensorrt), the package's
recorded target (agent/target.py) and the GPU found (agent/cuda.py) into an ordered plan, and
loads the first backend of the plan that works. `auto` ends in the CPU, with a warning in the log
and in the model's status message; an explicit choice never falls back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from lookout_edge.package import MANIFEST_NAME, ModelPackage, PackageError
from lookout_edge.target import CompileTarget, gpu_code, parse_target

from . import cuda
from .errors import ResourceExhausted
from .runtime import Inference, OnnxModel

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    status_note: str  # why this backend and not a better one, for the model's status message

    def run(self, image: np.ndarray) -> Inference: ...

    def run_batch(self, images: Sequence[np.ndarray]) -> list[Inference]: ...

    def memory_bytes(self) -> int: ...

    def close(self) -> None: ...


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (a missing package, provider or device, or a graph it rejects)."""


class GpuOutOfMemory(RuntimeError):
    """The GPU has not enough free memory for the model."""


@dataclass(frozen=True)
class Environment:
    """What this device offers: its GPU, ONNX Runtime's providers, the TensorRT version."""

    gpu: cuda.GpuInfo | None
    ort_providers: tuple[str, ...]
    tensorrt_version: str | None


def detect_environment() -> Environment:
    try:
        import tensorrt

        trt_version: str | None = str(tensorrt.__version__)
    except ImportError:
        trt_version = None
    return Environment(cuda.probe(), tuple(ort.get_available_providers()), trt_version)


def _is_gpu_oom(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(sign in text for sign in ("out of memory", "failed to allocate", "memoryallocation"))


def ort_gpu_backend(package: ModelPackage, tensorrt: bool, engine_cache_dir: Path, fp16: bool) -> OnnxModel:
    """ONNX Runtime with the CUDA (and optionally TensorRT) execution providers."""
    wanted = "TensorrtExecutionProvider" if tensorrt else "CUDAExecutionProvider"
    if wanted not in ort.get_available_providers():
        raise BackendUnavailable(f"ONNX Runtime has no {wanted}: install the `gpu` extra (onnxruntime-gpu)")
    providers: list[str | tuple[str, dict[str, str]]] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if tensorrt:
        options = {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(engine_cache_dir / "onnxruntime"),
            "trt_fp16_enable": str(fp16),
        }
        providers.insert(0, ("TensorrtExecutionProvider", options))
    try:
        model = OnnxModel(package, providers=providers)
    except PackageError as exc:
        if _is_gpu_oom(exc):
            raise GpuOutOfMemory(str(exc)) from None
        raise
    if wanted not in model.providers:
        model.close()
        raise BackendUnavailable(
            f"ONNX Runtime could not start its {wanted} (no usable CUDA device or library)"
        )
    model.name = "ort-tensorrt" if tensorrt else "cuda"
    return model


Factory = Callable[[ModelPackage], Backend]


@dataclass
class BackendSelector:
    """The agent's model loader: picks, loads and labels the backend for each package."""

    accelerator: str = "auto"
    engine_cache_dir: Path = Path("/var/lib/lookout-edge/engines")
    precision: str = "auto"
    environment: Callable[[], Environment] = detect_environment
    factories: dict[str, Factory] = field(default_factory=dict)

    def __post_init__(self) -> None:
        defaults: dict[str, Factory] = {
            "cpu": OnnxModel,
            "cuda": lambda package: ort_gpu_backend(package, False, self.engine_cache_dir, self._fp16()),
            "ort-tensorrt": lambda package: ort_gpu_backend(
                package, True, self.engine_cache_dir, self._fp16()
            ),
            "tensorrt": self._native_tensorrt,
        }
        self.factories = {**defaults, **self.factories}

    def _fp16(self) -> bool:
        return self.precision != "fp32"

    def _native_tensorrt(self, package: ModelPackage) -> Backend:
        from .trt_backend import TensorRTModel

        return TensorRTModel(package, self.engine_cache_dir, self.precision)

    def plan(self, package: ModelPackage) -> tuple[list[str], str]:
        """Backends to try in order, and the warning to give if the plan ends on the CPU."""
        target = parse_target(package.target, str(package.directory / MANIFEST_NAME))
        env = self.environment()
        self._check_gpu_matches(package, target, env)
        if self.accelerator == "cpu":
            return ["cpu"], ""
        if self.accelerator == "cuda":
            return ["cuda"], ""
        if self.accelerator == "tensorrt":
            return (["tensorrt"] if env.tensorrt_version else ["ort-tensorrt"]), ""
        if env.gpu is None:
            warning = (
                f"the package targets {target.describe()}, but this device has no usable NVIDIA GPU; "
                "running on the CPU"
                if target.wants_gpu
                else ""
            )
            return ["cpu"], warning
        candidates = [
            ("tensorrt", env.tensorrt_version is not None),
            ("ort-tensorrt", "TensorrtExecutionProvider" in env.ort_providers),
            ("cuda", "CUDAExecutionProvider" in env.ort_providers),
        ]
        plan = [name for name, available in candidates if available]
        warning = f"no GPU backend could run on {env.gpu.name}; running on the CPU"
        if not plan:
            warning = (
                f"{env.gpu.name} found, but neither TensorRT nor onnxruntime-gpu is installed "
                "(install the `tensorrt` or `gpu` extra); running on the CPU"
            )
        return [*plan, "cpu"], warning

    @staticmethod
    def _check_gpu_matches(package: ModelPackage, target: CompileTarget, env: Environment) -> None:
        wanted = target.compute_capability
        if not target.wants_gpu or wanted is None or env.gpu is None:
            return
        if env.gpu.compute_capability != wanted:
            raise PackageError(
                f"model '{package.component_name}' was packaged for {target.describe()}, but this "
                f"device's GPU is {env.gpu.name} ({gpu_code(env.gpu.compute_capability)}); repackage "
                f"the model for {gpu_code(env.gpu.compute_capability)} or deploy it to a matching device"
            )

    def check_fits(self, package: ModelPackage, needed: int) -> None:
        """RESOURCE_EXHAUSTED when the plan starts on a GPU whose free memory is below `needed`."""
        try:
            plan, _ = self.plan(package)
        except PackageError:
            return  # the load reports it: the model becomes FAILED with the reason
        gpu = self.environment().gpu if plan[0] != "cpu" else None
        if gpu is not None and needed > gpu.free_bytes:
            raise ResourceExhausted(
                f"model '{package.component_name}' needs about {needed >> 20} MiB of GPU memory; "
                f"{gpu.name} has {gpu.free_bytes >> 20} MiB free. Stop another model or free GPU memory"
            )

    def __call__(self, package: ModelPackage) -> Backend:
        plan, warning = self.plan(package)
        reasons = []
        for name in plan:
            try:
                backend = self.factories[name](package)
            except GpuOutOfMemory:
                raise
            except PackageError as exc:
                if len(plan) == 1 or name == "cpu":
                    raise
                reasons.append(f"{name}: {exc}")
            except Exception as exc:  # any GPU stack failure: the next backend may work
                if len(plan) == 1:
                    raise BackendUnavailable(
                        f"accelerator '{self.accelerator}' cannot run here: {exc}"
                    ) from None
                log.warning("backend %s cannot load %s: %s", name, package.component_name, exc)
                reasons.append(f"{name}: {exc}")
            else:
                note = ""
                if name == "cpu" and warning:
                    note = warning + (f" ({'; '.join(reasons)})" if reasons else "")
                    log.warning("model %s: %s", package.component_name, note)
                backend.status_note = note
                log.info("model %s runs on the %s backend", package.component_name, name)
                return backend
        raise BackendUnavailable("; ".join(reasons))
