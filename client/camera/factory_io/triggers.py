"""From a PLC's trigger to the camera worker and back, and the hub that runs the outputs.

A triggered camera's worker waits on its `Handshake` for an accepted trigger, takes the frame
for it (`grab_frame`), runs it, records the event and completes or fails the inspection
(`failure` turns what went wrong into an `ErrorCode`). The servers (OPC UA, Modbus) and the
digital I/O only see the handshakes: nothing they do can block a camera, and a camera never
waits for them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import grpc

from lookout_edge.client.edge_client import EdgeAgentError

from ..config import DaemonConfig
from ..sources import Frame, FrameError, FrameSource
from .handshake import ErrorCode, Handshake, Inspection
from .settings import GpioOutput, ModbusOutput, OpcUaOutput

log = logging.getLogger(__name__)

# A frame is waited for until this share of trigger.timeout is left, so that a camera that
# gives none is reported as CAMERA rather than as TIMEOUT.
FRAME_WAIT_MARGIN = 0.1


class CameraUnavailable(Exception):
    """No frame for a trigger: the camera is down, the folder stays empty, the file has ended."""


def grab_frame(source: FrameSource, live: bool, inspection: Inspection, stop: threading.Event) -> Frame:
    """The frame for a trigger: from a live camera the first frame decoded after the trigger
    (never one from before it, when the part may not have been in place); from a folder or a
    video file the next one."""
    wait_until = inspection.deadline - FRAME_WAIT_MARGIN * (inspection.deadline - inspection.triggered)
    while not stop.is_set():
        remaining = wait_until - time.monotonic()
        if remaining <= 0:
            break
        frame = source.next_frame(timeout=min(remaining, 0.5))
        if frame is not None and (not live or frame.captured_monotonic >= inspection.triggered):
            return frame
        if frame is None and source.finished:
            raise CameraUnavailable("the camera's source has ended")
    if stop.is_set():
        raise CameraUnavailable("the daemon is stopping")
    waited = wait_until - inspection.triggered
    raise CameraUnavailable(f"no frame from the camera within {waited:.1f} s of the trigger")


def failure(exc: Exception) -> tuple[ErrorCode, str]:
    """The ErrorCode and message the PLC gets for an inspection that raised `exc`."""
    message = str(exc) or type(exc).__name__
    if isinstance(exc, CameraUnavailable):
        return ErrorCode.CAMERA, message
    if isinstance(exc, EdgeAgentError):
        if exc.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
            return ErrorCode.MODEL_NOT_RUNNING, message
        if exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ErrorCode.TIMEOUT, message
        return ErrorCode.AGENT, message
    if isinstance(exc, (FrameError, ValueError)):
        return ErrorCode.FRAME, message
    return ErrorCode.INTERNAL, message


class Output(Protocol):
    name: str

    def start(self) -> None:
        """Bind and serve; raises when it cannot (the output is then left out)."""

    def stop(self) -> None:
        """Stop; idempotent."""


class FactoryIO:
    """Every camera's handshake, and the outputs and digital inputs that serve them."""

    def __init__(self, config: DaemonConfig) -> None:
        self.handshakes: dict[str, Handshake] = {}
        for camera in config.cameras:
            trigger = camera.trigger
            models = (camera.model, *(trigger.models if trigger else ()))
            self.handshakes[camera.name] = Handshake(
                camera.name,
                models,
                trigger.type if trigger else None,
                trigger.timeout if trigger else 0.0,
            )
        names = [camera.name for camera in config.cameras]
        self._outputs: list[Output] = []
        for index, output in enumerate(config.outputs):
            served = [n for n in names if output.cameras is None or n in output.cameras]
            try:
                self._outputs.append(self._build(output, served, names))
            except (ImportError, OSError, ValueError) as exc:
                log.error("outputs[%d] (%s) is disabled: %s", index, output.type, exc)
        for index, camera in enumerate(config.cameras):
            if camera.trigger is not None and camera.trigger.type == "gpio":
                try:
                    from .gpio import GpioTrigger
                except ImportError as exc:  # the camera stays Ready, but nothing can trigger it
                    log.error("cameras[%d] (%s).trigger is disabled: %s", index, camera.name, exc)
                    continue
                self._outputs.append(GpioTrigger(camera.trigger, self.handshakes[camera.name]))
        self._started: list[Output] = []

    def _build(
        self, output: OpcUaOutput | ModbusOutput | GpioOutput, served: list[str], names: list[str]
    ) -> Output:
        if isinstance(output, OpcUaOutput):
            from .opcua import OpcUaServer

            return OpcUaServer(output, [self.handshakes[n] for n in served])
        if isinstance(output, ModbusOutput):
            from .modbus import ModbusServer

            return ModbusServer(output, {names.index(n): self.handshakes[n] for n in served})
        from .gpio import GpioOutputs

        return GpioOutputs(output, [self.handshakes[n] for n in served])

    def start(self) -> None:
        """Start every output; one that cannot start is logged and left out, the others run."""
        for output in self._outputs:
            try:
                output.start()
            except Exception as exc:
                log.error("%s is disabled: %s", output.name, exc)
                output.stop()
                continue
            self._started.append(output)
            log.info("%s serving", output.name)

    def stop(self) -> None:
        for output in self._started:
            try:
                output.stop()
            except Exception as exc:
                log.error("%s: cannot stop: %s", output.name, exc)
        for handshake in self.handshakes.values():
            handshake.close()
