"""Raw HTTP the endpoint must survive: each bad request gets its AWS error, and a good one follows."""

from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlsplit

from tests.rekognition.conftest import Endpoint

TARGET = "RekognitionService.DescribeProjects"


def post(endpoint: Endpoint, body: bytes, target: str = TARGET) -> tuple[int, dict[str, str], dict]:
    parts = urlsplit(endpoint.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    headers = {"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": target}
    connection.request("POST", "/", body=body, headers=headers)
    response = connection.getresponse()
    document = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, dict(response.getheaders()), document


def assert_serving(endpoint: Endpoint) -> None:
    status, _, document = post(endpoint, b"{}")
    assert status == 200 and document["ProjectDescriptions"]


def test_bad_requests_get_aws_errors(endpoint: Endpoint) -> None:
    cases = [
        (b"{not json", TARGET, "SerializationException"),
        (b"\xff\xfe{}", TARGET, "SerializationException"),
        (b"[" * 100_000 + b"]" * 100_000, TARGET, "SerializationException"),
        (b'{"MaxResults": NaN}', TARGET, "SerializationException"),
        (b"[]", TARGET, "SerializationException"),
        (b"{}", "RekognitionService.DeleteEverything", "UnknownOperationException"),
        (b"{}", "OtherService.DescribeProjects", "UnknownOperationException"),
        (b'{"MaxResults": "ten"}', TARGET, "InvalidParameterException"),
        (b'{"MaxResults": 1e999}', TARGET, "InvalidParameterException"),
        (b'{"ProjectNames": []}', TARGET, "InvalidParameterException"),
    ]
    for body, target, code in cases:
        status, headers, document = post(endpoint, body, target)
        assert (status, document["__type"], headers["x-amzn-ErrorType"]) == (400, code, code), body[:40]
        assert document["message"]
        assert_serving(endpoint)


def raw(endpoint: Endpoint) -> socket.socket:
    parts = urlsplit(endpoint.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=10)


def test_oversized_bodies_are_refused_unread(endpoint: Endpoint) -> None:
    with raw(endpoint) as sock:
        head = f"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: {TARGET}\r\nContent-Length: {1 << 40}\r\n\r\n"
        sock.sendall(head.encode())
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413") and "RequestEntityTooLargeException" in reply
    with raw(endpoint) as sock:  # no length at all
        sock.sendall(f"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: {TARGET}\r\n\r\n".encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 411")
    assert_serving(endpoint)


def test_slow_and_partial_clients_are_cut_off(endpoint: Endpoint) -> None:
    """The endpoint's read timeout is 1 s: a request dribbled in, or stalled, is dropped."""
    started = time.monotonic()
    slow = raw(endpoint)
    stalled = raw(endpoint)
    stalled.sendall(
        f"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: {TARGET}\r\nContent-Length: 100\r\n\r\n{{".encode()
    )
    assert_serving(endpoint)  # meanwhile others are served
    closed = False
    for byte in b"POST / HTTP/1.1\r\nHost: x\r\n" * 10:
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.05)
        if time.monotonic() - started > 3:
            break
    slow.settimeout(3)
    try:
        closed = closed or slow.recv(100) == b""
    except OSError:
        closed = True
    assert closed and time.monotonic() - started < 6
    stalled.settimeout(3)
    assert stalled.recv(100) == b""  # shut down by the watchdog, never answered
    slow.close()
    stalled.close()
    assert_serving(endpoint)
