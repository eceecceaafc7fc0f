"""The PLC handshake of one camera, the same over OPC UA and Modbus (docs/factory-io.md).

    Ready ──PLC raises Trigger──► Busy ──result──► ResultReady + ResultOK|ResultNG ──PLC raises Ack──► Ready
                                       └─failure─► Error + ErrorCode ──────────────PLC raises Ack──► Ready

The state lives here, not in a connection: the protocol servers only show it and pass the
PLC's requests in, so a client that drops and reconnects finds the handshake where it was.
Every method is thread-safe and quick. Listeners are called under the lock with each new
state, in order, and must not block (the servers queue it to their own event loop).
"""

from __future__ import annotations

import datetime
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL_S = 1.0


class ErrorCode(enum.IntEnum):
    """`ErrorCode` as the PLC reads it; 0 while there is no error."""

    NONE = 0
    CAMERA = 1  # no frame from the camera: down, disconnected, an empty folder, the end of a file
    MODEL_NOT_RUNNING = 2  # the model is not RUNNING on the agent (stopped, failed, unknown)
    TIMEOUT = 3  # no result within trigger.timeout
    AGENT = 4  # the agent is unreachable or refused the image
    FRAME = 5  # the frame could not be used (a crop that does not fit, a file that does not decode)
    INTERNAL = 6  # anything else; see the daemon's log


class Refused(Exception):
    """A PLC request the handshake does not take in its present state; the message says why."""


@dataclass(frozen=True)
class Result:
    """The latest inspection's figures, from the event the sinks received."""

    is_anomalous: bool
    confidence: float
    anomaly_score: float
    threshold: float
    frame_id: int
    timestamp: datetime.datetime
    areas: tuple[tuple[str, float], ...]
    model: str


@dataclass(frozen=True)
class State:
    """Everything the PLC can read about one camera."""

    camera: str
    ready: bool = False
    busy: bool = False
    result_ready: bool = False
    result_ok: bool = False
    result_ng: bool = False
    error: bool = False
    error_code: int = ErrorCode.NONE
    error_message: str = ""
    config_index: int = 0
    result: Result | None = None
    inspected: int = 0  # results since the daemon started, triggered or free-running
    anomalous: int = 0


# The last inspection's outputs, as a trigger (going Busy) and an Ack (going Ready) clear them.
CLEARED_OUTPUTS: dict[str, Any] = {
    "result_ready": False,
    "result_ok": False,
    "result_ng": False,
    "error": False,
    "error_code": ErrorCode.NONE,
    "error_message": "",
}


@dataclass(frozen=True)
class Inspection:
    """One accepted trigger, handed to the camera worker."""

    number: int
    model: str
    config_index: int
    source: str  # opcua, modbus or gpio
    triggered: float  # time.monotonic() at the trigger
    deadline: float


def result_of(event: dict[str, Any]) -> Result:
    return Result(
        is_anomalous=bool(event["is_anomalous"]),
        confidence=float(event["confidence"]),
        anomaly_score=float(event["anomaly_score"]),
        threshold=float(event["threshold"]),
        frame_id=int(event["frame_id"]),
        timestamp=datetime.datetime.fromisoformat(event["time"]),
        areas=tuple((str(a["name"]), float(a["area"])) for a in event["anomalies"]),
        model=str(event["model"]),
    )


class Handshake:
    """The state machine of one camera.

    `trigger_type` is the protocol that owns the handshake (None: a free-running camera, never
    Ready); requests from another protocol are refused. `models` is the ConfigIndex table.
    """

    def __init__(
        self, camera: str, models: tuple[str, ...], trigger_type: str | None, timeout: float
    ) -> None:
        self.camera = camera
        self.models = models
        self.trigger_type = trigger_type
        self.timeout = timeout
        # A digital trigger has no Ack line: the result (or error) is shown, then cleared at once.
        self.auto_ack = trigger_type == "gpio"
        self._lock = threading.RLock()  # start() and acknowledge() also run inside set_level()
        self._wake = threading.Condition(self._lock)
        self._state = State(camera)
        self._listeners: list[Callable[[State], None]] = []
        self._serving = False
        self._levels = {"trigger": False, "ack": False}  # as the owning PLC last wrote them
        self._current: Inspection | None = None  # accepted, not finished
        self._pending: Inspection | None = None  # accepted, not taken by the worker yet
        self._timer: threading.Timer | None = None
        self._number = 0
        self.counts = {"triggers": 0, "refused": 0, "errors": 0}
        self._refusal_logged = -REFUSAL_LOG_INTERVAL_S
        self._refusals_unlogged = 0

    # -- reading -------------------------------------------------------------------------
    def state(self) -> State:
        with self._lock:
            return self._state

    def subscribe(self, listener: Callable[[State], None]) -> None:
        """Call `listener` with the present state now and with every new state from now on."""
        with self._lock:
            self._listeners.append(listener)
            listener(self._state)

    def _set(self, **changes: Any) -> None:
        """Under the lock: the new state, to every listener."""
        self._state = replace(self._state, **changes)
        for listener in self._listeners:
            try:
                listener(self._state)
            except Exception:  # a broken output must not stop the handshake or the others
                log.exception("camera %s: an output failed on a state change", self.camera)

    def _refuse(self, message: str) -> Refused:
        """Count and log a refusal; a PLC repeating one every scan gets a line a second at most."""
        self.counts["refused"] += 1
        now = time.monotonic()
        if now - self._refusal_logged >= REFUSAL_LOG_INTERVAL_S:
            more = (
                f" ({self._refusals_unlogged} more refused since the last line)"
                if self._refusals_unlogged
                else ""
            )
            log.warning("camera %s: %s%s", self.camera, message, more)
            self._refusal_logged, self._refusals_unlogged = now, 0
        else:
            self._refusals_unlogged += 1
        return Refused(f"camera {self.camera}: {message}")

    def _check_owner(self, source: str) -> None:
        if self.trigger_type is None:
            raise self._refuse("free-running, it takes no trigger (configure cameras[].trigger)")
        if source != self.trigger_type:
            raise self._refuse(f"triggered over {self.trigger_type}, not {source}")

    def _phase(self) -> str:
        state = self._state
        if state.busy:
            return "Busy"
        if state.result_ready:
            return "ResultReady, waiting for Ack"
        if state.error:
            return "Error, waiting for Ack"
        return "Ready" if self._serving else "not serving (the camera is starting or stopping)"

    # -- the PLC's requests ----------------------------------------------------------------
    def start(self, source: str) -> Inspection:
        """Accept a trigger (a method call, a rising Trigger, a digital input edge)."""
        with self._lock:
            self._check_owner(source)
            if not self._state.ready:
                raise self._refuse(f"trigger refused: not Ready ({self._phase()})")
            self._number += 1
            now = time.monotonic()
            inspection = Inspection(
                self._number,
                self.models[self._state.config_index],
                self._state.config_index,
                source,
                now,
                now + self.timeout,
            )
            self._current = self._pending = inspection
            self.counts["triggers"] += 1
            self._set(ready=False, busy=True, **CLEARED_OUTPUTS)
            self._timer = threading.Timer(self.timeout, self._timed_out, (inspection,))
            self._timer.daemon = True
            self._timer.start()
            self._wake.notify_all()
            return inspection

    def acknowledge(self, source: str) -> None:
        """The PLC has the result (or the error): clear the outputs, Ready again."""
        with self._lock:
            self._check_owner(source)
            if not (self._state.result_ready or self._state.error):
                raise self._refuse(f"Ack refused: nothing to acknowledge ({self._phase()})")
            self._clear()

    def _clear(self) -> None:
        """Under the lock: the outputs cleared, Ready again if the camera is serving."""
        self._set(ready=self._serving, **CLEARED_OUTPUTS)

    def set_level(self, name: str, level: bool, source: str) -> None:
        """The PLC wrote `Trigger` or `Ack`: a rising edge (False to True) is the request.

        A refused rise is not stored, so the PLC's next write of True is an edge again.
        """
        with self._lock:
            self._check_owner(source)
            if level and not self._levels[name]:
                if name == "trigger":
                    self.start(source)
                else:
                    self.acknowledge(source)
            self._levels[name] = level

    def set_config_index(self, index: int, source: str) -> None:
        with self._lock:
            self._check_owner(source)
            if not 0 <= index < len(self.models):
                raise self._refuse(
                    f"ConfigIndex {index} refused: 0 to {len(self.models) - 1} "
                    f"({', '.join(f'{i}: {m}' for i, m in enumerate(self.models))})"
                )
            self._set(config_index=index)

    # -- the camera worker's side ------------------------------------------------------------
    def set_serving(self, serving: bool) -> None:
        """The worker waits for triggers (True) or stops (False); Ready follows when idle."""
        with self._lock:
            self._serving = serving
            idle = not (self._state.busy or self._state.result_ready or self._state.error)
            if self.trigger_type is not None and idle:
                self._set(ready=serving)

    def next_inspection(self, timeout: float) -> Inspection | None:
        """The accepted trigger the worker is to run, waiting up to `timeout` seconds for one."""
        with self._lock:
            self._wake.wait_for(lambda: self._pending is not None, timeout)
            inspection, self._pending = self._pending, None
            return inspection

    def record(self, event: dict[str, Any]) -> None:
        """Every result of this camera (triggered or free-running), as the sinks got it."""
        result = result_of(event)
        with self._lock:
            self._set(
                result=result,
                inspected=self._state.inspected + 1,
                anomalous=self._state.anomalous + int(result.is_anomalous),
            )

    def complete(self, inspection: Inspection, event: dict[str, Any]) -> None:
        """The triggered inspection's result is recorded: raise ResultReady with OK or NG."""
        with self._lock:
            if not self._finish(inspection):
                log.warning(
                    "camera %s: inspection %d finished after its timeout; its event went to the sinks",
                    self.camera,
                    inspection.number,
                )
                return
            anomalous = bool(event["is_anomalous"])
            self._set(busy=False, result_ok=not anomalous, result_ng=anomalous, result_ready=True)
            if self.auto_ack:
                self._clear()

    def fail(self, inspection: Inspection, code: ErrorCode, message: str) -> None:
        with self._lock:
            if not self._finish(inspection):
                return
            self.counts["errors"] += 1
            log.error(
                "camera %s: inspection %d failed (%s): %s", self.camera, inspection.number, code.name, message
            )
            self._set(busy=False, result_ready=False, error=True, error_code=code, error_message=message)
            if self.auto_ack:
                self._clear()

    def _finish(self, inspection: Inspection) -> bool:
        """Under the lock: whether `inspection` was still running; it is not from now on."""
        if self._current is not inspection:
            return False
        self._current = None
        if self._pending is inspection:
            self._pending = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return True

    def _timed_out(self, inspection: Inspection) -> None:
        self.fail(inspection, ErrorCode.TIMEOUT, f"no result within trigger.timeout ({self.timeout:g} s)")

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
