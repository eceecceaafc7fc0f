"""The standard gRPC health service (grpc.health.v1.Health), served beside the Edge Agent API."""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2

from .models import RUNNING

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class AgentHealth(health.HealthServicer):
    """The service "" is SERVING until the agent shuts down; each model component is SERVING
    while it is RUNNING and NOT_SERVING otherwise (a model removed from the models directory
    stays NOT_SERVING: the standard servicer cannot forget a service).

    The model registry tells `model_changed` of every state change with the model's lock held,
    so that method only queues the change; a thread applies the changes in order. `set` sends
    to every Watch stream and waits for each send, which a client that stops reading holds up:
    that must not hold up a model's lifecycle, nor its calls.
    """

    def __init__(self) -> None:
        super().__init__()
        self._changes: queue.SimpleQueue[tuple[str, int] | None] = queue.SimpleQueue()
        self._watches_lock = threading.Lock()
        self._watches: set[grpc.ServicerContext] | None = set()  # None once shut down
        threading.Thread(target=self._apply_changes, name="health", daemon=True).start()

    def model_changed(self, name: str, status: int) -> None:
        """The registry's observer (models.StateObserver)."""
        self._changes.put((name, status))

    def _apply_changes(self) -> None:
        shown: dict[str, health_pb2.HealthCheckResponse.ServingStatus] = {}
        while (change := self._changes.get()) is not None:
            name, status = change
            serving = SERVING if status == RUNNING else NOT_SERVING
            if shown.get(name) != serving:  # Watch streams hear of changes only
                shown[name] = serving
                self.set(name, serving)

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable | None = None,
    ) -> health_pb2.HealthCheckResponse:
        with self._watches_lock:
            if self._watches is None:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the agent is shutting down")
            self._watches.add(context)
        if not context.add_callback(functools.partial(self._watch_ended, context)):
            self._watch_ended(context)  # the call ended already
        return super().Watch(request, context, send_response_callback)

    def _watch_ended(self, context: grpc.ServicerContext) -> None:
        with self._watches_lock:
            if self._watches is not None:
                self._watches.discard(context)

    def shut_down(self) -> None:
        """Set every service NOT_SERVING and end the Watch streams (their clients see
        UNAVAILABLE), which would otherwise hold the server's shutdown for its whole grace."""
        self._changes.put(None)
        self.enter_graceful_shutdown()
        with self._watches_lock:
            watches, self._watches = self._watches or set(), None
        for context in watches:
            context.cancel()
