"""The HTTP side: a threaded HTTP/1.1 server that reads each request within bounds, checks its
signature, and answers in AWS JSON 1.1.

Hostile clients cannot wedge it: a body above MAX_BODY_BYTES is refused unread, every request
(headers and body) must arrive within `read_timeout` seconds or its connection is shut down by
the watchdog, at most `max_connections` connections are served at once, and any failure in an
operation becomes an InternalServerError response.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from . import protocol, shapes
from .errors import REQUEST_TOO_LARGE, SERIALIZATION, UNKNOWN_OPERATION, RekognitionError, internal_error
from .operations import Service
from .sigv4 import Credentials, SignatureError, verify

logger = logging.getLogger(__name__)

# A 4 MB image is 5.6 MB in base64 and a 5 MiB one (the service model's ImageBlob maximum) 7 MB:
# both reach DetectCustomLabels, which answers ImageTooLargeException for the latter.
MAX_BODY_BYTES = 8 * 1024 * 1024
SERVICE = "rekognition"


class Watchdog:
    """Shuts down connections whose request is not read by its deadline (slow or stalled clients)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._deadlines: dict[socket.socket, float] = {}
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._counter = itertools.count()
        self._closed = False
        threading.Thread(target=self._watch, name="rekognition watchdog", daemon=True).start()

    def arm(self, connection: socket.socket, seconds: float) -> None:
        with self._lock:
            deadline = time.monotonic() + seconds
            self._deadlines[connection] = deadline
            heapq.heappush(self._heap, (deadline, next(self._counter), connection))
            if self._heap[0][2] is connection:  # the watcher sleeps until a later deadline: wake it
                self._lock.notify()

    def disarm(self, connection: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(connection, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()

    def _watch(self) -> None:
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    deadline, _, connection = heapq.heappop(self._heap)
                    if self._deadlines.get(connection) == deadline:
                        del self._deadlines[connection]
                        with contextlib.suppress(OSError):  # already closed by its handler
                            connection.shutdown(socket.SHUT_RDWR)
                self._lock.wait(self._heap[0][0] - now if self._heap else None)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle's algorithm the body would wait for the
    # client's delayed ACK of the headers (40 ms on Linux) on every keep-alive request.
    disable_nagle_algorithm = True
    server: RekognitionHTTPServer
    server_version = "lookout-edge-rekognition"

    def handle_one_request(self) -> None:
        self.server.watchdog.arm(self.connection, self.server.read_timeout)
        try:
            super().handle_one_request()
        finally:
            self.server.watchdog.disarm(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def do_POST(self) -> None:
        operation = self.headers.get("X-Amz-Target")
        try:
            body = self._body()
            self.server.watchdog.disarm(self.connection)  # the request is read; operations may take long
            self._authenticate(body)
            name = protocol.operation_name(operation, self.server.operation_names)
            params = shapes.validate(name, protocol.parse_body(body))
            response = self.server.service.operations[name](params)
        except RekognitionError as exc:
            self._error(exc)
            return
        except Exception:  # the endpoint keeps serving whatever one operation does
            logger.exception("%s failed", operation)
            self._error(internal_error("the endpoint failed to serve the request; see its log"))
            return
        self._send(200, protocol.encode(response))

    def _not_an_operation(self) -> None:
        self.close_connection = True
        self._error(
            RekognitionError(UNKNOWN_OPERATION, f"{self.command} {self.path} is not an operation; POST /")
        )

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_an_operation

    def _body(self) -> bytes:
        length_header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length_header is None:
            self.close_connection = True
            raise RekognitionError(
                SERIALIZATION, "send the request body with a Content-Length header", status=411
            )
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise RekognitionError(SERIALIZATION, f"Content-Length {length_header!r} is not a length")
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread
            raise RekognitionError(
                REQUEST_TOO_LARGE,
                f"the request body is {length} bytes; this endpoint reads at most {MAX_BODY_BYTES}",
                status=413,
            )
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise RekognitionError(
                SERIALIZATION, "the connection closed before the request body was complete"
            )
        return body

    def _authenticate(self, body: bytes) -> None:
        credentials = self.server.credentials
        if credentials is None:
            return  # no key configured: any credentials, and none, are accepted
        try:
            verify(
                self.command,
                self.path,
                list(self.headers.items()),
                body,
                lambda key_id: credentials.secret_access_key if key_id == credentials.access_key_id else None,
                self.server.region,
                SERVICE,
            )
        except SignatureError as exc:
            raise RekognitionError(exc.code, exc.message) from None

    def _error(self, error: RekognitionError) -> None:
        self._send(error.status, protocol.encode(protocol.error_document(error)), error.code)

    def _send(self, status: int, body: bytes, error_code: str | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", protocol.CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
            if error_code is not None:
                self.send_header("x-amzn-ErrorType", error_code)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            self.close_connection = True  # the client went away


class RekognitionHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        service: Service,
        credentials: Credentials | None,
        region: str,
        read_timeout: float,
        max_connections: int,
    ) -> None:
        self.service = service
        self.operation_names = frozenset(service.operations)
        self.credentials = credentials
        self.region = region
        self.read_timeout = read_timeout
        self.watchdog = Watchdog()
        self._connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            self.shutdown_request(request)  # too many connections: refuse this one at once
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()

    def server_close(self) -> None:
        super().server_close()
        self.watchdog.close()


class RekognitionServer:
    """The endpoint: `start()` serves in a background thread, `close()` stops it and its trainers."""

    def __init__(
        self,
        service: Service,
        address: tuple[str, int] = ("127.0.0.1", 0),
        credentials: Credentials | None = None,
        read_timeout: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.service = service
        self._http = RekognitionHTTPServer(
            address, service, credentials, service.config.region, read_timeout, max_connections
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._http.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> RekognitionServer:
        self._thread = threading.Thread(target=self._http.serve_forever, name="rekognition http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._http.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join()
        self._http.server_close()
        self.service.close()

    def __enter__(self) -> RekognitionServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
