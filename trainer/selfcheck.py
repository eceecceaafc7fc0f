"""The writer side of the package's self-check: reference inputs and what the graph gives on them.

The trainer (and whatever rewrites a package's graph) picks a few training images with
`choose_references` and measures the delivered graph on them with `reference_checks`, which
returns the manifest's `self_check` entry and the PNG files to add to the package. The agent
runs the same inputs on the backend it chose before it serves the model (agent/selfcheck.py);
the format is in docs/model-package.md, "Self-check".
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from lookout_edge.contract import DEFAULT_THRESHOLD, INPUT_NAME, LABEL_MAP_OUTPUT, SCORE_OUTPUT, is_anomalous

__all__ = ["REFERENCE_MARGIN", "choose_references", "reference_checks"]

# A reference is at least this far from the threshold, so that a backend within its tolerance
# (at most 0.03 on the score, TensorRT FP16; agent/selfcheck.py) cannot flip its verdict.
REFERENCE_MARGIN = 0.05
REFERENCE_DIR = "self_check"


def choose_references(
    scores: Sequence[float], anomalous: Sequence[bool], threshold: float = DEFAULT_THRESHOLD
) -> list[int]:
    """Which images to carry, as indices into `scores`: the likeliest normal image, the most
    anomalous image, and the anomalous image nearest the threshold (distinct; with no anomalous
    image, the two normal images farthest apart).

    `scores` are those of the delivered model, or for normal images an upper bound of them: the
    trainer passes out-of-fold scores, and a normal image's score only falls once its own patches
    are in the memory bank. So a normal image qualifies only from REFERENCE_MARGIN below the
    threshold, an anomalous one at REFERENCE_MARGIN from it on either side; no reference can sit
    so close to the threshold that a backend's tolerated drift would flip its verdict. The
    reference nearest the threshold is the most sensitive one: the calibrated score moves fastest
    there. It is an anomalous image because those keep their score in the delivered model, where
    a normal image's falls towards zero.

    Should no image qualify (every score within the margin: a threshold below most normal
    scores), the lowest-scoring image is carried alone, so that every package checks itself.
    """
    if len(scores) != len(anomalous):
        raise ValueError(f"{len(scores)} scores for {len(anomalous)} images")
    eligible = [
        index
        for index, (score, is_bad) in enumerate(zip(scores, anomalous, strict=True))
        if score <= threshold - REFERENCE_MARGIN or (is_bad and score >= threshold + REFERENCE_MARGIN)
    ]
    if not eligible:
        return [min(range(len(scores)), key=lambda index: scores[index])] if scores else []
    normals = [index for index in eligible if not anomalous[index]]
    bad = [index for index in eligible if anomalous[index]]
    chosen: list[int] = []
    if normals:
        chosen.append(min(normals, key=lambda index: scores[index]))
    if bad:
        chosen.append(max(bad, key=lambda index: scores[index]))
    rest = [index for index in bad if index not in chosen]
    if rest:
        chosen.append(min(rest, key=lambda index: abs(scores[index] - threshold)))
    elif not bad and len(normals) > 1:
        chosen.append(max(normals, key=lambda index: scores[index]))
    return chosen


def reference_checks(
    graph: bytes, images: Sequence[tuple[str, np.ndarray]]
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Run `graph` with ONNX Runtime on the CPU on each (name, uint8 [H, W, 3] image).

    Returns the manifest's `self_check` entry and the files to add to the package (one PNG per
    image, under self_check/). Verdicts are taken at the contract's DEFAULT_THRESHOLD, the
    threshold the trainer's graphs are calibrated to; for a segmentation graph each reference
    also records every label's fraction of the label map's pixels.
    """
    if not images:
        raise ValueError("a self-check needs at least one reference image")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
    outputs = [SCORE_OUTPUT]
    if LABEL_MAP_OUTPUT in {output.name for output in session.get_outputs()}:
        outputs.append(LABEL_MAP_OUTPUT)
    references, files = [], {}
    for index, (name, image) in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name}: a reference image is uint8 [H, W, 3], not {image.dtype} {image.shape}")
        results = dict(zip(outputs, session.run(outputs, {INPUT_NAME: image}), strict=True))
        score = float(np.asarray(results[SCORE_OUTPUT]).reshape(-1)[0])
        path = f"{REFERENCE_DIR}/reference-{index}.png"
        files[path] = _png(image)
        reference: dict[str, Any] = {
            "file": path,
            "image": name,
            "anomaly_score": score,
            "anomalous": is_anomalous(score, DEFAULT_THRESHOLD),
        }
        if LABEL_MAP_OUTPUT in results:
            label_map = np.asarray(results[LABEL_MAP_OUTPUT], dtype=np.uint8)
            counts = np.bincount(label_map.reshape(-1), minlength=256)
            reference["label_fractions"] = {
                str(value): float(counts[value] / label_map.size) for value in np.flatnonzero(counts[1:]) + 1
            }
        references.append(reference)
    entry = {
        "threshold": DEFAULT_THRESHOLD,
        "measured_with": f"onnxruntime {ort.__version__} CPU",
        "references": references,
    }
    return entry, files


def _png(image: np.ndarray) -> bytes:
    """Lossless and deterministic: the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
