"""The choice of backend for each model package.

Four backends (base.py says what a backend is):

- `cpu`: ONNX Runtime on the CPU (ort_backend.py), always there;
- `cuda` / `ort-tensorrt`: ONNX Runtime with the CUDA, or TensorRT and CUDA, execution providers
  (the `gpu` extra, onnxruntime-gpu; ort_backend.py);
- `tensorrt`: native TensorRT as JetPack ships it (the `tensorrt` extra, trt_backend.py).

`BackendSelector` turns the agent's `accelerator` setting (auto|cpu|cuda|tensorrt), the package's
recorded target (lookout_edge/target.py) and the device found (cuda.py) into a `Plan`, an ordered
list of backends, and loads the first backend of the plan that works. `auto` ends in the CPU, with
a warning in the log and in the model's status message; an explicit choice never falls back.

Making the plan probes the device; checking that a model fits and loading it reuse the plan, so
the registry probes once per start, and before it takes any lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from lookout_edge.package import MANIFEST_NAME, ModelPackage, PackageError
from lookout_edge.target import CompileTarget, gpu_code, parse_target

from ..errors import ResourceExhausted
from . import cuda
from .base import DEFAULT_ENGINE_CACHE_DIR, Backend, BackendUnavailable, GpuOutOfMemory
from .ort_backend import OnnxModel, ort_gpu_backend
from .trt_backend import TensorRTModel

log = logging.getLogger(__name__)

Factory = Callable[[ModelPackage], Backend]


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


@dataclass(frozen=True)
class Plan:
    """The backends to try for one package, in order, on the device as it was probed."""

    component_name: str
    target: CompileTarget
    environment: Environment
    backends: tuple[str, ...]
    cpu_warning: str  # the warning to give if the plan ends on the CPU; "" for none

    @property
    def gpu(self) -> cuda.GpuInfo | None:
        """The GPU the plan starts on; None when it starts on the CPU."""
        return self.environment.gpu if self.backends[0] != "cpu" else None


@dataclass(frozen=True)
class Selection:
    """The backend loaded for a package, and why it and not a better one ("" when nothing to say)."""

    backend: Backend
    note: str


@dataclass
class BackendSelector:
    """Picks and loads the backend for each package.

    `environment` probes the device; `factories` replace built-in backends by name (cpu, cuda,
    ort-tensorrt, tensorrt), each a callable from the package to the loaded backend.
    """

    accelerator: str = "auto"
    engine_cache_dir: Path = Path(DEFAULT_ENGINE_CACHE_DIR)
    precision: str = "auto"
    environment: Callable[[], Environment] = detect_environment
    factories: dict[str, Factory] = field(default_factory=dict)

    def plan(self, package: ModelPackage) -> Plan:
        """Probe the device once and order the backends; PackageError for a package for another GPU."""
        target = parse_target(package.target, str(package.directory / MANIFEST_NAME))
        env = self.environment()
        self._check_gpu_matches(package, target, env)
        backends, warning = self._order(target, env)
        return Plan(package.component_name, target, env, tuple(backends), warning)

    def _order(self, target: CompileTarget, env: Environment) -> tuple[list[str], str]:
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
        backends = [name for name, available in candidates if available]
        warning = f"no GPU backend could run on {env.gpu.name}; running on the CPU"
        if not backends:
            warning = (
                f"{env.gpu.name} found, but neither TensorRT nor onnxruntime-gpu is installed "
                "(install the `tensorrt` or `gpu` extra); running on the CPU"
            )
        return [*backends, "cpu"], warning

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

    @staticmethod
    def check_fits(plan: Plan, needed_bytes: int) -> None:
        """RESOURCE_EXHAUSTED when the plan starts on a GPU whose free memory is below `needed_bytes`."""
        gpu = plan.gpu
        if gpu is not None and needed_bytes > gpu.free_bytes:
            raise ResourceExhausted(
                f"model '{plan.component_name}' needs about {needed_bytes >> 20} MiB of GPU memory; "
                f"{gpu.name} has {gpu.free_bytes >> 20} MiB free. Stop another model or free GPU memory"
            )

    def _factories(self, gpu: cuda.GpuInfo | None) -> dict[str, Factory]:
        """The built-in backends, on the probed `gpu`, with `factories` in place of any of them."""
        cache, fp16 = self.engine_cache_dir, self.precision != "fp32"
        built_in: dict[str, Factory] = {
            "cpu": OnnxModel,
            "cuda": lambda package: ort_gpu_backend(package, False, cache, fp16),
            "ort-tensorrt": lambda package: ort_gpu_backend(package, True, cache, fp16),
            "tensorrt": lambda package: TensorRTModel(package, gpu, cache, self.precision),
        }
        return {**built_in, **self.factories}

    def load(self, package: ModelPackage, plan: Plan) -> Selection:
        """Load the first backend of `plan` that works for `package`."""
        factories = self._factories(plan.environment.gpu)
        reasons = []
        for name in plan.backends:
            try:
                backend = factories[name](package)
            except GpuOutOfMemory:
                raise
            except PackageError as exc:
                if len(plan.backends) == 1 or name == "cpu":
                    raise
                reasons.append(f"{name}: {exc}")
            except Exception as exc:  # any GPU stack failure: the next backend may work
                if len(plan.backends) == 1:
                    raise BackendUnavailable(
                        f"accelerator '{self.accelerator}' cannot run here: {exc}"
                    ) from None
                log.warning("backend %s cannot load %s: %s", name, package.component_name, exc)
                reasons.append(f"{name}: {exc}")
            else:
                note = ""
                if name == "cpu" and plan.cpu_warning:
                    note = plan.cpu_warning + (f" ({'; '.join(reasons)})" if reasons else "")
                    log.warning("model %s: %s", package.component_name, note)
                log.info("model %s runs on the %s backend", package.component_name, name)
                return Selection(backend, note)
        raise BackendUnavailable("; ".join(reasons))
