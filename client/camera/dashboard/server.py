"""The dashboard's HTTP server: routing, access control and TLS, in the daemon's process.

A `ThreadingHTTPServer` from the standard library; each request runs in its own thread and
only reads the feed's rings, so a slow browser never holds up a camera. With a token every
request needs it (`Authorization: Bearer <token>`, or basic auth with the token as password),
checked before the request's body is read. Without one (loopback), a request must name the
dashboard's own host: a web page whose name an attacker points at 127.0.0.1 (DNS rebinding)
would otherwise read and review through the operator's browser.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..config import DashboardConfig
from . import pages
from .api import Api
from .charts import score_histogram, yield_chart
from .feed import MINUTES, Feed
from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_BODY = 16 << 10
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_CAMERA = re.compile(r"^/cameras/([^/]+)$")
_LATEST = re.compile(r"^/cameras/([^/]+)/latest\.jpg$")
_CHART = re.compile(r"^/charts/([^/]+)/(yield|scores)\.svg$")
_FRAME = re.compile(r"^/frames/([0-9a-f]{32})(\.jpg|/overlay\.jpg)$")
_REVIEW = re.compile(r"^/api/events/([^/]+)/review$")


def authorized(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries the token, as a bearer token or a basic password."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    else:
        return False
    return hmac.compare_digest(given.encode(), token.encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that go away or do not speak TLS are routine; anything else is a bug to log."""
        error = sys.exc_info()[1]
        if isinstance(error, (ssl.SSLError, ConnectionError, TimeoutError)):
            log.debug("dashboard: %s: %s", client_address[0], error)
        else:
            log.exception("dashboard: a request from %s failed", client_address[0])


class Dashboard:
    def __init__(self, config: DashboardConfig, feed: Feed, api: Api, metrics: Metrics) -> None:
        self._config = config
        self.feed = feed
        self.api = api
        self.metrics = metrics
        try:
            self._server = _Server((config.host, config.port), _handler(self))
        except OSError as exc:
            raise OSError(
                exc.errno, f"dashboard.address {config.host}:{config.port}: {exc.strerror}"
            ) from None
        scheme = "http"
        if config.tls_cert is not None and config.tls_key is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(config.tls_cert, config.tls_key)
            # The handshake happens in the request's thread, not in the accepting one.
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
            scheme = "https"
        self.port = int(self._server.server_address[1])
        self.url = f"{scheme}://{config.host}:{self.port}/"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="camera-dashboard", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        access = "token required" if self._config.token else "no token"
        log.info("dashboard on %s (%s)", self.url, access)
        if self._config.insecure and self._config.token is None:
            log.warning(
                "dashboard.insecure: the dashboard on %s is open to anyone who can reach it, "
                "including the review API",
                self.url,
            )

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def allowed(self, header: str | None) -> bool:
        return self._config.token is None or authorized(header, self._config.token)

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request's Host names this dashboard; checked only where no token guards it
        and it was not opened to everyone on purpose (`insecure`)."""
        if self._config.token is not None or self._config.insecure:
            return True
        name = urlsplit(f"//{host or ''}").hostname or ""
        return name in (*_LOOPBACK_NAMES, self._config.host.strip("[]").lower())

    def get(self, path: str, query: dict[str, str]) -> tuple[int, str, bytes]:
        """(status, content type, body) of a GET."""
        if path == "/":
            return _html(pages.overview(self.api.status()))
        if path == "/review":
            return _html(pages.review(list(self.feed.cameras.values())))
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()
        if path == "/api/status":
            return _json(200, self.api.status())
        if path == "/api/events":
            return _json(*self.api.events(query))
        if match := _CAMERA.match(path):
            camera = self.feed.cameras.get(match[1])
            if camera is not None:
                return _html(pages.camera(camera, self.api.status()["cameras"][camera.name]))
        if match := _LATEST.match(path):
            camera = self.feed.cameras.get(match[1])
            if camera is not None and camera.latest is not None:
                return 200, "image/jpeg", camera.latest.jpeg("frame")
        if match := _CHART.match(path):
            camera = self.feed.cameras.get(match[1])
            if camera is not None:
                svg = (
                    yield_chart(camera.per_minute(MINUTES))
                    if match[2] == "yield"
                    else score_histogram(*camera.scores())
                )
                return 200, "image/svg+xml", svg.encode()
        if match := _FRAME.match(path):
            record = self.feed.find(match[1])
            if record is not None:
                return 200, "image/jpeg", record.jpeg("frame" if match[2] == ".jpg" else "overlay")
        return _json(404, {"error": "not found"})

    def post(self, path: str, body: bytes) -> tuple[int, str, bytes]:
        match = _REVIEW.match(path)
        if match is None:
            return _json(404, {"error": "not found"})
        try:
            data = json.loads(body or b"null")
        except ValueError:
            return _json(400, {"error": "the body is not JSON"})
        return _json(*self.api.review(match[1], data))


def _html(text: str) -> tuple[int, str, bytes]:
    return 200, "text/html; charset=utf-8", text.encode()


def _json(status: int, data: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(data).encode()


def _handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "lookout-edge-camera"

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="lookout-edge camera"')
            self.end_headers()
            self.wfile.write(body)

        def _admitted(self) -> bool:
            if not dashboard.host_allowed(self.headers.get("Host")):
                self._reply(*_json(403, {"error": "the Host header does not name this dashboard"}))
                return False
            if dashboard.allowed(self.headers.get("Authorization")):
                return True
            self._reply(*_json(401, {"error": "a token is required"}))
            return False

        def do_GET(self) -> None:
            if not self._admitted():
                return
            url = urlsplit(self.path)
            self._reply(*dashboard.get(url.path, dict(parse_qsl(url.query))))

        def do_POST(self) -> None:
            if not self._admitted():
                return
            # A cross-site form cannot send this type without a CORS preflight, which is never
            # answered: a page elsewhere cannot review through a browser holding the credentials.
            if self.headers.get_content_type() != "application/json":
                self._reply(*_json(415, {"error": "Content-Type: application/json"}))
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                self._reply(*_json(413, {"error": f"a body of at most {MAX_BODY} bytes"}))
                return
            self._reply(*dashboard.post(urlsplit(self.path).path, self.rfile.read(length)))

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard: " + format, *args)

    return Handler
