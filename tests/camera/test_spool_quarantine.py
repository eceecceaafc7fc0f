"""Bad files in a sink's spool are moved aside into the quarantine folder; the rest is delivered."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from lookout_edge.client.camera.sinks import SpooledSink, Transport
from lookout_edge.client.camera.spool import Spool
from tests.camera.conftest import agent_and_folder, folder_camera_config, save_image, wait_for
from tests.camera.test_mqtt import MOSQUITTO, broker_and_subscriber
from tests.conftest import make_image

EMPTY = b""
TRUNCATED = b'{"camera": "bench", "model": "s'
NOT_AN_OBJECT = b"[1, 2, 3]"


class Recorder(Transport):
    name = "recorder"

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def deliver(self, event: dict[str, Any], payload: bytes) -> None:
        with self._lock:
            self.events.append(event)


def test_bad_events_at_the_head_of_the_spool_are_quarantined(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    for sequence, payload in enumerate((EMPTY, TRUNCATED, NOT_AN_OBJECT)):
        (directory / f"{sequence:016d}.event").write_bytes(payload)
    transport = Recorder()
    sink = SpooledSink(transport, Spool(directory, 100))
    try:
        for index in range(5):
            sink.submit({"camera": "c", "model": "m", "n": index})
        wait_for(lambda: len(transport.events) == 5, 10, "the events behind the bad ones")
    finally:
        sink.close()
    assert [e["n"] for e in transport.events] == list(range(5))
    stats = sink.stats()
    assert stats["quarantined"] == 3 and stats["pending"] == 0 and stats["failures"] == 0
    quarantined = sorted(p.read_bytes() for p in (tmp_path / "spool.quarantine").iterdir())
    assert quarantined == sorted([EMPTY, TRUNCATED, NOT_AN_OBJECT])


@pytest.mark.skipif(not shutil.which(MOSQUITTO), reason="mosquitto is missing (run make setup)")
def test_stray_and_corrupt_spool_files_neither_disable_nor_block_the_sink(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    """A spool left with an empty, a truncated and a stray file: after a restart, the event
    pending among them and every new one are delivered, in order."""
    spool = tmp_path / "state" / "spool" / "0-mqtt"
    spool.mkdir(parents=True)
    (spool / "0000000000000000.event").write_bytes(EMPTY)
    (spool / "0000000000000001.event").write_bytes(TRUNCATED)
    pending = {"event_id": "from-before", "camera": "bench", "model": "seg"}
    (spool / "0000000000000002.event").write_text(json.dumps(pending))
    (spool / "abc.event").write_bytes(b"not a spooled event")
    (spool / "7.event").write_text(json.dumps(pending))  # a number, but not a name the spool writes
    agent, folder = agent_and_folder(agent_process, tmp_path)
    with broker_and_subscriber(tmp_path / "broker") as (broker, subscriber, sink_settings):
        daemon = camera_daemon(folder_camera_config(agent.address, "bench", folder, [sink_settings]))
        for index in range(3):
            save_image(folder, f"{index}.png", make_image())
        wait_for(lambda: len(subscriber.received()) >= 4, 30, "the pending event and three new ones")
        sink = f"mqtt:127.0.0.1:{broker.port}"
        wait_for(lambda: daemon.sink(sink).get("pending") == 0, 10, "the status to show an empty spool")
        assert daemon.sink(sink)["quarantined"] == 4
        assert daemon.stop() == 0
    received = subscriber.received()
    assert received[0] == pending
    assert [Path(e["source_file"]).name for e in received[1:]] == ["0.png", "1.png", "2.png"]
    quarantine = tmp_path / "state" / "spool" / "0-mqtt.quarantine"
    assert sorted(p.name.split("-", 1)[1] for p in quarantine.iterdir()) == [
        "0000000000000000.event",
        "0000000000000001.event",
        "7.event",
        "abc.event",
    ]
    assert "quarantined" in daemon.log()
