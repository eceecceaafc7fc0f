"""Digital I/O: a trigger input with debounce and ok/ng/error output pulses, with a real agent
and model; outputs that cannot start (a missing chip, a port in use) are left out.

Where the kernel provides `gpio-sim` (configfs, /sys/kernel/config/gpio-sim), the first test
drives a simulated chip through the real character device: the daemon runs as a process with
the real libgpiod bindings, the test pulls the input line and samples the output lines in sysfs.
Elsewhere it is skipped with the reason; this project's container has neither configfs nor
gpio-sim (nor any /dev/gpiochip*).

The second test runs everywhere and uses a stand-in at the character-device boundary only: the
daemon (in this process) is real down to `factory_io.gpio.request_lines`, the single function
that opens a chip, which returns a fake line request here (`StandInChips`). It keeps the line
settings the daemon asked for, delivers edge events only of the requested kind, with the
kernel's timestamps, and records every value the daemon drives. A chip it does not stand in
for goes to the real gpiod, which fails as the kernel does for a missing device.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gpiod
import pytest
from gpiod.line import Direction, Edge, Value

from lookout_edge.client.camera.config import parse_config
from lookout_edge.client.camera.daemon import CameraDaemon
from lookout_edge.client.camera.factory_io import gpio
from lookout_edge.client.edge_client import EdgeAgentClient
from tests.camera.conftest import read_events, save_image, wait_for
from tests.conftest import HEIGHT, make_image

GPIO_SIM = Path("/sys/kernel/config/gpio-sim")
PULSE_MS = 150


class StandInRequest:
    """What gpiod.request_lines returns, as far as the daemon uses it."""

    def __init__(self, config: dict[Any, gpiod.LineSettings | None]) -> None:
        self.settings: dict[int, gpiod.LineSettings] = {}
        for key, settings in config.items():
            assert settings is not None
            for line in key if isinstance(key, tuple) else (key,):
                self.settings[line] = settings
        self.history: dict[int, list[tuple[float, Value]]] = {line: [] for line in self.settings}
        self._events: list[gpiod.EdgeEvent] = []
        self._cond = threading.Condition()
        self._seqno = 0
        self.released = False

    def set_value(self, line: int, value: Value) -> None:
        assert self.settings[line].direction == Direction.OUTPUT, f"line {line} is not an output"
        self.history[line].append((time.monotonic(), value))

    def edge(self, line: int, rising: bool, timestamp_ns: int) -> None:
        """The kernel saw the input change; it reports only the edges that were asked for."""
        wanted = self.settings[line].edge_detection
        if wanted not in (Edge.BOTH, Edge.RISING if rising else Edge.FALLING):
            return
        self._seqno += 1
        kind = gpiod.EdgeEvent.Type.RISING_EDGE if rising else gpiod.EdgeEvent.Type.FALLING_EDGE
        with self._cond:
            self._events.append(gpiod.EdgeEvent(kind, timestamp_ns, line, self._seqno, self._seqno))
            self._cond.notify_all()

    def wait_edge_events(self, timeout: datetime.timedelta | float | None = None) -> bool:
        seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._events), seconds)

    def read_edge_events(self) -> list[gpiod.EdgeEvent]:
        with self._cond:
            events, self._events = self._events, []
            return events

    def release(self) -> None:
        self.released = True

    def pulses(self, line: int) -> list[float]:
        """The length in seconds of each pulse driven on `line` (ACTIVE, then INACTIVE)."""
        changes = self.history[line]
        return [
            end - start
            for (start, high), (end, low) in zip(changes[::2], changes[1::2], strict=False)
            if high == Value.ACTIVE and low == Value.INACTIVE
        ]


class StandInChips:
    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.requests: dict[str, list[StandInRequest]] = {path: [] for path in paths}

    def request_lines(self, chip: str, config: dict[Any, gpiod.LineSettings | None]) -> Any:
        if chip not in self.paths:
            return gpiod.request_lines(chip, config=config, consumer="lookout-edge-test")
        request = StandInRequest(config)
        self.requests[chip].append(request)
        return request

    def one(self, chip: str, line: int) -> StandInRequest:
        return next(r for r in self.requests[chip] if line in r.settings)


def camera_config(agent: Any, folder: Path, tmp_path: Path, chips: tuple[str, str, str]) -> dict[str, Any]:
    trigger_chip, outputs_chip, anomaly_chip = chips
    return {
        "agent": {"socket": agent.address},
        "state_dir": str(tmp_path / "state"),
        "status": {"interval": 60},
        "cameras": [
            {
                "name": "line1",
                "source": str(folder),
                "model": "seg",
                "poll_interval": 0.05,
                "trigger": {
                    "type": "gpio",
                    "chip": trigger_chip,
                    "line": 4,
                    "edge": "rising",
                    "debounce_ms": 20,
                    "bias": "pull-down",
                    "timeout": 2,
                },
            }
        ],
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
        "outputs": [
            {
                "type": "gpio",
                "chip": outputs_chip,
                "lines": {"ok": 1, "ng": 2, "error": 3},
                "pulse_ms": PULSE_MS,
            },
            {
                "type": "gpio",
                "chip": anomaly_chip,
                "lines": {"ng": 0},
                "pulse_ms": PULSE_MS,
                "rule": "anomaly",
            },
            {"type": "gpio", "chip": "/dev/gpiochip-missing", "lines": {"ng": 0}},
        ],
    }


@pytest.fixture
def in_process_daemon() -> Iterator[list[CameraDaemon]]:
    daemons: list[CameraDaemon] = []
    yield daemons
    for daemon in daemons:
        daemon.stop()


def test_trigger_debounce_and_pulses_through_a_stand_in_chip(
    tmp_path: Path, agent_process, models_dir: Path, monkeypatch, caplog, in_process_daemon
) -> None:
    agent = agent_process()
    folder = tmp_path / "incoming"
    folder.mkdir()
    chips = StandInChips(["/dev/gpiochip-in", "/dev/gpiochip-out", "/dev/gpiochip-ng"])
    monkeypatch.setattr(gpio, "request_lines", chips.request_lines)
    caplog.set_level(logging.INFO)
    taken = socket.create_server(("127.0.0.1", 0))  # a port some other program holds
    busy_port = taken.getsockname()[1]
    raw = camera_config(
        agent, folder, tmp_path, ("/dev/gpiochip-in", "/dev/gpiochip-out", "/dev/gpiochip-ng")
    )
    raw["outputs"].append({"type": "modbus", "address": f"127.0.0.1:{busy_port}"})
    config = parse_config(raw)
    daemon = CameraDaemon(config)
    in_process_daemon.append(daemon)
    daemon.start()
    assert "gpio:/dev/gpiochip-missing is disabled: [Errno 2] No such file or directory" in caplog.text
    assert f"modbus:127.0.0.1:{busy_port} is disabled: cannot serve 127.0.0.1:{busy_port}" in caplog.text
    taken.close()

    trigger = chips.one("/dev/gpiochip-in", 4)
    settings = trigger.settings[4]
    assert (settings.direction, settings.edge_detection) == (Direction.INPUT, Edge.RISING)
    outputs, anomaly_only = chips.one("/dev/gpiochip-out", 1), chips.one("/dev/gpiochip-ng", 0)
    handshake = daemon.workers[0].handshake
    assert handshake is not None
    wait_for(lambda: handshake.state().ready, 30, "the camera to be Ready")
    events_path = tmp_path / "events.jsonl"

    # A good part. The contact bounces for 6 ms after closing; those edges are read only once
    # the inspection is over and the camera is Ready again (a slow reader): their kernel
    # timestamps, within debounce_ms of the first edge, are what keeps them from triggering.
    save_image(folder, "0-good.png", make_image())
    now = time.monotonic_ns()
    trigger.edge(4, True, now)
    wait_for(lambda: len(read_events(events_path)) == 1, 10, "the good part's event")
    wait_for(lambda: outputs.pulses(1), 5, "the ok pulse")
    wait_for(lambda: handshake.state().ready, 5, "Ready again (a digital trigger has no Ack)")
    for i, rising in enumerate((False, True, False, True)):
        trigger.edge(4, rising, now + (i + 1) * 1_500_000)
    trigger.edge(4, False, now + 300_000_000)  # the contact opens: not an edge the camera asked for
    time.sleep(0.3)
    assert handshake.counts["triggers"] == 1 and handshake.counts["refused"] == 0

    # A bad part, a trigger 30 ms after the last edge: past the debounce, a new inspection.
    save_image(folder, "1-bad.png", make_image(red=HEIGHT // 2))
    trigger.edge(4, True, now + 330_000_000)
    wait_for(lambda: outputs.pulses(2) and anomaly_only.pulses(0), 10, "the ng pulses")

    # The model stopped: the error line pulses, neither ok nor ng.
    with EdgeAgentClient(agent.address) as operator:
        operator.stop_model("seg")
    save_image(folder, "2-stopped.png", make_image())
    wait_for(lambda: handshake.state().ready, 5, "Ready")
    trigger.edge(4, True, now + 1_000_000_000)
    wait_for(lambda: outputs.pulses(3), 10, "the error pulse")
    time.sleep(PULSE_MS / 1000 * 2)

    assert [(Path(e["source_file"]).name, e["is_anomalous"]) for e in read_events(events_path)] == [
        ("0-good.png", False),
        ("1-bad.png", True),
    ]
    for line in (1, 2, 3):
        assert len(outputs.pulses(line)) == 1, outputs.history
        assert PULSE_MS / 1000 * 0.9 <= outputs.pulses(line)[0] < PULSE_MS / 1000 + 0.3
    assert len(anomaly_only.pulses(0)) == 1  # rule anomaly: the good part gave none
    assert handshake.counts["triggers"] == 3 and handshake.counts["errors"] == 1
    daemon.stop()
    in_process_daemon.clear()
    assert trigger.released and outputs.released and anomaly_only.released
    assert outputs.history[1][-1][1] == Value.INACTIVE


def _write(path: Path, text: str) -> None:
    path.write_text(text)


@pytest.fixture
def gpio_sim() -> Iterator[tuple[str, Path]]:
    """A simulated chip of 8 lines: (its /dev path, the sysfs folder of its lines)."""
    if not GPIO_SIM.is_dir():
        pytest.skip(
            "the kernel offers no gpio-sim here (/sys/kernel/config/gpio-sim is missing: "
            "modprobe gpio-sim and mount configfs where the kernel has them)"
        )
    chip = GPIO_SIM / f"lookout-edge-{time.monotonic_ns()}"
    bank = chip / "gpio-bank0"
    chip.mkdir()
    bank.mkdir()
    try:
        _write(bank / "num_lines", "8")
        _write(chip / "live", "1")
        name = (bank / "chip_name").read_text().strip()
        device = (chip / "dev_name").read_text().strip()
        yield f"/dev/{name}", Path("/sys/devices/platform") / device / name
    finally:
        _write(chip / "live", "0")
        bank.rmdir()
        chip.rmdir()


def test_trigger_and_pulses_through_the_kernels_gpio_sim(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path, gpio_sim: tuple[str, Path]
) -> None:
    device, lines = gpio_sim
    agent = agent_process()
    folder = tmp_path / "incoming"
    folder.mkdir()
    config = camera_config(agent, folder, tmp_path, (device, device, device))
    config["outputs"] = [
        {"type": "gpio", "chip": device, "lines": {"ok": 1, "ng": 2, "error": 3}, "pulse_ms": PULSE_MS}
    ]
    daemon = camera_daemon(config)

    def value(line: int) -> int:
        return int((lines / f"sim_gpio{line}" / "value").read_text())

    def pulse(line: int) -> None:
        _write(lines / f"sim_gpio{line}" / "pull", "pull-up")
        time.sleep(0.05)
        _write(lines / f"sim_gpio{line}" / "pull", "pull-down")

    def wait_high(line: int, timeout: float = 10.0) -> float:
        wait_for(lambda: value(line) == 1, timeout, f"line {line} high")
        started = time.monotonic()
        wait_for(lambda: value(line) == 0, 2, f"line {line} low again")
        return time.monotonic() - started

    wait_for(lambda: "gpio trigger" in daemon.log() and "serving" in daemon.log(), 30, "the trigger line")
    with EdgeAgentClient(agent.address) as client:
        wait_for(lambda: client.describe_model("seg").status == "RUNNING", 30, "the model")
    time.sleep(0.5)  # the camera is Ready once it sees its model running
    save_image(folder, "0-good.png", make_image())
    pulse(4)
    assert wait_high(1) < PULSE_MS / 1000 + 0.3
    save_image(folder, "1-bad.png", make_image(red=HEIGHT // 2))
    time.sleep(0.2)
    pulse(4)
    wait_high(2)
    assert value(1) == 0 and value(3) == 0
    assert daemon.stop() == 0
