"""DetectAnomalies: checking the request, reading the image, building the result."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookout_edge import shm
from lookout_edge.contract import clip_score, confidence_of, is_anomalous, verdict_label_map
from lookout_edge.package import BACKGROUND_COLOR, BACKGROUND_NAME, MAX_SIDE, MIN_SIDE, ModelPackage
from lookout_edge.protocol import pb2

from .backends.base import Backend, Inference
from .errors import InvalidArgument
from .models import ModelRegistry


@dataclass(frozen=True)
class ShmRegion:
    name: str
    offset: int
    size: int


def _check_region(what: str, handle: pb2.SharedMemoryHandle, width: int, height: int) -> ShmRegion:
    expected = width * height * 3
    if handle.size != expected:
        raise InvalidArgument(
            f"{what}.size is {handle.size}, but a {width}x{height} RGB888 bitmap is "
            f"width*height*3 = {expected} bytes"
        )
    try:
        name = "/" + shm.normalize_name(handle.name)
    except shm.SegmentError as exc:
        raise InvalidArgument(f"{what}.name: {exc}") from None
    return ShmRegion(name, handle.offset, handle.size)


def check_bitmap(bitmap: pb2.Bitmap, package: ModelPackage) -> bytes | ShmRegion:
    """Validate the input bitmap; return its bytes, or the shared-memory region holding it."""
    width, height = bitmap.width, bitmap.height
    for side, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise InvalidArgument(
                f"bitmap.{side} is {value}; it must be between {MIN_SIDE} and {MAX_SIDE} pixels"
            )
    if (width, height) != (package.width, package.height):
        raise InvalidArgument(
            f"bitmap is {width}x{height}, but model '{package.component_name}' was trained on "
            f"{package.width}x{package.height} images; resize the image to {package.width}x{package.height}"
        )
    kind = bitmap.WhichOneof("data")
    if kind == "byte_data":
        data = bitmap.byte_data  # each read of the field copies it: read it once
        expected = width * height * 3
        if len(data) != expected:
            raise InvalidArgument(
                f"bitmap.byte_data holds {len(data)} bytes, but a {width}x{height} RGB888 bitmap "
                f"is width*height*3 = {expected} bytes"
            )
        return data
    if kind == "shared_memory_handle":
        return _check_region("bitmap.shared_memory_handle", bitmap.shared_memory_handle, width, height)
    raise InvalidArgument("bitmap has neither byte_data nor shared_memory_handle; set one of them")


def mask_region(request: pb2.DetectAnomaliesRequest, package: ModelPackage) -> ShmRegion | None:
    """The caller's shared memory for the mask, from field 2 or (sample-client proto) field 3."""
    if not request.HasField("anomaly_mask_params") or not package.is_segmentation:
        return None
    params = request.anomaly_mask_params
    for field in ("shared_memory_handle", "sample_client_shared_memory_handle"):
        if params.HasField(field):
            return _check_region(
                f"anomaly_mask_params.{field}", getattr(params, field), package.width, package.height
            )
    return None


def _run_model(model: Backend, source: bytes | ShmRegion, package: ModelPackage) -> Inference:
    shape = (package.height, package.width, 3)
    if isinstance(source, bytes):
        return model.run(np.frombuffer(source, dtype=np.uint8).reshape(shape))
    try:
        return shm.with_region(
            source.name, source.offset, source.size, lambda view: model.run(view.reshape(shape))
        )
    except shm.SegmentError as exc:
        raise InvalidArgument(f"bitmap.shared_memory_handle: {exc}") from None


def _palette(package: ModelPackage) -> np.ndarray:
    colors = [(255, 255, 255)] + [label.rgb for label in package.labels]
    # Labels the graph might emit beyond the manifest's list are drawn as background.
    return np.array(colors + [(255, 255, 255)] * (256 - len(colors)), dtype=np.uint8)


def _write_mask(label_map: np.ndarray, package: ModelPackage, region: ShmRegion | None) -> pb2.Bitmap:
    labels = label_map.astype(np.uint8, copy=False)
    palette = _palette(package)
    mask = pb2.Bitmap(width=package.width, height=package.height)
    if region is None:
        mask.byte_data = palette[labels].tobytes()
        return mask

    def paint(view: np.ndarray) -> None:
        np.take(palette, labels, axis=0, out=view.reshape((*labels.shape, 3)))

    try:
        shm.with_region(region.name, region.offset, region.size, paint, writable=True)
    except shm.SegmentError as exc:
        raise InvalidArgument(f"anomaly_mask_params: {exc}") from None
    mask.shared_memory_handle.name = region.name
    mask.shared_memory_handle.offset = region.offset
    mask.shared_memory_handle.size = region.size
    return mask


def _anomalies(label_map: np.ndarray, package: ModelPackage) -> list[pb2.Anomaly]:
    counts = np.bincount(label_map.reshape(-1).astype(np.intp, copy=False), minlength=len(package.labels) + 1)
    total = float(label_map.size)
    background = float(counts[0] + counts[len(package.labels) + 1 :].sum())
    result = [
        pb2.Anomaly(
            name=BACKGROUND_NAME,
            pixel_anomaly=pb2.PixelAnomaly(
                total_percentage_area=background / total, hex_color=BACKGROUND_COLOR
            ),
        )
    ]
    for index, label in enumerate(package.labels, start=1):
        result.append(
            pb2.Anomaly(
                name=label.name,
                pixel_anomaly=pb2.PixelAnomaly(
                    total_percentage_area=float(counts[index]) / total, hex_color=label.color
                ),
            )
        )
    return result


def build_result(
    inference: Inference, package: ModelPackage, mask_target: ShmRegion | None
) -> pb2.DetectAnomalyResult:
    score = clip_score(inference.anomaly_score)
    threshold = package.threshold
    anomalous = is_anomalous(score, threshold)
    confidence = inference.confidence if inference.confidence is not None else confidence_of(score, threshold)
    result = pb2.DetectAnomalyResult(
        is_anomalous=anomalous,
        confidence=clip_score(confidence),
        anomaly_score=score,
        anomaly_threshold=threshold,
    )
    if inference.label_map is not None:
        label_map = verdict_label_map(inference.label_map, anomalous)
        result.anomalies.extend(_anomalies(label_map, package))
        result.anomaly_mask.CopyFrom(_write_mask(label_map, package, mask_target))
    return result


def detect_anomalies(
    registry: ModelRegistry, request: pb2.DetectAnomaliesRequest
) -> pb2.DetectAnomaliesResponse:
    """Validate the request, run the model and build the response."""
    if not request.model_component:
        raise InvalidArgument("model_component is empty; pass the model's component name")
    if not request.HasField("bitmap"):
        raise InvalidArgument("bitmap is missing; pass the image as an RGB888 bitmap")
    with registry.acquire(request.model_component) as (package, model):
        source = check_bitmap(request.bitmap, package)
        mask_target = mask_region(request, package)
        inference = _run_model(model, source, package)
        return pb2.DetectAnomaliesResponse(
            detect_anomaly_result=build_result(inference, package, mask_target)
        )
