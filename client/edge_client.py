"""A typed Python client for the Edge Agent API (lookout-edge's or any wire-compatible agent)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from lookout_edge import DEFAULT_SOCKET
from lookout_edge.images import to_rgb888
from lookout_edge.protocol import GRPC_MESSAGE_OPTIONS, pb2, pb2_grpc
from lookout_edge.shm import OwnedSegment

__all__ = ["AnomalyArea", "Detection", "EdgeAgentClient", "EdgeAgentError", "ModelState", "as_rgb_array"]

ImageInput = np.ndarray | Image.Image | str | Path


class EdgeAgentError(Exception):
    """A failed call: the gRPC status code and the agent's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ModelState:
    name: str
    model_arn: str
    status: str  # STOPPED, STARTING, RUNNING, FAILED or STOPPING
    status_message: str


@dataclass(frozen=True)
class AnomalyArea:
    name: str
    area: float  # fraction of the image, 0..1
    hex_color: str


@dataclass(frozen=True)
class Detection:
    is_anomalous: bool
    confidence: float
    anomaly_score: float
    anomaly_threshold: float
    anomalies: list[AnomalyArea]
    mask: np.ndarray | None  # [H, W, 3] uint8 for segmentation models


def as_rgb_array(image: ImageInput) -> np.ndarray:
    """An [H, W, 3] uint8 RGB array from an array, a PIL image or an image file path.

    Gray images and arrays (8-bit, 16-bit) are replicated to RGB by the rule of
    `lookout_edge.images`, the one the trainer reads its images with.
    """
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return to_rgb888(opened)
    if isinstance(image, Image.Image):
        return to_rgb888(image)
    return to_rgb888(np.asarray(image))


def _state(description: Any) -> ModelState:
    return ModelState(
        name=description.model_component,
        model_arn=description.lookout_vision_model_arn,
        status=pb2.ModelStatus.Name(description.status),
        status_message=description.status_message,
    )


def _socket_group(address: str) -> int | None:
    """The group of a unix: socket's file, where this process may give its files that group
    (it belongs to it, or is root). The client's segments get that group: the agent uses
    shared memory its socket's group may use (docs/agent.md#security)."""
    path = address.removeprefix("unix://") if address.startswith("unix://") else address.removeprefix("unix:")
    try:
        gid = os.stat(path).st_gid
    except OSError:
        return None
    return gid if os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups() else None


class EdgeAgentClient:
    """Talks to the agent over its socket. Not thread-safe when `shared_memory=True` is used.

    Its channel takes messages up to the agent's limit (the largest bitmap and its mask as bytes),
    not gRPC's default 4 MiB, which a mask returned as bytes exceeds from about 1.4 megapixels.
    """

    def __init__(
        self,
        socket: str = DEFAULT_SOCKET,
        timeout: float | None = 30.0,
        shm_prefix: str = "lookout_edge_client",
        shm_mode: int = 0o660,
    ) -> None:
        self._address = socket
        self._channel = grpc.insecure_channel(socket, options=GRPC_MESSAGE_OPTIONS)
        self._stub = pb2_grpc.EdgeAgentStub(self._channel)
        self._timeout = timeout
        self._segment: OwnedSegment | None = None
        self._shm_prefix = shm_prefix
        self._shm_mode = shm_mode

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise EdgeAgentError(exc.code(), exc.details() or "") from None

    def list_models(self) -> list[ModelState]:
        return [_state(model) for model in self._call("ListModels", pb2.ListModelsRequest()).models]

    def describe_model(self, name: str) -> ModelState:
        response = self._call("DescribeModel", pb2.DescribeModelRequest(model_component=name))
        return _state(response.model_description)

    def start_model(self, name: str) -> str:
        response = self._call("StartModel", pb2.StartModelRequest(model_component=name))
        return pb2.ModelStatus.Name(response.status)

    def stop_model(self, name: str) -> str:
        response = self._call("StopModel", pb2.StopModelRequest(model_component=name))
        return pb2.ModelStatus.Name(response.status)

    def start_and_wait(self, name: str, timeout: float = 60.0, poll: float = 0.1) -> ModelState:
        """Start the model if needed and wait until it is RUNNING; raise if it fails or times out."""
        deadline = time.monotonic() + timeout
        started = False
        while True:
            state = self.describe_model(name)
            if state.status == "RUNNING":
                return state
            if state.status == "FAILED" and started:
                raise EdgeAgentError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"model {name} failed: {state.status_message}"
                )
            if state.status in ("STOPPED", "FAILED"):
                self.start_model(name)
                started = True
            elif time.monotonic() > deadline:
                raise TimeoutError(f"model {name} is still {state.status} after {timeout:.0f} s")
            time.sleep(poll)

    def detect(self, image: ImageInput, model: str, shared_memory: bool = False) -> Detection:
        """Run DetectAnomalies on one image, sending it as bytes or through shared memory."""
        pixels = as_rgb_array(image)
        height, width = pixels.shape[:2]
        size = pixels.nbytes
        request = pb2.DetectAnomaliesRequest(model_component=model)
        request.bitmap.width, request.bitmap.height = width, height
        if not shared_memory:
            request.bitmap.byte_data = pixels.tobytes()
            return self._detection(self._call("DetectAnomalies", request).detect_anomaly_result, None)
        segment = self._segment_for(2 * size)
        segment.array(size)[:] = pixels.reshape(-1)
        handle = request.bitmap.shared_memory_handle
        handle.name, handle.offset, handle.size = segment.name, 0, size
        mask = request.anomaly_mask_params.shared_memory_handle
        mask.name, mask.offset, mask.size = segment.name, size, size
        result = self._call("DetectAnomalies", request).detect_anomaly_result
        return self._detection(result, segment)

    @property
    def segment_name(self) -> str | None:
        """The shared-memory segment this client owns and reuses, once `detect` has created it."""
        return None if self._segment is None else self._segment.name

    def _segment_for(self, size: int) -> OwnedSegment:
        if self._segment is None or self._segment.size < size:
            if self._segment is not None:
                self._segment.close()
            self._segment = OwnedSegment.create(
                size, prefix=self._shm_prefix, mode=self._shm_mode, group=_socket_group(self._address)
            )
        return self._segment

    @staticmethod
    def _detection(result: Any, segment: OwnedSegment | None) -> Detection:
        mask = None
        if result.HasField("anomaly_mask"):
            bitmap = result.anomaly_mask
            shape = (bitmap.height, bitmap.width, 3)
            if bitmap.WhichOneof("data") == "byte_data":
                mask = np.frombuffer(bitmap.byte_data, dtype=np.uint8).reshape(shape).copy()
            elif segment is not None:
                handle = bitmap.shared_memory_handle
                start = handle.offset
                mask = segment.array()[start : start + handle.size].reshape(shape).copy()
        return Detection(
            is_anomalous=result.is_anomalous,
            confidence=result.confidence,
            anomaly_score=result.anomaly_score,
            anomaly_threshold=result.anomaly_threshold,
            anomalies=[
                AnomalyArea(a.name, a.pixel_anomaly.total_percentage_area, a.pixel_anomaly.hex_color)
                for a in result.anomalies
            ],
            mask=mask,
        )

    def close(self) -> None:
        if self._segment is not None:
            self._segment.close()
            self._segment = None
        self._channel.close()

    def __enter__(self) -> EdgeAgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
