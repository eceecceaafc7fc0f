"""The camera daemon: one worker thread per camera, frames → shared memory → DetectAnomalies → sinks."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from lookout_edge.client.edge_client import Detection, EdgeAgentClient, EdgeAgentError
from lookout_edge.shm import SHM_DIR

from .capture import Capture
from .config import CameraConfig, DaemonConfig
from .dashboard.api import Api, ModelStates
from .dashboard.feed import CameraFeed, Feed
from .dashboard.metrics import Metrics
from .dashboard.review import ReviewStore
from .dashboard.server import Dashboard
from .factory_io.handshake import ErrorCode, Handshake, Inspection
from .factory_io.triggers import FactoryIO, failure, grab_frame
from .images import ImageStore
from .sinks import Sink, build_sink
from .sources import Frame, FrameError, FrameSource, open_source, to_model_input
from .status import CameraStats, StatusReporter

log = logging.getLogger(__name__)

SHM_PREFIX = "lookout_edge_camera"
AGENT_RETRY_INITIAL_S = 0.5
AGENT_RETRY_MAX_S = 10.0
STOP_GRACE_S = 5.0  # beyond agent.timeout, for the cameras to finish their frame at a stop


def segment_prefix(camera: str) -> str:
    return f"{SHM_PREFIX}_{camera}"


def remove_stale_segments() -> list[str]:
    """Unlink this daemon's segments left by a process that no longer exists (after SIGKILL).

    Names are `lookout_edge_camera_<camera>_<pid>_<token>` (see OwnedSegment.create).
    """
    removed = []
    for path in SHM_DIR.glob(f"{SHM_PREFIX}_*"):
        parts = path.name.rsplit("_", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
    return removed


def make_event(
    camera: CameraConfig,
    frame: Frame,
    detection: Detection,
    detect_ms: float,
    image: Path | None,
    model: str | None = None,
) -> dict[str, Any]:
    """The event of one inference; `model` when the PLC selected another than the camera's."""
    now = time.monotonic()
    return {
        "event_id": uuid.uuid4().hex,
        "camera": camera.name,
        "model": model or camera.model,
        "time": datetime.datetime.fromtimestamp(frame.captured, datetime.timezone.utc).isoformat(
            timespec="milliseconds"
        ),
        "frame_id": frame.frame_id,
        "source_file": frame.origin,
        "is_anomalous": detection.is_anomalous,
        "confidence": round(detection.confidence, 6),
        "anomaly_score": round(detection.anomaly_score, 6),
        "threshold": round(detection.anomaly_threshold, 6),
        "anomalies": [
            {"name": a.name, "area": round(a.area, 6), "color": a.hex_color} for a in detection.anomalies
        ],
        "latency_ms": {
            "detect": round(detect_ms, 2),
            "capture_to_result": round((now - frame.captured_monotonic) * 1000, 2),
        },
        "image": str(image) if image is not None else None,
    }


class CameraWorker:
    """One camera's thread: frames from its source, DetectAnomalies, events to the sinks.

    A failure of one frame or file (it does not decode, it is too large, the agent rejects it,
    a bug) is logged, counted in the status and skipped: only `stop` ends the thread.
    """

    def __init__(
        self,
        camera: CameraConfig,
        config: DaemonConfig,
        sinks: list[Sink],
        images: ImageStore | None,
        capture: Capture | None = None,
    ) -> None:
        self.camera = camera
        self.stats = CameraStats(camera.name)
        self._config = config
        self._sinks = sinks
        self._images = images
        self._capture = capture
        # Set by the daemon when the dashboard is on.
        self.feed: CameraFeed | None = None
        self.metrics: Metrics | None = None
        # Set by the daemon when there are outputs or triggers (docs/factory-io.md).
        self.handshake: Handshake | None = None
        self._size = (camera.width, camera.height) if camera.width and camera.height else None
        self._agent_delay = AGENT_RETRY_INITIAL_S
        self._model_ready = not config.start_models
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"camera-{camera.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        client = EdgeAgentClient(
            self._config.agent_socket,
            timeout=self._config.agent_timeout,
            shm_prefix=segment_prefix(self.camera.name),
            shm_mode=self._config.shm_mode,
        )
        source: FrameSource | None = None
        try:
            source = open_source(self.camera, self.stats, self._config.state_dir)
            if self.camera.kind != "live":
                self.stats.set_connected(True)
            if self.handshake is not None and self.handshake.trigger_type is not None:
                self._serve_triggers(client, source, self.handshake)
            else:
                self._loop(client, source)
        except Exception:  # the source cannot be opened; the other cameras carry on
            log.exception("camera %s stopped", self.camera.name)
            self.stats.error("worker stopped, see the log")
            self.stats.set_connected(False)
        finally:
            if source is not None:
                source.close()
            client.close()

    def _loop(self, client: EdgeAgentClient, source: FrameSource) -> None:
        camera = self.camera
        period = 1.0 / camera.max_fps if camera.max_fps else 0.0
        next_slot = time.monotonic()
        while not self._stop.is_set():
            if not self._model_ready:
                self._start_model(client)
                continue
            # Latest-frame semantics: wait for the slot first, then take the newest frame.
            if period and self._stop.wait(max(0.0, next_slot - time.monotonic())):
                return
            try:
                frame = source.next_frame(timeout=1.0)
                if frame is None:
                    if source.finished:
                        log.info("camera %s: end of %s", camera.name, camera.source)
                        self.stats.set_connected(False)
                        return
                    continue
                next_slot = max(next_slot + period, time.monotonic()) if period else 0.0
                self._infer(client, frame)
            except Exception as exc:  # this frame or file only: go on with the next
                self._frame_failed(exc)

    def _frame_failed(self, exc: Exception) -> None:
        message = str(exc) or type(exc).__name__
        self.stats.error(message)
        if isinstance(exc, FrameError):
            log.error("camera %s: %s", self.camera.name, message)
        else:
            log.error("camera %s: a frame failed, skipped", self.camera.name, exc_info=exc)

    def _start_model(self, client: EdgeAgentClient) -> None:
        try:
            client.start_and_wait(self.camera.model, timeout=60.0)
            self._model_ready = True
        except Exception as exc:  # the agent is down, the model fails to start: retry, backing off
            self.stats.error(f"model {self.camera.model}: {exc}")
            log.warning("camera %s: model %s not running: %s", self.camera.name, self.camera.model, exc)
            self._back_off()

    def _back_off(self) -> None:
        self._stop.wait(self._agent_delay)
        self._agent_delay = min(self._agent_delay * 2, AGENT_RETRY_MAX_S)

    def _serve_triggers(self, client: EdgeAgentClient, source: FrameSource, handshake: Handshake) -> None:
        """A triggered camera: one inspection per accepted trigger, each ending in a result or an
        error for the PLC. Ready only once the camera's model runs (with agent.start_models); the
        other models of the ConfigIndex table are started once, and one that is not running fails
        its inspections with MODEL_NOT_RUNNING (and is asked to start again)."""
        while not self._model_ready and not self._stop.is_set():
            self._start_model(client)
        if self._config.start_models and not self._stop.is_set():
            for model in dict.fromkeys(handshake.models[1:]):
                try:
                    client.start_and_wait(model, timeout=60.0)
                except Exception as exc:
                    self.stats.error(f"model {model}: {exc}")
                    log.warning("camera %s: model %s not running: %s", self.camera.name, model, exc)
        handshake.set_serving(True)
        try:
            while not self._stop.is_set():
                inspection = handshake.next_inspection(timeout=0.5)
                if inspection is not None:
                    self._inspect(client, source, handshake, inspection)
        finally:
            handshake.set_serving(False)

    def _inspect(
        self, client: EdgeAgentClient, source: FrameSource, handshake: Handshake, inspection: Inspection
    ) -> None:
        try:
            frame = grab_frame(source, self.camera.kind == "live", inspection, self._stop)
            pixels, detection, detect_ms = self._detect(client, frame, inspection.model)
        except Exception as exc:  # the PLC gets Error with its code; the camera takes the next trigger
            code, message = failure(exc)
            self.stats.error(message)
            if code == ErrorCode.INTERNAL:
                log.error("camera %s: an inspection failed", self.camera.name, exc_info=exc)
            handshake.fail(inspection, code, message)  # logs the code and the message
            if code == ErrorCode.MODEL_NOT_RUNNING and self._config.start_models:
                with contextlib.suppress(EdgeAgentError):  # for the next trigger; not waited for
                    client.start_model(inspection.model)
            return
        event = self._publish(frame, pixels, detection, detect_ms, inspection.model)
        handshake.complete(inspection, event)

    def _detect(self, client: EdgeAgentClient, frame: Frame, model: str) -> tuple[Any, Detection, float]:
        """The model's input, its detection and the DetectAnomalies time in ms; raises."""
        pixels = to_model_input(frame.raw, self.camera.crop, self._size)
        started = time.monotonic()
        detection = client.detect(pixels, model, shared_memory=True)
        return pixels, detection, (time.monotonic() - started) * 1000

    def _infer(self, client: EdgeAgentClient, frame: Frame) -> None:
        camera = self.camera
        try:
            pixels, detection, detect_ms = self._detect(client, frame, camera.model)
        except EdgeAgentError as exc:
            self.stats.error(str(exc))
            log.warning("camera %s: DetectAnomalies failed: %s", camera.name, exc)
            if exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._back_off()
            elif exc.code == grpc.StatusCode.FAILED_PRECONDITION and self._config.start_models:
                self._model_ready = False
            return
        except ValueError as exc:  # a crop that does not fit the frame
            self.stats.error(str(exc))
            return
        self._agent_delay = AGENT_RETRY_INITIAL_S
        self._publish(frame, pixels, detection, detect_ms, camera.model)

    def _publish(
        self, frame: Frame, pixels: Any, detection: Detection, detect_ms: float, model: str
    ) -> dict[str, Any]:
        """The event, to the sinks first, then to the PLC outputs, the capture and the dashboard."""
        image = None
        if detection.is_anomalous and self._images is not None:
            try:
                image = self._images.save(
                    self.camera.name, frame.frame_id, frame.captured, pixels, detection.mask
                )
            except OSError as exc:
                self.stats.error(f"cannot save an image: {exc}")
            else:
                if image is None:
                    self.stats.add(images_skipped=1)
        event = make_event(self.camera, frame, detection, detect_ms, image, model)
        latency_ms = event["latency_ms"]["capture_to_result"]
        self.stats.inference(latency_ms, detection.is_anomalous)
        for sink in self._sinks:
            try:
                sink.submit(event)
            except Exception:  # one broken sink must not stop the camera or the others
                log.exception("sink %s failed", sink.name)
        try:  # after the sinks: whatever happens here, the event is out
            if self.handshake is not None:
                self.handshake.record(event)
            if self._capture is not None:
                self._capture.offer(event, pixels)
            if self.feed is not None and self.metrics is not None:
                self.feed.record(event, pixels, detection.mask)
                self.metrics.observe_latency(self.camera.name, latency_ms)
        except Exception:
            log.exception("camera %s: the outputs, capture or dashboard failed on a frame", self.camera.name)
        return event

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """Whether the thread ended within `timeout` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


class CameraDaemon:
    def __init__(self, config: DaemonConfig) -> None:
        self._config = config
        removed = remove_stale_segments()
        if removed:
            log.info("removed %d stale shared-memory segment(s): %s", len(removed), ", ".join(removed))
        self.sinks: list[Sink] = []
        for index, sink_config in enumerate(config.sinks):
            try:
                self.sinks.append(build_sink(sink_config))
            except (OSError, ValueError, ImportError) as exc:
                log.error("sinks[%d] (%s) is disabled: %s", index, sink_config.type, exc)
        images = ImageStore(config.images) if config.images.directory is not None else None
        rules = {camera.name: camera.capture for camera in config.cameras if camera.capture is not None}
        self.capture = Capture(config.state_dir / "capture", rules) if rules else None
        self.workers = [
            CameraWorker(camera, config, self.sinks, images, self.capture) for camera in config.cameras
        ]
        self.factory_io = None
        if config.outputs or any(camera.trigger is not None for camera in config.cameras):
            self.factory_io = FactoryIO(config)
            for worker in self.workers:
                worker.handshake = self.factory_io.handshakes[worker.camera.name]
        self.reporter = StatusReporter(
            config.status_file,
            config.status_interval,
            [worker.stats for worker in self.workers],
            lambda: {sink.name: sink.stats() for sink in self.sinks},
            self.capture.stats if self.capture is not None else None,
        )
        self.dashboard = self._dashboard() if config.dashboard is not None else None

    def _dashboard(self) -> Dashboard:
        """The feed the workers append to, and the server that shows it (bound here, started later)."""
        config = self._config
        assert config.dashboard is not None
        feed = Feed([(c.name, c.model) for c in config.cameras], config.dashboard)
        metrics = Metrics(self.reporter.status)
        for worker in self.workers:
            worker.feed = feed.cameras[worker.camera.name]
            worker.metrics = metrics
        api = Api(
            feed,
            ReviewStore(config.state_dir / "review"),
            self.reporter.status,
            ModelStates(config.agent_socket),
        )
        return Dashboard(config.dashboard, feed, api, metrics)

    def start(self) -> None:
        if self.capture is not None:
            self.capture.start()
        for worker in self.workers:
            worker.start()
        if self.factory_io is not None:  # its servers start while the cameras start their models
            self.factory_io.start()
        self.reporter.start()
        if self.dashboard is not None:
            self.dashboard.start()
        log.info("camera daemon running: %d camera(s), %d sink(s)", len(self.workers), len(self.sinks))

    def stop(self) -> None:
        """Stop the cameras (each gets until a shared deadline), then close every sink.

        A camera stuck past the deadline is left to die with the process; its segment is
        removed at the next start. A sink that fails to close is logged; the others still close.
        """
        for worker in self.workers:
            worker.stop()
        deadline = time.monotonic() + self._config.agent_timeout + STOP_GRACE_S
        for worker in self.workers:
            if not worker.join(max(0.0, deadline - time.monotonic())):
                log.error("camera %s did not stop in time; leaving it", worker.camera.name)
        if self.factory_io is not None:  # after the cameras: their last results reach the PLC
            self.factory_io.stop()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                log.error("sink %s: cannot close: %s", sink.name, exc)
        if self.capture is not None:
            self.capture.close()
        if self.dashboard is not None:
            self.dashboard.stop()
        self.reporter.stop()

    def run_until_signalled(self) -> int:
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        self.start()
        while not stop.wait(1.0):
            pass
        log.info("stopping")
        self.stop()
        return 0
