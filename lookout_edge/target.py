"""The compile target a package records in its manifest's `target` key (docs/model-package.md).

One set of rules, read by the agent to choose its backend and by `lookout-edge package` to
check what it writes.

Two shapes, as in the Lookout for Vision packaging job (a target device or a target platform,
never both):

    {"device": "jetson_xavier"}
    {"platform": {"os": "linux", "arch": "x86_64", "accelerator": "NVIDIA"},
     "compiler_options": {"gpu-code": "sm_75", "trt-ver": "8.2", "cuda-ver": "10.2"}}

`{}` (or no key) means no particular target: the package runs wherever the agent runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from lookout_edge.package import PackageError

__all__ = [
    "CPU_OPTIONS",
    "DEVICES",
    "NVIDIA_OPTIONS",
    "CompileTarget",
    "check_compiler_options",
    "gpu_code",
    "parse_target",
]

# Target devices of the guide; a Jetson AGX Xavier's GPU is compute capability 7.2.
DEVICES = {"jetson_xavier": {"os": "linux", "arch": "aarch64", "accelerator": "NVIDIA", "gpu-code": "sm_72"}}
OSES = ("linux",)
ARCHES = ("x86_64", "aarch64", "armv7l")
ACCELERATORS = ("NVIDIA",)
_GPU_CODE = re.compile(r"^sm_(\d)(\d)$")
_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")
# Each compiler option of the packaging job: the form of its value, and an example for messages.
# `mcpu` is the guide's CPU option (e.g. core-avx2): recorded, and no backend depends on it.
COMPILER_OPTIONS = {
    "gpu-code": (_GPU_CODE, "a GPU code such as sm_75"),
    "trt-ver": (_VERSION, "a TensorRT version such as 8.2 or 8.2.1"),
    "cuda-ver": (_VERSION, "a CUDA version such as 10.2"),
    "mcpu": (re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"), "an instruction set such as core-avx2"),
}
NVIDIA_OPTIONS = ("gpu-code", "trt-ver", "cuda-ver")
CPU_OPTIONS = ("mcpu",)


@dataclass(frozen=True)
class CompileTarget:
    device: str | None = None
    os: str | None = None
    arch: str | None = None
    accelerator: str | None = None  # "NVIDIA" or None for CPU
    gpu_code: str | None = None  # "sm_72"
    trt_version: str | None = None  # "8.2.1"
    cuda_version: str | None = None  # "10.2"

    @property
    def wants_gpu(self) -> bool:
        return self.accelerator == "NVIDIA"

    @property
    def compute_capability(self) -> tuple[int, int] | None:
        match = _GPU_CODE.match(self.gpu_code or "")
        return (int(match[1]), int(match[2])) if match else None

    def describe(self) -> str:
        where = self.device or "/".join(part for part in (self.os, self.arch, self.accelerator) if part)
        return f"{where} ({self.gpu_code})" if self.gpu_code else where or "any device"


def gpu_code(capability: tuple[int, int]) -> str:
    return f"sm_{capability[0]}{capability[1]}"


def parse_target(target: dict[str, Any], where: str) -> CompileTarget:
    """Read and check a manifest's `target`; PackageError names the key and what is expected."""
    if not target:
        return CompileTarget()
    unknown = set(target) - {"device", "platform", "compiler_options"}
    if unknown:
        raise PackageError(f"{where}: unknown key(s) in 'target': {', '.join(sorted(unknown))}")
    if "device" in target and "platform" in target:
        raise PackageError(f"{where}: 'target' names a device and a platform; give one of them")
    options = check_compiler_options(target.get("compiler_options", {}), where)
    if "device" in target:
        device = target["device"]
        if device not in DEVICES:
            raise PackageError(
                f"{where}: target device {device!r} is not one of {', '.join(DEVICES)}; "
                "give a platform instead"
            )
        known = DEVICES[device]
        return CompileTarget(
            device=device,
            os=known["os"],
            arch=known["arch"],
            accelerator=known["accelerator"],
            gpu_code=options.get("gpu-code", known["gpu-code"]),
            trt_version=options.get("trt-ver"),
            cuda_version=options.get("cuda-ver"),
        )
    platform = target.get("platform")
    if not isinstance(platform, dict):
        raise PackageError(f"{where}: 'target' needs 'device' or a 'platform' object")
    os_name = str(platform.get("os", "")).lower()
    arch = str(platform.get("arch", "")).lower().replace("-", "_")
    accelerator = platform.get("accelerator")
    if os_name not in OSES:
        raise PackageError(f"{where}: target platform os {platform.get('os')!r} is not one of {OSES}")
    if arch not in ARCHES:
        raise PackageError(f"{where}: target platform arch {platform.get('arch')!r} is not one of {ARCHES}")
    if accelerator is not None and str(accelerator).upper() not in ACCELERATORS:
        raise PackageError(f"{where}: target accelerator {accelerator!r} is not one of {ACCELERATORS}")
    if accelerator is not None and "gpu-code" not in options:
        raise PackageError(
            f"{where}: an NVIDIA target platform needs compiler_options 'gpu-code', e.g. sm_75"
        )
    return CompileTarget(
        os=os_name,
        arch=arch,
        accelerator=None if accelerator is None else str(accelerator).upper(),
        gpu_code=options.get("gpu-code"),
        trt_version=options.get("trt-ver"),
        cuda_version=options.get("cuda-ver"),
    )


def check_compiler_options(options: Any, where: str) -> dict[str, str]:
    """The compiler options with every key known and every value well formed (as text)."""
    if not isinstance(options, dict):
        raise PackageError(f"{where}: 'compiler_options' must be an object")
    unknown = set(options) - set(COMPILER_OPTIONS)
    if unknown:
        raise PackageError(
            f"{where}: unknown compiler option(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(COMPILER_OPTIONS)}"
        )
    checked = {}
    for key, value in options.items():
        pattern, expected = COMPILER_OPTIONS[key]
        if not pattern.match(str(value)):
            raise PackageError(f"{where}: compiler option {key} {value!r} is malformed; expected {expected}")
        checked[key] = str(value)
    return checked
