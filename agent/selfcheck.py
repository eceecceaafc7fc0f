"""The self-check: a package's reference inputs, run on the backend the agent chose, before serving.

A package written by the trainer carries a few of its training images and the outputs ONNX
Runtime on the CPU gave for them (the manifest's `self_check`, lookout_edge/package.py). Before
a model goes RUNNING, the registry runs them here on the loaded backend; a score that moved beyond
the backend's tolerance, a verdict that differs or a label map whose labelled area moved is a
PackageError beginning `self-check failed:`, and the model goes FAILED instead of serving verdicts
it was never evaluated with. The tolerances and why they are what they are: docs/accelerators.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from lookout_edge.package import ModelPackage, PackageError, SelfCheck, SelfCheckReference

from .backends.base import Backend, Inference

PREFIX = "self-check failed:"


@dataclass(frozen=True)
class Tolerance:
    """How far a backend's outputs may lie from the trainer's ONNX Runtime CPU measurement."""

    backend: str  # as messages and docs/accelerators.md name the class of backend
    score: float  # on the anomaly score (0..1)
    label_fraction: float  # on each label's fraction of the label map's pixels
    advice: str  # what to do when the check fails


# The figures and their reasons: docs/accelerators.md, "The self-check's tolerances".
CPU = Tolerance(
    "ONNX Runtime CPU",
    score=1e-4,
    label_fraction=1e-3,
    advice="its graph was altered, or this ONNX Runtime computes differently: redeploy the package "
    "as it was written, or retrain it with this ONNX Runtime version",
)
GPU_FP32 = Tolerance(
    "GPU FP32",
    score=1e-2,
    label_fraction=5e-3,
    advice="redeploy the package as it was written, or run the model on the CPU (accelerator cpu)",
)
FP16 = Tolerance(
    "TensorRT FP16",
    score=3e-2,
    label_fraction=1e-2,
    advice="set tensorrt_precision fp32, or run the model on the CPU (accelerator cpu)",
)


def tolerance_for(backend: str, precision: str) -> Tolerance:
    """The tolerance for a backend (its `name`) at the agent's `tensorrt_precision`.

    The TensorRT backends build FP16 engines unless the precision is fp32 (with `auto`, native
    TensorRT does so only where the GPU has fast FP16; it cannot be told apart here, so `auto`
    gets the FP16 tolerance). The CUDA provider always computes in FP32 (TF32 on Ampere and later).
    """
    if backend == "cpu":
        return CPU
    if backend in ("tensorrt", "ort-tensorrt") and precision != "fp32":
        return FP16
    return GPU_FP32


def run_self_check(model: Backend, package: ModelPackage, tolerance: Tolerance) -> None:
    """Run every reference input; PackageError `self-check failed: ...` naming each that differs."""
    check = package.self_check
    assert check is not None, "only packages with a self-check are checked"
    failures = []
    for reference in check.references:
        result = model.run(_reference_image(reference, package))
        differences = _differences(reference, result, check, tolerance, package)
        if differences:
            file = reference.file.path.relative_to(package.directory.resolve())
            where = f"reference '{reference.image}' ({file})"
            failures.append(f"{where}: " + "; ".join(differences))
    if failures:
        raise PackageError(
            f"{PREFIX} {' | '.join(failures)}. On {model.name} ({tolerance.backend}) the model does not "
            f"reproduce what the trainer measured with {check.measured_with}; {tolerance.advice}"
        )


def _differences(
    reference: SelfCheckReference,
    result: Inference,
    check: SelfCheck,
    tolerance: Tolerance,
    package: ModelPackage,
) -> list[str]:
    """What differs between the trainer's measurement and `result`, one phrase each."""
    differences = []
    score, expected = result.anomaly_score, reference.anomaly_score
    if not abs(score - expected) <= tolerance.score:  # a NaN score fails too
        differences.append(
            f"anomaly_score {score:.6f}, the trainer measured {expected:.6f} "
            f"(differs by {abs(score - expected):.2g}, tolerance {tolerance.score:g})"
        )
    anomalous = bool(score >= check.threshold)  # the verdict rule of lookout_edge.contract
    if anomalous != reference.anomalous:
        differences.append(
            f"verdict {_verdict(anomalous)} at threshold {check.threshold:g}, "
            f"the trainer measured {_verdict(reference.anomalous)}"
        )
    if reference.label_fractions is not None:
        differences += _label_differences(reference.label_fractions, result.label_map, tolerance, package)
    return differences


def _label_differences(
    expected: dict[int, float], label_map: np.ndarray | None, tolerance: Tolerance, package: ModelPackage
) -> list[str]:
    if label_map is None:
        return ["the backend returned no label map"]
    counts = np.bincount(np.asarray(label_map, dtype=np.uint8).reshape(-1), minlength=256)
    fractions = counts / max(1, label_map.size)
    differences = []
    for value in range(1, 256):
        actual, wanted = float(fractions[value]), expected.get(value, 0.0)
        if abs(actual - wanted) > tolerance.label_fraction:
            name = package.labels[value - 1].name if value <= len(package.labels) else f"label value {value}"
            differences.append(
                f"'{name}' covers {actual:.2%} of the label map, the trainer measured {wanted:.2%} "
                f"(tolerance {tolerance.label_fraction:.1%})"
            )
    return differences


def _verdict(anomalous: bool) -> str:
    return "anomalous" if anomalous else "normal"


def _reference_image(reference: SelfCheckReference, package: ModelPackage) -> np.ndarray:
    """The reference PNG as the [H, W, 3] uint8 image the backend takes (its digest was verified)."""
    path = reference.file.path
    expected = (package.width, package.height)
    try:
        with Image.open(path, formats=["PNG"]) as image:
            if image.size != expected or image.mode != "RGB":
                raise PackageError(
                    f"{PREFIX} {path} is a {image.mode} image of {image.size[0]}x{image.size[1]}; "
                    f"a reference input is RGB at the model's size, {expected[0]}x{expected[1]}: "
                    "retrain or repackage the model"
                )
            return np.asarray(image)
    except PackageError:
        raise
    except Exception as exc:  # Pillow raises several unrelated types for a broken file
        raise PackageError(
            f"{PREFIX} {path} cannot be read as a PNG image ({exc}): retrain or repackage the model"
        ) from None
