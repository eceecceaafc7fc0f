"""The MQTT sink against a real mosquitto broker that goes down and comes back."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from PIL import Image

from tests.camera.conftest import agent_and_folder, folder_camera_config, free_port, wait_for
from tests.conftest import HEIGHT, make_image

MOSQUITTO = "/usr/sbin/mosquitto"


class Broker:
    """mosquitto on a loopback port, persisting sessions to disk across restarts.

    Started as root, mosquitto switches to its own user, who can neither write the persistence
    file nor read the test's keys in pytest's private directory; "user root" keeps it as it was
    started (a broker started by anyone else ignores the line)."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        root.mkdir()
        self.root = root
        self.config = root / "mosquitto.conf"
        self.config.write_text(
            f"user root\nlistener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence true\npersistence_location {root}/\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.root / "mosquitto.log").open("ab") as log:
            self.process = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=log
            )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # writes the persistence file
            self.process.wait(10)

    def saved_sessions(self) -> bool:
        return (self.root / "mosquitto.db").exists()

    def log(self) -> str:
        return (self.root / "mosquitto.log").read_text()


class Subscriber:
    """A persistent QoS 1 session: the broker keeps what arrives while the subscriber is away."""

    def __init__(self, port: int) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="camera-test-subscriber", clean_session=False
        )
        self.client.on_connect = lambda client, *_: client.subscribe("lookout/#", qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    @classmethod
    def connected(cls, port: int) -> Subscriber:
        """A subscriber whose subscription is in place."""
        subscriber = cls(port)
        wait_for(lambda: subscriber.client.is_connected(), 10, "the subscriber to connect")
        time.sleep(0.3)  # the SUBSCRIBE follows the connection
        return subscriber

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append(json.loads(message.payload))

    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def drop_images(folder: Path, first: int, count: int) -> None:
    for index in range(first, first + count):
        pixels = np.asarray(make_image(red=HEIGHT // 2 if index % 2 else 0))
        Image.fromarray(pixels).save(folder / f".{index:04d}.png")
        (folder / f".{index:04d}.png").rename(folder / f"{index:04d}.png")
        time.sleep(0.02)  # distinct modification times keep the order


@pytest.mark.skipif(not shutil.which(MOSQUITTO), reason="mosquitto is missing (run make setup)")
def test_events_survive_a_broker_outage_once_each_in_order(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent, folder = agent_and_folder(agent_process, tmp_path)
    with broker_and_subscriber(tmp_path / "broker") as (broker, subscriber, sink_settings):
        daemon = camera_daemon(folder_camera_config(agent.address, "bench", folder, [sink_settings]))
        drop_images(folder, 0, 10)
        wait_for(lambda: len(subscriber.received()) >= 10, 30, "the first events")

        broker.stop()
        # Without the subscriber's saved session, whatever the sink publishes before the
        # subscriber is back would be lost, and the test would only pass by luck.
        assert broker.saved_sessions(), broker.log()
        drop_images(folder, 10, 15)
        sink = f"mqtt:127.0.0.1:{broker.port}"

        wait_for(
            lambda: daemon.sink(sink).get("pending", 0) >= 15,
            30,
            "events to be spooled while the broker is down",
        )
        time.sleep(2.0)  # down for a while: several failed deliveries
        broker.start()
        drop_images(folder, 25, 5)
        wait_for(lambda: len(subscriber.received()) >= 30, 60, "every event after the broker came back")
        time.sleep(1.0)  # any duplicate would arrive now
        wait_for(lambda: daemon.sink(sink).get("pending") == 0, 10, "the status to show an empty spool")
        status = daemon.sink(sink)
        assert status["failures"] >= 1 and status["dropped"] == 0
        assert daemon.stop() == 0
    received = subscriber.received()
    assert [Path(e["source_file"]).name for e in received] == [f"{i:04d}.png" for i in range(30)]
    assert len({e["event_id"] for e in received}) == 30
    assert [e["is_anomalous"] for e in received] == [bool(i % 2) for i in range(30)]


@contextlib.contextmanager
def broker_and_subscriber(root: Path) -> Iterator[tuple[Broker, Subscriber, dict[str, Any]]]:
    """A mosquitto broker on loopback, a subscriber to every camera's topic on it, and the
    settings of a sink that publishes there; the broker is stopped at the end."""
    broker = Broker(root)
    broker.start()
    subscriber = None
    try:
        wait_for(lambda: _connectable(broker.port), 10, "mosquitto to listen")
        subscriber = Subscriber.connected(broker.port)
        yield (
            broker,
            subscriber,
            {"type": "mqtt", "host": "127.0.0.1", "port": broker.port, "topic": "lookout/{camera}"},
        )
    finally:
        if subscriber is not None:
            subscriber.close()
        broker.stop()


def _connectable(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(not shutil.which(MOSQUITTO), reason="mosquitto is missing (run make setup)")
def test_events_over_tls(tmp_path: Path, agent_process, camera_daemon, certificates: Path) -> None:
    """The sink verifies the broker's certificate against the configured CA and publishes over TLS."""
    broker = Broker(tmp_path / "broker")
    tls_port = free_port()
    with broker.config.open("a") as config:
        config.write(
            f"listener {tls_port} 127.0.0.1\ncafile {certificates / 'ca.pem'}\n"
            f"certfile {certificates / 'server.pem'}\nkeyfile {certificates / 'server.key'}\n"
        )
    broker.start()
    agent, folder = agent_and_folder(agent_process, tmp_path)
    subscriber = None
    try:
        wait_for(lambda: _connectable(tls_port), 10, "mosquitto to listen with TLS")
        subscriber = Subscriber.connected(broker.port)  # the plain listener, for the test's eyes only
        sink_settings = {
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": tls_port,
            "topic": "lookout/{camera}",
            "tls": {"ca": str(certificates / "ca.pem")},
        }
        daemon = camera_daemon(folder_camera_config(agent.address, "tls", folder, [sink_settings]))
        drop_images(folder, 0, 4)
        wait_for(lambda: len(subscriber.received()) >= 4, 30, "the events over TLS")
        sink = f"mqtt:127.0.0.1:{tls_port}"
        # The status file is rewritten every few seconds.
        wait_for(lambda: daemon.sink(sink).get("pending") == 0, 30, "the status to show nothing pending")
        assert daemon.sink(sink)["dropped"] == 0
        assert daemon.stop() == 0
    finally:
        if subscriber is not None:
            subscriber.close()
        broker.stop()
    assert [Path(e["source_file"]).name for e in subscriber.received()] == [f"{i:04d}.png" for i in range(4)]
