"""Hosting one model version: StartProjectVersion's STARTING → RUNNING (or FAILED) and
StopProjectVersion's STOPPING → STOPPED, with the model loaded and released in the background,
and DetectCustomLabels admitted only while RUNNING and within the version's capacity.

Capacity: MinInferenceUnits inferences run at once; `queue` more may wait for one of them; a
request beyond that gets ProvisionedThroughputExceededException, as AWS returns when calls exceed
what the model's inference units serve.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lookout_edge.custom_labels import LabelModel, LabelPackage

from .errors import RESOURCE_IN_USE, RESOURCE_NOT_READY, THROUGHPUT_EXCEEDED, RekognitionError

logger = logging.getLogger(__name__)

STARTING, RUNNING, FAILED, STOPPING, STOPPED = "STARTING", "RUNNING", "FAILED", "STOPPING", "STOPPED"
MESSAGES = {
    STARTING: "The model is being started.",
    RUNNING: "The model is running.",
    STOPPING: "The model is being stopped.",
    STOPPED: "The model is stopped.",
}

ModelLoader = Callable[[LabelPackage], LabelModel]


class Hosting:
    """The hosting state of one version; `status` is None until it is first started."""

    def __init__(self, name: str, loader: ModelLoader, queue: int) -> None:
        self._name = name
        self._loader = loader
        self._queue = queue
        self._lock = threading.Condition()
        self._status: str | None = None
        self._message = ""
        self._model: LabelModel | None = None
        self._generation = 0  # bumped by every start and stop: a stale load is discarded
        self._in_flight = 0
        self._slots = threading.BoundedSemaphore(1)
        self.min_units: int | None = None
        self.max_units: int | None = None

    def state(self) -> tuple[str | None, str]:
        """Status (None: never started) and StatusMessage, read together."""
        with self._lock:
            return self._status, self._message

    def _set(self, status: str, message: str | None = None) -> None:
        self._status, self._message = status, MESSAGES.get(status, "") if message is None else message
        logger.info("model %s: %s %s", self._name, status, self._message)

    def start(self, package: LabelPackage | None, min_units: int, max_units: int | None) -> str:
        """Begin loading `package` (None: its package is missing, the start fails) and return STARTING."""
        with self._lock:
            if self._status in (STARTING, RUNNING, STOPPING):
                raise RekognitionError(RESOURCE_IN_USE, f"the model {self._name} is {self._status}")
            self._generation += 1
            self.min_units, self.max_units = min_units, max_units
            self._slots = threading.BoundedSemaphore(min_units)
            self._set(STARTING)
            generation = self._generation
        threading.Thread(
            target=self._load, args=(package, generation), name=f"start {self._name}", daemon=True
        ).start()
        return STARTING

    def _load(self, package: LabelPackage | None, generation: int) -> None:
        model, message = None, ""
        try:
            if package is None:
                message = "the version's model package is no longer in the models directory"
            else:
                model = self._loader(package)
        except Exception as exc:  # a model that cannot load fails its start, never the endpoint
            message = f"the model cannot be loaded: {exc}"
        with self._lock:
            if generation != self._generation:
                return  # stopped (and perhaps restarted) while loading
            if model is None:
                self._set(FAILED, message)
            else:
                self._model = model
                self._set(RUNNING)

    def stop(self) -> str:
        """Begin releasing the model once its running inferences end; return STOPPING."""
        with self._lock:
            if self._status not in (STARTING, RUNNING, FAILED):
                state = self._status or "not started"
                raise RekognitionError(
                    RESOURCE_IN_USE, f"the model {self._name} is {state}; only a started model can be stopped"
                )
            self._generation += 1
            self._set(STOPPING)
            generation = self._generation
        threading.Thread(
            target=self._release, args=(generation,), name=f"stop {self._name}", daemon=True
        ).start()
        return STOPPING

    def _release(self, generation: int) -> None:
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0)
            if generation == self._generation:
                self._model = None
                self._set(STOPPED)

    @contextmanager
    def serving(self) -> Iterator[LabelModel]:
        """The running model, for one inference; ResourceNotReadyException unless RUNNING,
        ProvisionedThroughputExceededException when the version's capacity is taken."""
        with self._lock:
            if self._status != RUNNING or self._model is None or self.min_units is None:
                state = self._status or "not started"
                raise RekognitionError(
                    RESOURCE_NOT_READY,
                    f"the model {self._name} is {state}; start it and wait until it is RUNNING",
                )
            if self._in_flight >= self.min_units + self._queue:
                raise RekognitionError(
                    THROUGHPUT_EXCEEDED,
                    f"the model {self._name} is serving {self._in_flight} requests, its limit; retry later "
                    "or start it with more MinInferenceUnits",
                )
            self._in_flight += 1
            model, slots = self._model, self._slots
        try:
            with slots:
                yield model
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()
