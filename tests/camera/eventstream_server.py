"""A stand-in for the Greengrass nucleus's IPC endpoint, speaking the real event-stream RPC wire format.

The nucleus cannot run here, so this server plays its part over a Unix socket: every frame is
an event-stream message (prelude with total and headers lengths and its CRC32, typed headers,
payload, message CRC32). The client's CONNECT must carry the expected auth token (the SVCUID)
in its payload; the server answers CONNECT_ACK, then answers PublishToTopic and
PublishToIoTCore requests and records them. Everything awsiotsdk and awscrt do on the client
side is their real code.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

# :message-type values and :message-flags bits of the event-stream RPC protocol.
APPLICATION_MESSAGE, APPLICATION_ERROR, PING, PING_RESPONSE, CONNECT, CONNECT_ACK = 0, 1, 2, 3, 4, 5
CONNECTION_ACCEPTED, TERMINATE_STREAM = 1, 2
# Header value types.
BOOL_TRUE, BOOL_FALSE, BYTE, INT16, INT32, INT64, BYTES, STRING, TIMESTAMP, UUID = range(10)


def encode_headers(headers: dict[str, Any]) -> bytes:
    out = b""
    for name, value in headers.items():
        raw = name.encode()
        out += struct.pack("B", len(raw)) + raw
        if isinstance(value, bool):
            out += struct.pack("B", BOOL_TRUE if value else BOOL_FALSE)
        elif isinstance(value, int):
            out += struct.pack(">Bi", INT32, value)
        else:
            data = value.encode()
            out += struct.pack(">BH", STRING, len(data)) + data
    return out


def decode_headers(data: bytes) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    at = 0
    while at < len(data):
        size = data[at]
        name = data[at + 1 : at + 1 + size].decode()
        at += 1 + size
        kind = data[at]
        at += 1
        value: Any
        if kind in (BOOL_TRUE, BOOL_FALSE):
            value = kind == BOOL_TRUE
        elif kind == BYTE:
            value, at = struct.unpack_from(">b", data, at)[0], at + 1
        elif kind == INT16:
            value, at = struct.unpack_from(">h", data, at)[0], at + 2
        elif kind == INT32:
            value, at = struct.unpack_from(">i", data, at)[0], at + 4
        elif kind in (INT64, TIMESTAMP):
            value, at = struct.unpack_from(">q", data, at)[0], at + 8
        elif kind == UUID:
            value, at = data[at : at + 16], at + 16
        else:
            (length,) = struct.unpack_from(">H", data, at)
            value = data[at + 2 : at + 2 + length]
            value = value.decode() if kind == STRING else value
            at += 2 + length
        headers[name] = value
    return headers


def encode_message(headers: dict[str, Any], payload: bytes = b"") -> bytes:
    encoded = encode_headers(headers)
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + encoded + payload
    return body + struct.pack(">I", zlib.crc32(body))


def read_message(connection: socket.socket) -> tuple[dict[str, Any], bytes] | None:
    prelude = _read_exactly(connection, 12)
    if prelude is None:
        return None
    total, headers_length, prelude_crc = struct.unpack(">III", prelude)
    if zlib.crc32(prelude[:8]) != prelude_crc:
        raise ValueError("bad prelude CRC")
    rest = _read_exactly(connection, total - 12)
    if rest is None:
        return None
    (message_crc,) = struct.unpack(">I", rest[-4:])
    if zlib.crc32(prelude + rest[:-4]) != message_crc:
        raise ValueError("bad message CRC")
    return decode_headers(rest[:headers_length]), rest[headers_length:-4]


def _read_exactly(connection: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class IpcServer:
    """Accepts IPC connections on `path`; `published` lists (operation, request) in arrival order."""

    def __init__(self, path: Path, auth_token: str) -> None:
        self.path = path
        self.auth_token = auth_token
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.connects: list[bool] = []  # whether each CONNECT was accepted
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            while True:
                try:
                    message = read_message(connection)
                except (OSError, ValueError):
                    return
                if message is None:
                    return
                headers, payload = message
                kind = headers[":message-type"]
                if kind == CONNECT:
                    accepted = json.loads(payload or b"{}").get("authToken") == self.auth_token
                    with self._lock:
                        self.connects.append(accepted)
                    flags = CONNECTION_ACCEPTED if accepted else 0
                    ack = {":message-type": CONNECT_ACK, ":message-flags": flags, ":stream-id": 0}
                    connection.sendall(encode_message(ack))
                    if not accepted:
                        return
                elif kind == PING:
                    reply = {":message-type": PING_RESPONSE, ":message-flags": 0, ":stream-id": 0}
                    connection.sendall(encode_message(reply))
                elif kind == APPLICATION_MESSAGE:
                    operation = headers["operation"]
                    with self._lock:
                        self.published.append((operation, json.loads(payload)))
                    response = {
                        ":message-type": APPLICATION_MESSAGE,
                        ":message-flags": TERMINATE_STREAM,
                        ":stream-id": headers[":stream-id"],
                        ":content-type": "application/json",
                        "service-model-type": operation + "Response",
                    }
                    connection.sendall(encode_message(response, b"{}"))

    def requests(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self.published)

    def close(self) -> None:
        self._listener.close()
