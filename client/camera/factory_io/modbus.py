"""The Modbus TCP server (pymodbus): the handshake and the results in four tables.

Camera number n (its place in `cameras`, from 0) has the addresses `100·n … 100·n + 99` of
each table (the map is in docs/factory-io.md):

    coils              +0 Trigger  +1 Ack                                   (the PLC writes them)
    holding registers  +0 ConfigIndex                                       (the PLC writes it)
    discrete inputs    +0 Ready +1 Busy +2 ResultReady +3 ResultOK +4 ResultNG +5 Error +6 IsAnomalous
    input registers    +0 status bits (as the discrete inputs) +1 ErrorCode +2 AnomalyScore×1000
                       +3 Confidence×1000 +4 Threshold×1000 +5..6 FrameId +7..8 Inspected
                       +9..10 Anomalous +11..14 Timestamp (ms since 1970) +20..35 areas×10000

32- and 64-bit values are unsigned, the high word first. Discrete inputs and input registers
are read from the handshake when a request asks for them, one state per camera per request,
so they are never stale and never torn. A write the handshake refuses gets an exception
response: 06 (device busy) for a Trigger or Ack it does not take now, 03 (illegal value) for a
ConfigIndex outside the model table, 02 (illegal address) for anything else or a camera that
is not triggered over Modbus; a refused write is not stored.
"""

from __future__ import annotations

import logging

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simutils import SimUtils

from .handshake import Handshake, Refused, State
from .serving import AsyncServerThread
from .settings import MODBUS_BLOCK, ModbusOutput

log = logging.getLogger(__name__)

SOURCE = "modbus"
START_TIMEOUT_S = 10.0
COIL_TRIGGER, COIL_ACK = 0, 1
HOLDING_CONFIG_INDEX = 0
# Discrete inputs, and the bits of input register +0.
STATUS_BITS = ("ready", "busy", "result_ready", "result_ok", "result_ng", "error")
REG_STATUS, REG_ERROR_CODE, REG_SCORE, REG_CONFIDENCE, REG_THRESHOLD = 0, 1, 2, 3, 4
REG_FRAME_ID, REG_INSPECTED, REG_ANOMALOUS, REG_TIMESTAMP = 5, 7, 9, 11
REG_AREAS, MAX_AREAS = 20, 16
READ_FUNCTIONS = {1, 2, 3, 4}
COIL_WRITES = {5, 15}
HOLDING_WRITES = {6, 16}


def _scaled(value: float, factor: int) -> int:
    """A fraction as an unsigned 16-bit register, clamped."""
    return max(0, min(0xFFFF, round(value * factor)))


def _words(value: int, count: int) -> list[int]:
    """An unsigned integer as `count` registers, the high word first (wrapping around)."""
    value %= 1 << (16 * count)
    return [(value >> (16 * (count - 1 - i))) & 0xFFFF for i in range(count)]


def status_bits(state: State) -> list[bool]:
    bits = [bool(getattr(state, name)) for name in STATUS_BITS]
    bits.append(state.result is not None and state.result.is_anomalous)
    return bits


def input_registers(state: State) -> list[int]:
    """The camera's MODBUS_BLOCK input registers."""
    registers = [0] * MODBUS_BLOCK
    registers[REG_STATUS] = sum(1 << i for i, bit in enumerate(status_bits(state)) if bit)
    registers[REG_ERROR_CODE] = int(state.error_code)
    registers[REG_INSPECTED : REG_INSPECTED + 2] = _words(state.inspected, 2)
    registers[REG_ANOMALOUS : REG_ANOMALOUS + 2] = _words(state.anomalous, 2)
    result = state.result
    if result is not None:
        registers[REG_SCORE] = _scaled(result.anomaly_score, 1000)
        registers[REG_CONFIDENCE] = _scaled(result.confidence, 1000)
        registers[REG_THRESHOLD] = _scaled(result.threshold, 1000)
        registers[REG_FRAME_ID : REG_FRAME_ID + 2] = _words(result.frame_id, 2)
        registers[REG_TIMESTAMP : REG_TIMESTAMP + 4] = _words(int(result.timestamp.timestamp() * 1000), 4)
        for i, (_, area) in enumerate(result.areas[:MAX_AREAS]):
            registers[REG_AREAS + i] = _scaled(area, 10000)
    return registers


class ModbusServer(AsyncServerThread):
    """`cameras` maps a camera's number (its place in `cameras`) to its handshake."""

    def __init__(self, config: ModbusOutput, cameras: dict[int, Handshake]) -> None:
        address = f"{config.host}:{config.port}"
        super().__init__(f"modbus:{address}", address, "factory-io-modbus", START_TIMEOUT_S)
        self.config = config
        self._cameras = cameras
        self._size = (max(cameras, default=0) + 1) * MODBUS_BLOCK

    async def _serve(self) -> None:
        bits = [SimData(0, count=self._size, values=False, datatype=DataType.BITS)]
        registers = [SimData(0, count=self._size, values=0, datatype=DataType.REGISTERS)]
        device = SimDevice(
            id=0,  # every unit id
            simdata=(list(bits), list(bits), list(registers), list(registers)),
            action=self._action,
        )
        server = ModbusTcpServer(device, address=(self.config.host, self.config.port))
        await server.serve_forever(background=True)
        try:
            await self._serving()
        finally:
            await server.shutdown()

    async def _action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """Called by pymodbus for every request, before it reads or stores `registers`."""
        if values is None:
            if function_code == 2:
                self._fill_discrete_inputs(registers)
            elif function_code == 4:
                self._fill_input_registers(registers, start_address)
            elif function_code not in READ_FUNCTIONS | COIL_WRITES | HOLDING_WRITES:
                return ExcCodes.ILLEGAL_FUNCTION
            return None
        if function_code in COIL_WRITES:
            return self._write(address, [bool(v) for v in values], coils=True)
        if function_code in HOLDING_WRITES:
            return self._write(address, [int(v) for v in values], coils=False)
        return ExcCodes.ILLEGAL_FUNCTION

    def _write(self, address: int, values: list[bool] | list[int], coils: bool) -> ExcCodes | None:
        for i, value in enumerate(values):
            number, offset = divmod(address + i, MODBUS_BLOCK)
            handshake = self._cameras.get(number)
            allowed = (COIL_TRIGGER, COIL_ACK) if coils else (HOLDING_CONFIG_INDEX,)
            if handshake is None or offset not in allowed:
                log.warning(
                    "%s: refused a write to %s %d", self.name, "coil" if coils else "register", address + i
                )
                return ExcCodes.ILLEGAL_ADDRESS
            if handshake.trigger_type != SOURCE:
                log.warning("%s: camera %s is not triggered over Modbus", self.name, handshake.camera)
                return ExcCodes.ILLEGAL_ADDRESS
            try:
                if not coils:
                    handshake.set_config_index(int(value), SOURCE)
                else:
                    handshake.set_level("trigger" if offset == COIL_TRIGGER else "ack", bool(value), SOURCE)
            except Refused:
                return ExcCodes.ILLEGAL_VALUE if not coils else ExcCodes.DEVICE_BUSY
        return None

    def _fill_discrete_inputs(self, registers: list[int]) -> None:
        """The whole table (bits packed 16 to a register, as pymodbus keeps them), from now's states."""
        bits = [False] * (len(registers) * 16)
        for number, handshake in self._cameras.items():
            base = number * MODBUS_BLOCK
            for i, bit in enumerate(status_bits(handshake.state())):
                bits[base + i] = bit
        registers[:] = SimUtils.bitsToRegisters(bits)

    def _fill_input_registers(self, registers: list[int], start_address: int) -> None:
        for number, handshake in self._cameras.items():
            base = number * MODBUS_BLOCK - start_address
            registers[base : base + MODBUS_BLOCK] = input_registers(handshake.state())
