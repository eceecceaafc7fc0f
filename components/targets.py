"""Compile targets of a model component: a target device, or a platform with compiler options.

The choices are the ones the Lookout for Vision packaging job offers: a target device
(`jetson_xavier`), or a target platform `os/arch[/accelerator]` with compiler options
`gpu-code`, `trt-ver` and `cuda-ver` for NVIDIA accelerators and `mcpu` for CPUs. The
target is recorded in the package manifest's `target` key, where the agent reads it to
pick its backend, and it restricts the component's recipe to the matching platform.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any

from lookout_edge.package import PackageError
from lookout_edge.target import CPU_OPTIONS, NVIDIA_OPTIONS, check_compiler_options
from lookout_edge.target import DEVICES as TARGET_DEVICES

OPERATING_SYSTEMS = ("linux",)
ARCHITECTURES = {
    "x86_64": "x86_64",
    "amd64": "x86_64",
    "x86-64": "x86_64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
}
ACCELERATORS = ("cpu", "nvidia")
# Greengrass names architectures as the JVM does.
GREENGRASS_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "aarch64"}
DEFAULT_MCPU = "core-avx2"  # what the packaging job uses for x86_64 CPUs when none is given


class TargetError(ValueError):
    """A target device, platform or compiler option that cannot be used."""


@dataclass(frozen=True)
class Target:
    os: str
    arch: str  # x86_64 or aarch64
    accelerator: str  # cpu or nvidia
    compiler_options: dict[str, str] = field(default_factory=dict)
    device: str | None = None

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's `target` object (docs/model-package.md), as lookout_edge.target reads it."""
        if self.device:
            return {"device": self.device}
        platform: dict[str, str] = {"os": self.os, "arch": self.arch}
        if self.accelerator == "nvidia":
            platform["accelerator"] = "NVIDIA"
        record: dict[str, Any] = {"platform": platform}
        if self.compiler_options:
            record["compiler_options"] = dict(self.compiler_options)
        return record

    def greengrass_platform(self) -> dict[str, str]:
        """The recipe manifest's `Platform`, so that Greengrass deploys the model only where it fits."""
        return {"os": self.os, "architecture": GREENGRASS_ARCHITECTURES[self.arch]}


# The target devices of the packaging job, as the agent knows them (lookout_edge.target holds
# the one list, with each device's GPU). The manifest records the device's name alone. Jetson AGX
# Xavier runs JetPack 4.4 to 4.6.1, that is TensorRT 7.1.3 or 8.2.1: the agent builds its engine
# on the device, so no TensorRT version is pinned.
DEVICES = {
    name: Target(os=spec["os"], arch=spec["arch"], accelerator=spec["accelerator"].lower(), device=name)
    for name, spec in TARGET_DEVICES.items()
}


def machine_arch() -> str:
    """This machine's architecture in the target's spelling (x86_64 or aarch64)."""
    machine = platform.machine().lower()
    if machine not in ARCHITECTURES:
        raise TargetError(f"this machine's architecture {machine!r} is not a supported target")
    return ARCHITECTURES[machine]


def _parse_platform(text: str) -> tuple[str, str, str]:
    parts = text.strip().lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise TargetError(
            f"target platform {text!r} must be OS/ARCH or OS/ARCH/ACCELERATOR, e.g. linux/aarch64/nvidia"
        )
    os_name, arch = parts[0], parts[1]
    accelerator = parts[2] if len(parts) == 3 else "cpu"
    if os_name not in OPERATING_SYSTEMS:
        raise TargetError(
            f"target OS {parts[0]!r} is not supported; use one of: {', '.join(OPERATING_SYSTEMS)}"
        )
    if arch not in ARCHITECTURES:
        raise TargetError(f"target architecture {parts[1]!r} is not supported; use x86_64 or aarch64")
    if accelerator not in ACCELERATORS:
        raise TargetError(
            f"target accelerator {accelerator!r} is not supported; use one of: {', '.join(ACCELERATORS)}"
        )
    return os_name, ARCHITECTURES[arch], accelerator


def _parse_options(text: str | None, accelerator: str, arch: str) -> dict[str, str]:
    options: Any = {}
    if text is not None:
        try:
            options = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TargetError(f"compiler options are not valid JSON ({exc.msg}): {text!r}") from None
        if not isinstance(options, dict):
            raise TargetError(
                f'compiler options must be a JSON object, e.g. {{"mcpu": "core-avx2"}}: {text!r}'
            )
    allowed = NVIDIA_OPTIONS if accelerator == "nvidia" else CPU_OPTIONS
    for key in options:
        if key not in allowed:
            raise TargetError(
                f"compiler option {key!r} does not apply to the {accelerator} accelerator; "
                f"allowed: {', '.join(allowed)}"
            )
    try:
        checked = check_compiler_options(options, "--compiler-options")
    except PackageError as exc:
        raise TargetError(str(exc)) from None
    if accelerator == "nvidia":
        missing = [key for key in NVIDIA_OPTIONS if key not in checked]
        if missing:
            raise TargetError(
                f"an NVIDIA target platform needs compiler options {', '.join(missing)}, "
                'e.g. {"gpu-code": "sm_75", "trt-ver": "7.1.3", "cuda-ver": "10.2"}'
            )
    elif arch == "x86_64":
        checked.setdefault("mcpu", DEFAULT_MCPU)
    return checked


def resolve_target(
    device: str | None = None, target_platform: str | None = None, compiler_options: str | None = None
) -> Target:
    """The target from the package options; by default linux, this machine's architecture, CPU."""
    if device is not None and target_platform is not None:
        raise TargetError("give a target device or a target platform, not both")
    if device is not None:
        if compiler_options is not None:
            raise TargetError("compiler options go with a target platform; a target device implies its own")
        if device not in DEVICES:
            raise TargetError(
                f"unknown target device {device!r}; known devices: {', '.join(sorted(DEVICES))}"
            )
        return DEVICES[device]
    if target_platform is None:
        if compiler_options is not None:
            raise TargetError(
                "compiler options go with a target platform (--target-platform OS/ARCH[/ACCELERATOR])"
            )
        os_name, arch, accelerator = "linux", machine_arch(), "cpu"
    else:
        os_name, arch, accelerator = _parse_platform(target_platform)
    return Target(os_name, arch, accelerator, _parse_options(compiler_options, accelerator, arch))
