"""Digital I/O through the Linux GPIO character device (libgpiod's Python bindings, `gpiod`).

Outputs: a pulse of `pulse_ms` on the `ok` or `ng` line for each result the `rule` selects
(all, normal: ok only, anomaly: ng only), and on the `error` line for each failed inspection.
A pulse on a line still high is extended. A thread of its own drives the lines; a camera only
queues a pulse.

Trigger input: an edge (rising, falling or both, as the kernel reports it with its timestamp)
starts an inspection when the camera is Ready. `debounce_ms` is a lockout: the first edge
triggers at once, the edges within `debounce_ms` after it (contact bounce) are ignored. A
digital trigger has no Ack line: its handshake acknowledges itself once the result is out.

The chip is opened through `request_lines` (gpiod.request_lines), the one place the tests
replace where the kernel has no gpio-sim (tests/camera/test_factory_io_gpio.py).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import queue
import threading
import time
from typing import Any

import gpiod
from gpiod.line import Bias, Direction, Edge, Value

from .handshake import Handshake, Refused, State
from .settings import GpioOutput, TriggerConfig

log = logging.getLogger(__name__)

CONSUMER = "lookout-edge"
EDGES = {"rising": Edge.RISING, "falling": Edge.FALLING, "both": Edge.BOTH}
BIASES = {
    "as-is": Bias.AS_IS,
    "disabled": Bias.DISABLED,
    "pull-up": Bias.PULL_UP,
    "pull-down": Bias.PULL_DOWN,
}
WAIT_S = 0.2  # how often the threads look at their stop flag


def request_lines(chip: str, config: dict[Any, gpiod.LineSettings | None]) -> Any:
    """The line request for `config` on `chip`; raises OSError when the chip or a line is not there."""
    return gpiod.request_lines(chip, config=config, consumer=CONSUMER)


class GpioOutputs:
    """The output lines of one `outputs[]` entry, for the cameras it serves."""

    def __init__(self, config: GpioOutput, handshakes: list[Handshake]) -> None:
        self.config = config
        self.name = f"gpio:{config.chip}"
        self._handshakes = handshakes
        self._request: Any = None
        self._pulses: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._seen: dict[str, tuple[int, bool]] = {}  # camera -> (inspected, error) last seen
        self._thread = threading.Thread(target=self._run, name="factory-io-gpio", daemon=True)
        self._failing = False

    def start(self) -> None:
        settings = gpiod.LineSettings(
            direction=Direction.OUTPUT, output_value=Value.INACTIVE, active_low=self.config.active_low
        )
        self._request = request_lines(self.config.chip, {tuple(self.config.lines.values()): settings})
        self._thread.start()
        for handshake in self._handshakes:
            handshake.subscribe(self._on_state)

    def _on_state(self, state: State) -> None:
        """Under the handshake's lock: queue the pulses this state asks for, nothing more."""
        inspected, error = self._seen.get(state.camera, (state.inspected, state.error))
        self._seen[state.camera] = (state.inspected, state.error)
        lines = self.config.lines
        if state.inspected > inspected and state.result is not None:
            role = "ng" if state.result.is_anomalous else "ok"
            wanted = self.config.rule == "all" or self.config.rule == (
                "anomaly" if role == "ng" else "normal"
            )
            if wanted and role in lines:
                self._pulses.put(lines[role])
        if state.error and not error and "error" in lines:
            self._pulses.put(lines["error"])

    def _run(self) -> None:
        ends: dict[int, float] = {}  # line -> when its pulse ends (monotonic)
        pulse_s = self.config.pulse_ms / 1000
        while True:
            timeout = min([end - time.monotonic() for end in ends.values()] + [WAIT_S])
            try:
                line = self._pulses.get(timeout=max(0.0, timeout))
            except queue.Empty:
                line = -1
            if line is None:  # stop
                break
            if line >= 0:
                if line not in ends:
                    self._set(line, Value.ACTIVE)
                ends[line] = time.monotonic() + pulse_s
            for ended in [n for n, end in ends.items() if end <= time.monotonic()]:
                self._set(ended, Value.INACTIVE)
                del ends[ended]
        for line in ends:
            self._set(line, Value.INACTIVE)

    def _set(self, line: int, value: Value) -> None:
        try:
            self._request.set_value(line, value)
        except OSError as exc:
            if not self._failing:
                log.error("%s: cannot drive line %d: %s", self.name, line, exc)
            self._failing = True
            return
        if self._failing:
            log.info("%s: driving the lines again", self.name)
        self._failing = False

    def stop(self) -> None:
        if self._thread.is_alive():
            self._pulses.put(None)
            self._thread.join(5.0)
        if self._request is not None:
            self._request.release()
            self._request = None


class GpioTrigger:
    """A camera's trigger input line."""

    def __init__(self, config: TriggerConfig, handshake: Handshake) -> None:
        assert config.line is not None
        self.config = config
        self.line = config.line
        self.name = f"gpio trigger:{config.chip}:{config.line} ({handshake.camera})"
        self._handshake = handshake
        self._request: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"factory-io-gpio-{self.line}", daemon=True)

    def start(self) -> None:
        settings = gpiod.LineSettings(
            direction=Direction.INPUT,
            edge_detection=EDGES[self.config.edge],
            bias=BIASES[self.config.bias],
            active_low=self.config.active_low,
        )
        self._request = request_lines(self.config.chip, {self.line: settings})
        self._thread.start()

    def _run(self) -> None:
        lockout_ns = int(self.config.debounce_ms * 1_000_000)
        last_ns: int | None = None
        wait = datetime.timedelta(seconds=WAIT_S)
        while not self._stop.is_set():
            try:
                if not self._request.wait_edge_events(wait):
                    continue
                events = self._request.read_edge_events()
            except OSError as exc:
                log.error("%s: cannot read edges: %s", self.name, exc)
                self._stop.wait(1.0)
                continue
            for event in events:
                if last_ns is not None and event.timestamp_ns - last_ns < lockout_ns:
                    continue  # a bounce
                last_ns = event.timestamp_ns
                with contextlib.suppress(Refused):  # logged and counted by the handshake
                    self._handshake.start("gpio")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        if self._request is not None:
            self._request.release()
            self._request = None
