"""The model store: packages found in the models directory and their lifecycle.

States and transitions follow the Edge Agent API reference:
STOPPED/FAILED --StartModel--> STARTING --(background load)--> RUNNING or FAILED;
RUNNING --StopModel--> STOPPING --(in-flight calls finish)--> STOPPED.

A running model is a `Backend` (backends/base.py) chosen and loaded by a `BackendSelector`
(backends/selector.py). Every backend is closed exactly once: by StopModel, or when its package
is removed from the models directory (at once, or by the last in-flight call's release).
"""

from __future__ import annotations

import builtins
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookout_edge.package import MANIFEST_NAME, ModelPackage, PackageError, package_dirs, read_package
from lookout_edge.protocol import pb2

from .backends.base import Backend, GpuOutOfMemory
from .backends.selector import BackendSelector, Plan
from .errors import FailedPrecondition, ModelNotFound, ResourceExhausted, shown
from .malloc import release_free_memory
from .selfcheck import run_self_check, tolerance_for

log = logging.getLogger(__name__)
# Seconds a call waits for another thread's scan of the models directory (ModelRegistry.refresh).
SCAN_WAIT = 2.0

STOPPED, STARTING, RUNNING, FAILED, STOPPING = (
    pb2.STOPPED,
    pb2.STARTING,
    pb2.RUNNING,
    pb2.FAILED,
    pb2.STOPPING,
)


def status_name(status: int) -> str:
    return pb2.ModelStatus.Name(status)


# Told (component name, new status) on every state change, with the model's lock held: it must
# not block, nor call into the registry (agent/health.py queues what it is told).
StateObserver = Callable[[str, int], None]


@dataclass(frozen=True)
class ModelInfo:
    """A consistent snapshot of one model, for ListModels, DescribeModel and the metrics."""

    name: str
    model_arn: str
    status: int
    status_message: str
    in_flight: int  # calls admitted: running, or waiting for their turn


def estimated_memory(package: ModelPackage) -> int:
    """Bytes a running model is expected to need: weights twice (file and arena) plus buffers."""
    return 2 * package.model_file.size + 8 * package.image_bytes + 32 * 2**20


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (unlimited where it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62


class ModelSlot:
    """One component name's state. All fields are guarded by `cond`."""

    def __init__(self, name: str, max_concurrent_runs: int) -> None:
        self.name = name
        self.cond = threading.Condition()
        self.runs = threading.BoundedSemaphore(max_concurrent_runs)  # admitted calls that may run
        self.package: ModelPackage | None = None  # newest package on disk
        self.package_error = ""  # why the package on disk cannot be served
        self.loaded_package: ModelPackage | None = None  # what the running model was loaded from
        self.model: Backend | None = None
        self.status = STOPPED
        self.status_message = ""
        self.in_flight = 0
        self.closing: Backend | None = None  # a removed package's model, for the last call to close

    def info(self) -> ModelInfo:
        with self.cond:
            package = self.loaded_package or self.package
            message = self.status_message
            if self.status in (STOPPED, FAILED) and self.package_error:
                return ModelInfo(self.name, "", FAILED, self.package_error, self.in_flight)
            arn = package.model_arn if package else ""
            return ModelInfo(self.name, arn, self.status, message, self.in_flight)


@dataclass(frozen=True)
class _Scanned:
    stamp: tuple[int, int, int] | None
    package: ModelPackage | None
    error: str


class ModelRegistry:
    """Serves every package below `models_dir`, keyed by its component name."""

    def __init__(
        self,
        models_dir: Path,
        queue_size: int = 8,
        memory_limit_bytes: int | None = None,
        backends: BackendSelector | None = None,
        max_concurrent_runs: int | None = None,
        observer: StateObserver | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.queue_size = queue_size
        self.max_concurrent_runs = max_concurrent_runs or len(os.sched_getaffinity(0))
        self.memory_limit_bytes = memory_limit_bytes
        self.backends = backends or BackendSelector("cpu")
        self._observer = observer
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._scan_lock = threading.Lock()  # guards _scanned and _models_dir_error
        self._scanned: dict[Path, _Scanned] = {}
        self._models_dir_error = ""
        self._slots: dict[str, ModelSlot] = {}

    # -- discovery ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rescan the models directory; cheap when nothing changed (one stat per package).

        The file system is read without the registry's lock, so a slow or hung one (a network
        mount) delays scans only, never inference calls. Scans run one at a time: a caller that
        finds one running waits up to SCAN_WAIT seconds for its turn, then goes on with what the
        last scan found.
        """
        if not self._scan_lock.acquire(timeout=SCAN_WAIT):
            log.warning(
                "scanning %s takes over %.0f s; answering from the last scan", self.models_dir, SCAN_WAIT
            )
            return
        try:
            scanned = self._scan_models_dir()
            with self._lock:
                self._apply(scanned)
        finally:
            self._scan_lock.release()

    def _scan_models_dir(self) -> dict[Path, _Scanned]:
        """Read what changed since the last scan (called with `_scan_lock` held)."""
        try:
            directories = package_dirs(self.models_dir)
        except PackageError as exc:
            if str(exc) != self._models_dir_error:
                log.error("%s; no models are served until it is fixed", exc)
            self._models_dir_error = str(exc)
            directories = []
        else:
            self._models_dir_error = ""
        scanned = {}
        for directory in directories:
            stamp = _manifest_stamp(directory)
            previous = self._scanned.get(directory)
            if previous is not None and previous.stamp == stamp:
                scanned[directory] = previous
            else:
                scanned[directory] = _scan(directory, stamp)
        self._scanned = scanned
        return scanned

    def _apply(self, scanned: dict[Path, _Scanned]) -> None:
        claims: dict[str, list[tuple[Path, _Scanned]]] = {}
        for directory, result in scanned.items():
            name = result.package.component_name if result.package else directory.name
            claims.setdefault(name, []).append((directory, result))
        for name, owners in claims.items():
            slot = self._slots.get(name)
            if slot is None:
                slot = self._slots[name] = ModelSlot(name, self.max_concurrent_runs)
                log.info("model %s found in %s", name, ", ".join(str(d) for d, _ in owners))
                with slot.cond:
                    self._set_status(slot, STOPPED, "")
            if len(owners) > 1:
                package = None
                error = (
                    f"component name {shown(name)} is claimed by several packages "
                    f"({', '.join(str(d) for d, _ in owners)}); remove all but one"
                )
            else:
                package, error = owners[0][1].package, owners[0][1].error
            with slot.cond:
                if slot.status == FAILED and package is not slot.package:
                    # What failed to load was another package: the new one has not been tried.
                    self._set_status(slot, STOPPED, "")
                slot.package, slot.package_error = package, error
        for name in set(self._slots) - set(claims):
            slot = self._slots.pop(name)
            with slot.cond:
                log.info("model %s removed from %s; unloading it", name, self.models_dir)
                if slot.in_flight == 0:
                    _close(slot.model)
                else:  # the calls still run on it: the last one's release closes it (acquire)
                    slot.closing = slot.model
                slot.model, slot.loaded_package = None, None
                self._set_status(slot, STOPPED, slot.status_message)

    def _set_status(self, slot: ModelSlot, status: pb2.ModelStatus, message: str) -> None:
        """Every state change goes through here, with `slot.cond` held, and tells the observer."""
        slot.status, slot.status_message = status, message
        if self._observer is not None:
            self._observer(slot.name, status)

    # -- queries -----------------------------------------------------------------------------

    def list(self) -> list[ModelInfo]:
        self.refresh()
        return self.snapshot()

    def snapshot(self) -> builtins.list[ModelInfo]:  # `list` is the method above
        """The models as of the last scan, by name, without scanning (for the metrics)."""
        with self._lock:
            slots = sorted(self._slots.values(), key=lambda slot: slot.name)
        return [slot.info() for slot in slots]

    def knows(self, name: str) -> bool:
        """Whether `name` is a model of the models directory, as of the last scan."""
        with self._lock:
            return name in self._slots

    def describe(self, name: str) -> ModelInfo:
        self.refresh()
        return self._slot(name).info()

    def _slot(self, name: str) -> ModelSlot:
        with self._lock:
            slot = self._slots.get(name)
        if slot is None:
            raise ModelNotFound(
                f"no model component named {shown(name)} in {self.models_dir}; "
                "ListModels shows the deployed ones"
            )
        return slot

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, name: str) -> int:
        """Begin loading a model; returns STARTING at once (RUNNING or FAILED follows)."""
        self.refresh()
        slot = self._slot(name)
        while True:
            with slot.cond:
                package, package_error = slot.package, slot.package_error
            # Planning probes the device (CUDA), which can take a while: it holds no lock, so
            # DescribeModel and ListModels go on answering meanwhile.
            planned = self._plan(package, package_error)
            if self._begin_start(slot, package, planned):
                break  # otherwise a rescan replaced the package while planning: plan the new one
        threading.Thread(target=self._load, args=(slot, planned), name=f"load-{name}", daemon=True).start()
        return STARTING

    def _begin_start(
        self, slot: ModelSlot, package: ModelPackage | None, planned: _Planned | PackageError
    ) -> bool:
        """Move the slot to STARTING if the model fits; False if `package` is no longer the slot's."""
        # One start decision at a time, so two starts cannot both fit into the memory budget.
        # Lock order: _start_lock, then _lock or one slot's cond, never both of the latter.
        with self._start_lock:
            with self._lock:
                others = [other for other in self._slots.values() if other is not slot]
            in_use = sum(_memory_in_use(other) for other in others)
            with slot.cond:
                if slot.status not in (STOPPED, FAILED):
                    raise FailedPrecondition(
                        f"model {shown(slot.name)} is {status_name(slot.status)}; "
                        "StartModel needs STOPPED or FAILED"
                    )
                if slot.package is not package:
                    return False
                if not isinstance(planned, PackageError):
                    self._check_memory(planned, in_use)
                self._set_status(slot, STARTING, "loading the model")
                return True

    def _plan(self, package: ModelPackage | None, package_error: str) -> _Planned | PackageError:
        """The package and its backend plan, or why the model will be FAILED once loading begins."""
        if package is None:
            return PackageError(package_error or "the package cannot be read")
        try:
            return _Planned(package, self.backends.plan(package))
        except PackageError as exc:
            return exc

    def _check_memory(self, planned: _Planned, in_use: int) -> None:
        package = planned.package
        needed = estimated_memory(package)
        available = available_memory()
        if needed > available:
            raise ResourceExhausted(
                f"model {shown(package.component_name)} needs about {needed >> 20} MiB; "
                f"the device has {available >> 20} MiB available. Stop another model or free memory"
            )
        if self.memory_limit_bytes is not None and in_use + needed > self.memory_limit_bytes:
            raise ResourceExhausted(
                f"model {shown(package.component_name)} needs about {needed >> 20} MiB; running models use "
                f"{in_use >> 20} MiB of the agent's {self.memory_limit_bytes >> 20} MiB memory limit. "
                "Stop another model or raise memory_limit_mb"
            )
        self.backends.check_fits(planned.plan, needed)

    def _load(self, slot: ModelSlot, planned: _Planned | PackageError) -> None:
        try:
            if isinstance(planned, PackageError):
                raise planned
            package = planned.package
            package.verify_files()
            selection = self.backends.load(package, planned.plan)
            model = selection.backend
            _warm_up(model, package, self.backends.precision)
        except MemoryError:
            self._fail(slot, "not enough memory to load the model; stop another model or free memory")
        except GpuOutOfMemory as exc:
            self._fail(slot, f"not enough GPU memory to load the model ({exc}); stop another model")
        except PackageError as exc:
            self._fail(slot, str(exc))
        except Exception as exc:
            log.exception("loading model %s failed", slot.name)
            self._fail(slot, f"loading the model failed: {exc}")
        else:
            with slot.cond:
                if slot.status != STARTING:  # removed from disk while loading
                    _close(model)
                    return
                slot.model, slot.loaded_package = model, package
                note = "; ".join(filter(None, (selection.note, model.status_note)))
                self._set_status(slot, RUNNING, "model is running" + (f"; warning: {note}" if note else ""))
            log.info("model %s is RUNNING", slot.name)

    def _fail(self, slot: ModelSlot, message: str) -> None:
        with slot.cond:
            slot.model = None
            self._set_status(slot, FAILED, message)
        log.error("model %s FAILED: %s", slot.name, message)

    def stop(self, name: str) -> int:
        """Stop a running model once its in-flight calls have finished; returns STOPPED."""
        self.refresh()
        slot = self._slot(name)
        with slot.cond:
            if slot.status != RUNNING:
                raise FailedPrecondition(
                    f"model {shown(name)} is {status_name(slot.status)}; StopModel needs RUNNING"
                )
            self._set_status(slot, STOPPING, "waiting for in-flight calls")
            slot.cond.wait_for(lambda: slot.in_flight == 0)
            _close(slot.model)  # releases the backend's memory, GPU memory included
            slot.model, slot.loaded_package = None, None
            self._set_status(slot, STOPPED, "model is stopped")
        log.info("model %s is STOPPED", name)
        return STOPPED

    @contextmanager
    def acquire(self, name: str) -> Iterator[tuple[ModelPackage, Backend]]:
        """Admit one inference call: the model must be RUNNING and its queue not full.

        Of the admitted calls, at most `max_concurrent_runs` (by default one per CPU core) run
        at once; the others wait their turn. More at once gains no throughput, and costs memory
        that stays: ONNX Runtime's arena keeps buffers for the most runs it ever served at once
        (8 clients on a 768x576 model took the agent from 133 to 320 MB, for good).
        """
        slot = self._slot(name)
        with slot.cond:
            if slot.status != RUNNING or slot.model is None or slot.loaded_package is None:
                raise FailedPrecondition(
                    f"model {shown(name)} is {status_name(slot.status)}, not RUNNING; "
                    "call StartModel and wait until DescribeModel shows RUNNING"
                )
            if slot.in_flight >= self.queue_size:
                raise ResourceExhausted(
                    f"model {shown(name)} already has {slot.in_flight} calls queued "
                    f"(queue size {self.queue_size}); "
                    "retry shortly, or raise queue_size"
                )
            slot.in_flight += 1
            package, model = slot.loaded_package, slot.model
        try:
            with slot.runs:
                yield package, model
        finally:
            closing = None
            with slot.cond:
                slot.in_flight -= 1
                if slot.in_flight == 0:  # the last call on a removed package's model closes it
                    closing, slot.closing = slot.closing, None
                slot.cond.notify_all()
            if closing is not None:
                _close(closing)


@dataclass(frozen=True)
class _Planned:
    """A package about to start, and the backend plan made for it (the device probed once)."""

    package: ModelPackage
    plan: Plan


def _warm_up(model: Backend, package: ModelPackage, precision: str) -> None:
    """The package's self-check (agent/selfcheck.py) if it has one, else one inference on a black
    image; a model that fails it is closed, not left to the GC."""
    try:
        if package.self_check is not None:
            run_self_check(model, package, tolerance_for(model.name, precision))
            log.info("model %s passed its self-check on %s", package.component_name, model.name)
            return
        warm_up = model.run(np.zeros((package.height, package.width, 3), dtype=np.uint8))
        if not math.isfinite(warm_up.anomaly_score):
            raise PackageError(f"{package.model_file.path}: the graph returns a non-finite anomaly score")
    except BaseException:
        _close(model)
        raise


def _close(model: Backend | None) -> None:
    if model is not None:
        model.close()
    release_free_memory()


def _memory_in_use(slot: ModelSlot) -> int:
    with slot.cond:
        package = slot.loaded_package or slot.package
        if slot.status in (STARTING, RUNNING, STOPPING) and package is not None:
            return estimated_memory(package)
    return 0


def _manifest_stamp(directory: Path) -> tuple[int, int, int] | None:
    try:
        stat = (directory / MANIFEST_NAME).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _scan(directory: Path, stamp: tuple[int, int, int] | None) -> _Scanned:
    try:
        return _Scanned(stamp, read_package(directory), "")
    except PackageError as exc:
        log.warning("package %s cannot be served: %s", directory, exc)
        return _Scanned(stamp, None, str(exc))
