"""The Modbus TCP output and trigger: the camera daemon as a process with a real agent and model,
its pymodbus server on loopback, and pymodbus's own ModbusTcpClient playing the PLC."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import ModbusTcpClient

from lookout_edge.client.camera.config import ConfigError, parse_config
from lookout_edge.client.edge_client import EdgeAgentClient
from tests.camera.conftest import free_port, read_events, save_image, wait_for
from tests.conftest import HEIGHT, make_image

# The documented map (docs/factory-io.md): camera n at 100·n in every table.
TRIGGER, ACK = 0, 1  # coils
CONFIG_INDEX = 0  # holding register
READY, BUSY, RESULT_READY, RESULT_OK, RESULT_NG, ERROR, IS_ANOMALOUS = range(7)  # discrete inputs
STATUS, ERROR_CODE, SCORE, CONFIDENCE, THRESHOLD, FRAME_ID, INSPECTED, ANOMALOUS, TIMESTAMP = (
    0, 1, 2, 3, 4, 5, 7, 9, 11,
)  # fmt: skip
AREAS = 20
ILLEGAL_ADDRESS, ILLEGAL_VALUE, DEVICE_BUSY = 2, 3, 6


class Plc:
    """A connection to the daemon's server, as a PLC's Modbus client makes it."""

    def __init__(self, client: ModbusTcpClient) -> None:
        self.client = client

    @classmethod
    def connect(cls, port: int, timeout: float = 30.0) -> Plc:
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
        wait_for(client.connect, timeout, "the Modbus server")
        return cls(client)

    def inputs(self, base: int = 0) -> list[bool]:
        response = self.client.read_discrete_inputs(base, count=7)
        assert not response.isError(), response
        return list(response.bits[:7])

    def registers(self, base: int = 0, count: int = 36) -> list[int]:
        response = self.client.read_input_registers(base, count=count)
        assert not response.isError(), response
        return list(response.registers)

    def coil(self, address: int, value: bool) -> int:
        """0, or the exception code of the refusal."""
        response = self.client.write_coil(address, value)
        return response.exception_code if response.isError() else 0

    def holding(self, address: int, value: int) -> int:
        response = self.client.write_register(address, value)
        return response.exception_code if response.isError() else 0

    def wait(self, bit: int, timeout: float = 10.0) -> list[bool]:
        return wait_for(lambda: self.inputs()[bit] and self.inputs(), timeout, f"discrete input {bit}")

    def close(self) -> None:
        self.client.close()


def words(registers: list[int]) -> int:
    value = 0
    for register in registers:
        value = value << 16 | register
    return value


def test_the_handshake_the_register_map_refusals_a_reconnect_and_the_error_codes(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent = agent_process()
    folder, other = tmp_path / "line1", tmp_path / "line2"
    folder.mkdir()
    other.mkdir()
    port = free_port()
    config: dict[str, Any] = {
        "agent": {"socket": agent.address},
        "cameras": [
            {
                "name": "line1",
                "source": str(folder),
                "model": "seg",
                "poll_interval": 0.05,
                "trigger": {"type": "modbus", "timeout": 2, "models": ["cls"]},
            },
            {"name": "line2", "source": str(other), "model": "seg", "poll_interval": 0.05},  # free-running
        ],
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
        "outputs": [{"type": "modbus", "address": f"127.0.0.1:{port}"}],
    }
    daemon = camera_daemon(config)
    plc = Plc.connect(port)
    plc.wait(READY, 30)

    # A good part: Trigger raised; Busy at once (the inputs are read from the handshake).
    save_image(folder, "0-good.png", make_image())
    before_ms = time.time() * 1000 - 1000
    assert plc.coil(TRIGGER, True) == 0
    ready, busy, result_ready = plc.inputs()[:3]
    assert (ready, busy, result_ready) == (False, True, False)
    assert plc.coil(TRIGGER, False) == 0
    bits = plc.wait(RESULT_READY)
    assert bits == [False, False, True, True, False, False, False]  # ResultReady, ResultOK
    registers = plc.registers()
    event = read_events(tmp_path / "events.jsonl")[-1]
    assert registers[STATUS] == 0b1100 and registers[ERROR_CODE] == 0
    assert registers[SCORE] == round(event["anomaly_score"] * 1000)
    assert (
        registers[THRESHOLD] == round(event["threshold"] * 1000) and registers[SCORE] < registers[THRESHOLD]
    )
    assert registers[CONFIDENCE] == round(event["confidence"] * 1000)
    assert words(registers[FRAME_ID : FRAME_ID + 2]) == event["frame_id"] == 1
    assert (
        words(registers[INSPECTED : INSPECTED + 2]) == 1 and words(registers[ANOMALOUS : ANOMALOUS + 2]) == 0
    )
    stamp = words(registers[TIMESTAMP : TIMESTAMP + 4])
    assert before_ms < stamp < time.time() * 1000
    assert stamp == int(datetime.datetime.fromisoformat(event["time"]).timestamp() * 1000)

    # What the handshake does not take now is refused with the documented exception codes.
    assert plc.coil(TRIGGER, True) == DEVICE_BUSY  # not Ready: the result waits for Ack
    assert plc.holding(CONFIG_INDEX, 9) == ILLEGAL_VALUE  # the table has two models
    assert plc.coil(5, True) == ILLEGAL_ADDRESS  # no such coil
    assert plc.holding(42, 1) == ILLEGAL_ADDRESS
    assert plc.coil(100 + TRIGGER, True) == ILLEGAL_ADDRESS  # line2 is free-running
    assert plc.client.read_coils(TRIGGER, count=1).bits[0] is False  # a refused write is not stored

    assert plc.coil(ACK, True) == 0
    assert plc.inputs()[:5] == [True, False, False, False, False]
    assert plc.coil(ACK, False) == 0

    # A bad part; the PLC drops its connection before the result and comes back.
    save_image(folder, "1-bad.png", make_image(red=HEIGHT // 2))
    assert plc.coil(TRIGGER, True) == 0
    plc.close()
    plc = Plc.connect(port)  # a new connection
    bits = plc.wait(RESULT_READY)
    assert bits[RESULT_NG] and bits[IS_ANOMALOUS] and not bits[RESULT_OK]
    registers = plc.registers()
    event = read_events(tmp_path / "events.jsonl")[-1]
    assert registers[STATUS] == 0b1010100 and registers[SCORE] >= registers[THRESHOLD]
    assert (
        words(registers[INSPECTED : INSPECTED + 2]) == 2 and words(registers[ANOMALOUS : ANOMALOUS + 2]) == 1
    )
    areas = [round(a["area"] * 10000) for a in event["anomalies"]]
    assert registers[AREAS : AREAS + len(areas)] == areas and max(areas) >= 4000
    assert plc.coil(TRIGGER, False) == 0
    assert plc.coil(ACK, True) == 0 and plc.coil(ACK, False) == 0

    # ConfigIndex 1: the second model of the table.
    assert plc.holding(CONFIG_INDEX, 1) == 0
    save_image(folder, "2-cls.png", make_image())
    assert plc.coil(TRIGGER, True) == 0
    plc.wait(RESULT_READY)
    assert read_events(tmp_path / "events.jsonl")[-1]["model"] == "cls"
    assert plc.coil(TRIGGER, False) == 0 and plc.coil(ACK, True) == 0 and plc.coil(ACK, False) == 0
    assert plc.holding(CONFIG_INDEX, 0) == 0

    # The agent hangs (SIGSTOP): TIMEOUT (3) once trigger.timeout has passed. The late result
    # still reaches the sinks, not the PLC.
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        save_image(folder, "3-late.png", make_image())
        started = time.monotonic()
        assert plc.coil(TRIGGER, True) == 0
        bits = plc.wait(ERROR)
        assert 1.9 < time.monotonic() - started < 4 and plc.registers(0, 2) == [0b100000, 3]
        assert not (bits[RESULT_READY] or bits[RESULT_OK] or bits[RESULT_NG])
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    wait_for(
        lambda: read_events(tmp_path / "events.jsonl")[-1]["source_file"].endswith("3-late.png"), 10, "late"
    )
    assert plc.registers(0, 2) == [0b100000, 3]  # the late result changed nothing for the PLC
    assert plc.coil(TRIGGER, False) == 0 and plc.coil(ACK, True) == 0 and plc.coil(ACK, False) == 0

    # The model stopped: Error with MODEL_NOT_RUNNING (2), neither OK nor NG.
    with EdgeAgentClient(agent.address) as operator:
        operator.stop_model("seg")
    save_image(folder, "4-stopped.png", make_image())
    assert plc.coil(TRIGGER, True) == 0
    bits = plc.wait(ERROR)
    assert not (bits[RESULT_READY] or bits[RESULT_OK] or bits[RESULT_NG])
    assert plc.registers(0, 2) == [0b100000, 2]
    assert plc.coil(TRIGGER, False) == 0 and plc.coil(ACK, True) == 0
    assert plc.inputs()[READY] and plc.registers(0, 2) == [0b1, 0]

    # The free-running camera's results in its own block, while one client hangs half-way
    # through a request and another sends garbage: neither slows the camera nor the server.
    stuck = socket.create_connection(("127.0.0.1", port))
    stuck.sendall(b"\x00\x07\x00")  # three bytes of a header, then nothing, never reading
    garbage = socket.create_connection(("127.0.0.1", port))
    garbage.sendall(bytes(range(256)) * 4)
    for i in range(5):
        save_image(other, f"free-{i}.png", make_image())
    wait_for(lambda: words(plc.registers(100 + INSPECTED, 2)) == 5, 15, "line2's results")
    assert plc.inputs(100)[READY] is False  # a free-running camera is never Ready for a trigger
    stuck.close()
    garbage.close()
    plc.close()
    assert daemon.stop() == 0
    names = [(Path(e["source_file"]).name, e["model"]) for e in read_events(tmp_path / "events.jsonl")]
    assert names == [
        ("0-good.png", "seg"),
        ("1-bad.png", "seg"),
        ("2-cls.png", "cls"),
        ("3-late.png", "seg"),
        *[(f"free-{i}.png", "seg") for i in range(5)],
    ]


def _config(outputs: list[dict[str, Any]], trigger: dict[str, Any] | None = None) -> dict[str, Any]:
    camera: dict[str, Any] = {"name": "line1", "source": "rtsp://10.0.0.5/stream1", "model": "m"}
    if trigger is not None:
        camera["trigger"] = trigger
    return {
        "cameras": [camera],
        "sinks": [{"type": "jsonl", "path": "/tmp/events.jsonl"}],
        "outputs": outputs,
    }


MODBUS = {"type": "modbus", "address": "127.0.0.1:5020"}


@pytest.mark.parametrize(
    ("outputs", "trigger", "message"),
    [
        ([{"type": "profinet"}], None, "outputs[0].type: one of opcua, modbus, gpio, got 'profinet'"),
        ([{"type": "modbus", "address": "5020"}], None, "outputs[0].address: HOST:PORT"),
        (
            [{"type": "modbus", "address": "0.0.0.0:502"}],
            None,
            "outputs[0]: 0.0.0.0 is not a loopback address and Modbus TCP has no authentication",
        ),
        ([{**MODBUS, "cameras": ["line9"]}], None, "outputs[0].cameras: no camera named 'line9'"),
        ([MODBUS, MODBUS], None, "outputs: 127.0.0.1:5020 is used twice"),
        (
            [{"type": "opcua", "endpoint": "http://h:1/"}],
            None,
            "outputs[0].endpoint: opc.tcp://HOST:PORT/path",
        ),
        ([{"type": "opcua", "security": ["basic128rsa15"]}], None, "outputs[0].security: each one of none,"),
        (
            [{"type": "opcua", "security": ["basic256sha256_sign_and_encrypt"]}],
            None,
            "outputs[0]: the basic256sha256_sign_and_encrypt policies need certificate and private_key",
        ),
        ([{"type": "opcua", "anonymous": False}], None, "outputs[0].anonymous: false needs a signed policy"),
        (
            [{"type": "opcua", "certificate": "/nonexistent.der"}],
            None,
            "outputs[0].certificate: /nonexistent",
        ),
        ([{"type": "gpio", "lines": {"reset": 3}}], None, "outputs[0].lines: roles are ok, ng, error"),
        ([{"type": "gpio", "lines": {"ok": 3, "ng": 3}}], None, "outputs[0].lines: one line per role"),
        ([{"type": "gpio", "lines": {"ng": 3}, "rule": "some"}], None, "outputs[0].rule: one of all, normal"),
        ([{"type": "gpio", "lines": {"ng": 3}, "pulse_ms": 0}], None, "outputs[0].pulse_ms: must be greater"),
        ([], {"type": "modbus"}, "cameras[0] (line1).trigger.type: modbus needs an output of type modbus"),
        ([MODBUS], {"type": "serial"}, "cameras[0] (line1).trigger.type: one of opcua, modbus, gpio"),
        ([MODBUS], {"type": "modbus", "timeout": -1}, "cameras[0] (line1).trigger.timeout: must be"),
        ([MODBUS], {"type": "modbus", "models": [""]}, "cameras[0] (line1).trigger.models[0]: a model"),
        ([MODBUS], {"type": "modbus", "line": 3}, "cameras[0] (line1).trigger: unknown key(s) line"),
        ([], {"type": "gpio"}, "cameras[0] (line1).trigger.line: required"),
        ([], {"type": "gpio", "line": 3, "edge": "up"}, "cameras[0] (line1).trigger.edge: one of rising,"),
        ([], {"type": "gpio", "line": 3, "bias": "strong"}, "cameras[0] (line1).trigger.bias: one of"),
    ],
)
def test_factory_io_keys_are_checked(
    outputs: list[dict[str, Any]], trigger: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(_config(outputs, trigger))
    assert message in str(raised.value)


def test_factory_io_keys_that_are_fine() -> None:
    config = parse_config(
        _config(
            [{**MODBUS, "address": "0.0.0.0:502", "insecure": True}],
            {"type": "modbus", "models": ["other"], "timeout": 1},
        )
    )
    trigger = config.cameras[0].trigger
    assert trigger is not None and (trigger.type, trigger.models, trigger.timeout) == (
        "modbus",
        ("other",),
        1.0,
    )
    assert config.outputs[0].type == "modbus"
    assert parse_config(_config([])).outputs == []
