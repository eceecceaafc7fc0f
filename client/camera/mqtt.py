"""MQTT over TCP or TLS (paho-mqtt), QoS 1: an event counts as delivered on the broker's PUBACK."""

from __future__ import annotations

import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt

from .sinks import Transport


class MqttTransport(Transport):
    """Settings: host, port (1883, or 8883 with tls), topic (a template with {camera} and {model}),
    qos (0 or 1), client_id, username, password, keepalive, timeout, tls: {ca, cert, key, insecure}."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._tls: dict[str, Any] | None = settings.get("tls")
        self._host = str(settings["host"])
        self._port = int(settings.get("port", 8883 if self._tls else 1883))
        self._topic = str(settings.get("topic", "lookout/{camera}/events"))
        self._qos = int(settings.get("qos", 1))
        self._timeout = float(settings.get("timeout", 10.0))
        self.name = f"mqtt:{self._host}:{self._port}"
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()

    def _connect(self) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=str(self._settings.get("client_id", "")),
            clean_session=True,
        )
        if "username" in self._settings:
            client.username_pw_set(str(self._settings["username"]), self._settings.get("password"))
        if self._tls is not None:
            client.tls_set(
                ca_certs=self._tls.get("ca"),
                certfile=self._tls.get("cert"),
                keyfile=self._tls.get("key"),
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(bool(self._tls.get("insecure", False)))
        self._connected.clear()
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_: self._connected.clear()
        client.connect(self._host, self._port, keepalive=int(self._settings.get("keepalive", 30)))
        client.loop_start()
        if not self._connected.wait(self._timeout):
            client.loop_stop()
            client.disconnect()
            raise ConnectionError(f"no CONNACK from {self._host}:{self._port} in {self._timeout:.0f} s")
        return client

    def _on_connect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def deliver(self, event: dict[str, Any], payload: bytes) -> None:
        if self._client is None or not self._connected.is_set():
            self.reset()
            self._client = self._connect()
        topic = self._topic.format(camera=event.get("camera", ""), model=event.get("model", ""))
        info = self._client.publish(topic, payload, qos=self._qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"publish failed: {mqtt.error_string(info.rc)}")
        info.wait_for_publish(self._timeout)
        if not info.is_published():
            raise TimeoutError(f"no PUBACK in {self._timeout:.0f} s")

    def reset(self) -> None:
        # A new client each time: paho would otherwise resend queued messages on its own and
        # an event could arrive twice.
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
