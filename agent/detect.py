"""DetectAnomalies: checking the request, reading the image, building the result."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from lookout_edge import shm
from lookout_edge.contract import clip_score, confidence_of, is_anomalous, verdict_label_map
from lookout_edge.package import BACKGROUND_COLOR, BACKGROUND_NAME, MAX_SIDE, MIN_SIDE, ModelPackage
from lookout_edge.protocol import pb2

from .backends.base import Inference
from .errors import InvalidArgument, ResourceExhausted, shown
from .models import ModelRegistry


@dataclass(frozen=True)
class ShmRegion:
    """A shared-memory handle of the request, checked for form; opened only when used."""

    what: str  # the request field, for messages
    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class ImageSource:
    """Where the request's image is, and the length of its rows in bytes."""

    data: bytes | ShmRegion
    row_bytes: int


def padded_row_bytes(width: int) -> int:
    """GStreamer's RGB row length: width x 3 rounded up to a multiple of 4 bytes."""
    return (width * 3 + 3) // 4 * 4


def _row_bytes(described: str, length: int, width: int, height: int) -> int:
    """The row length that makes `length` bytes a width x height bitmap: tight RGB888, or rows
    padded to 4 bytes as AWS's GStreamer element sends them (docs/api-compatibility.md)."""
    tight, padded = width * 3, padded_row_bytes(width)
    if length == tight * height:
        return tight
    if padded != tight and length == padded * height:
        return padded
    also = f" (or {padded * height} with rows padded to 4 bytes, as GStreamer's RGB buffers are)"
    raise InvalidArgument(
        f"{described}, but a {width}x{height} RGB888 bitmap is "
        f"width*height*3 = {tight * height} bytes" + (also if padded != tight else "")
    )


def _region(what: str, handle: pb2.SharedMemoryHandle) -> ShmRegion:
    try:
        name = "/" + shm.normalize_name(handle.name)
    except shm.SegmentError as exc:
        raise InvalidArgument(f"{what}.name: {exc}") from None
    return ShmRegion(what, name, handle.offset, handle.size)


def check_bitmap(bitmap: pb2.Bitmap, package: ModelPackage) -> ImageSource:
    """Validate the input bitmap; return its bytes, or the shared-memory region holding it."""
    width, height = bitmap.width, bitmap.height
    for side, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE:
            raise InvalidArgument(
                f"bitmap.{side} is {value}; it must be between {MIN_SIDE} and {MAX_SIDE} pixels"
            )
    if (width, height) != (package.width, package.height):
        raise InvalidArgument(
            f"bitmap is {width}x{height}, but model {shown(package.component_name)} was trained on "
            f"{package.width}x{package.height} images; resize the image to {package.width}x{package.height}"
        )
    kind = bitmap.WhichOneof("data")
    if kind == "byte_data":
        data = bitmap.byte_data  # each read of the field copies it: read it once
        return ImageSource(
            data, _row_bytes(f"bitmap.byte_data holds {len(data)} bytes", len(data), width, height)
        )
    if kind == "shared_memory_handle":
        handle = bitmap.shared_memory_handle
        row_bytes = _row_bytes(
            f"bitmap.shared_memory_handle.size is {handle.size}", handle.size, width, height
        )
        return ImageSource(_region("bitmap.shared_memory_handle", handle), row_bytes)
    raise InvalidArgument("bitmap has neither byte_data nor shared_memory_handle; set one of them")


def mask_region(request: pb2.DetectAnomaliesRequest, package: ModelPackage) -> ShmRegion | None:
    """The caller's shared memory for the mask, from field 2 or (sample-client proto) field 3."""
    if not request.HasField("anomaly_mask_params") or not package.is_segmentation:
        return None
    params = request.anomaly_mask_params
    for field in ("shared_memory_handle", "sample_client_shared_memory_handle"):
        if params.HasField(field):
            what = f"anomaly_mask_params.{field}"
            handle = getattr(params, field)
            expected = package.image_bytes
            if handle.size != expected:
                raise InvalidArgument(
                    f"{what}.size is {handle.size}, but a {package.width}x{package.height} RGB888 mask is "
                    f"width*height*3 = {expected} bytes"
                )
            return _region(what, handle)
    return None


def _open(region: ShmRegion, writable: bool, access: shm.SegmentAccess | None) -> shm.Region:
    try:
        return shm.Region.open(region.name, region.offset, region.size, writable, access)
    except shm.SegmentError as exc:
        raise InvalidArgument(f"{region.what}: {exc}") from None


def read_image(source: ImageSource, package: ModelPackage, access: shm.SegmentAccess | None) -> np.ndarray:
    """The [H, W, 3] image: a view of the request's bytes, or a copy of the caller's segment."""
    if isinstance(source.data, bytes):
        buffer = np.frombuffer(source.data, dtype=np.uint8)
    else:
        with _open(source.data, False, access) as region:
            try:
                buffer = region.read()
            except shm.SegmentError as exc:
                raise InvalidArgument(f"{source.data.what}: {exc}") from None
    rows = buffer.reshape(package.height, source.row_bytes)
    if source.row_bytes != package.width * 3:
        rows = np.ascontiguousarray(rows[:, : package.width * 3])
    return rows.reshape(package.height, package.width, 3)


def _palette(package: ModelPackage) -> np.ndarray:
    colors = [(255, 255, 255)] + [label.rgb for label in package.labels]
    # Labels the graph might emit beyond the manifest's list are drawn as background.
    return np.array(colors + [(255, 255, 255)] * (256 - len(colors)), dtype=np.uint8)


def _write_mask(label_map: np.ndarray, package: ModelPackage, region: shm.Region | None) -> pb2.Bitmap:
    painted = _palette(package)[label_map.astype(np.uint8, copy=False)]
    mask = pb2.Bitmap(width=package.width, height=package.height)
    if region is None:
        mask.byte_data = painted.tobytes()
        return mask
    try:
        region.write(painted)
    except shm.SegmentFull as exc:
        raise ResourceExhausted(f"anomaly_mask_params: {exc}") from None
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
    inference: Inference, package: ModelPackage, mask_target: shm.Region | None
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
    registry: ModelRegistry, request: pb2.DetectAnomaliesRequest, access: shm.SegmentAccess | None
) -> pb2.DetectAnomaliesResponse:
    """Validate the request, run the model and build the response.

    `access` says whose shared memory the agent may use for its callers (shm.SegmentAccess).
    The mask's segment is opened and checked
    before the model runs, so a bad mask handle costs no inference."""
    if not request.model_component:
        raise InvalidArgument("model_component is empty; pass the model's component name")
    if not request.HasField("bitmap"):
        raise InvalidArgument("bitmap is missing; pass the image as an RGB888 bitmap")
    with registry.acquire(request.model_component) as (package, model):
        source = check_bitmap(request.bitmap, package)
        mask_target = mask_region(request, package)
        image = read_image(source, package, access)
        with contextlib.ExitStack() as stack:
            mask = None if mask_target is None else stack.enter_context(_open(mask_target, True, access))
            inference = model.run(image)
            return pb2.DetectAnomaliesResponse(detect_anomaly_result=build_result(inference, package, mask))
