"""The `outputs:` section and `cameras[].trigger` of camera.yaml, checked up front.

Parsed from client/camera/config.py; every error names the key at fault, like the rest of the
configuration. Every key is documented in docs/factory-io.md. Nothing here imports asyncua,
pymodbus or gpiod: a configuration is checked without the `factory` extra installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import ConfigError, _mapping, _no_extra, _positive, _take, is_loopback

OUTPUT_TYPES = ("opcua", "modbus", "gpio")
TRIGGER_TYPES = ("opcua", "modbus", "gpio")
GPIO_RULES = ("all", "normal", "anomaly")
GPIO_OUTPUT_LINES = ("ok", "ng", "error")
EDGES = ("rising", "falling", "both")
BIASES = ("as-is", "disabled", "pull-up", "pull-down")
SECURITY_POLICIES = ("none", "basic256sha256_sign", "basic256sha256_sign_and_encrypt")
DEFAULT_TRIGGER_TIMEOUT_S = 5.0
DEFAULT_APPLICATION_URI = "urn:lookout-edge:camera"
MODBUS_BLOCK = 100  # addresses per camera in every Modbus table (docs/factory-io.md)
MAX_MODBUS_CAMERAS = 65536 // MODBUS_BLOCK


@dataclass(frozen=True)
class OpcUaOutput:
    endpoint: str
    host: str
    port: int
    cameras: tuple[str, ...] | None = None  # None: every camera
    security: tuple[str, ...] = ("none",)
    certificate: Path | None = None
    private_key: Path | None = None
    trusted_certificates: tuple[Path, ...] = ()  # client certificates accepted; empty: any
    anonymous: bool = True
    application_uri: str = DEFAULT_APPLICATION_URI
    type: str = "opcua"


@dataclass(frozen=True)
class ModbusOutput:
    host: str
    port: int
    cameras: tuple[str, ...] | None = None
    type: str = "modbus"


@dataclass(frozen=True)
class GpioOutput:
    chip: str
    lines: dict[str, int]  # role (ok, ng, error) -> line offset
    pulse_ms: float = 200.0
    rule: str = "all"  # which results pulse: all, normal (ok line), anomaly (ng line)
    active_low: bool = False
    cameras: tuple[str, ...] | None = None
    type: str = "gpio"


OutputConfig = OpcUaOutput | ModbusOutput | GpioOutput


@dataclass(frozen=True)
class TriggerConfig:
    """A camera that inspects when a PLC says so instead of free-running."""

    type: str  # opcua, modbus or gpio
    timeout: float = DEFAULT_TRIGGER_TIMEOUT_S  # trigger to result, else Error with TIMEOUT
    models: tuple[str, ...] = ()  # ConfigIndex 1, 2, …; index 0 is the camera's own model
    chip: str = "/dev/gpiochip0"  # gpio: the input line
    line: int | None = None
    edge: str = "rising"
    debounce_ms: float = 10.0
    bias: str = "as-is"
    active_low: bool = False


def _address(value: str, key: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"{key}: HOST:PORT, e.g. 127.0.0.1:5020, got {value!r}")
    return host, int(port)


def _camera_names(data: dict[str, Any], where: str, cameras: list[str]) -> tuple[str, ...] | None:
    names = _take(data, "cameras", where, list, None)
    if names is None:
        return None
    for name in names:
        if name not in cameras:
            raise ConfigError(f"{where}.cameras: no camera named {name!r}")
    return tuple(names)


def _insecure(data: dict[str, Any], where: str, host: str, what: str) -> None:
    insecure = _take(data, "insecure", where, bool, False)
    if not is_loopback(host) and what and not insecure:
        raise ConfigError(
            f"{where}: {host} is not a loopback address and {what}; anyone who reaches it can read "
            "results and trigger inspections. Restrict it, or set insecure: true to serve it anyway"
        )


def _file(value: str | None, key: str) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"{key}: {value} is not a readable file")
    return path


def _opcua(data: dict[str, Any], where: str, cameras: list[str]) -> OpcUaOutput:
    endpoint = _take(data, "endpoint", where, str, "opc.tcp://127.0.0.1:4840/lookout-edge/")
    parts = urlsplit(endpoint)
    if parts.scheme != "opc.tcp" or not parts.hostname or parts.port is None:
        raise ConfigError(f"{where}.endpoint: opc.tcp://HOST:PORT/path, got {endpoint!r}")
    security = tuple(_take(data, "security", where, list, ["none"]))
    for policy in security:
        if policy not in SECURITY_POLICIES:
            raise ConfigError(f"{where}.security: each one of {', '.join(SECURITY_POLICIES)}, got {policy!r}")
    if not security:
        raise ConfigError(f"{where}.security: at least one policy")
    certificate = _file(_take(data, "certificate", where, str, None), f"{where}.certificate")
    private_key = _file(_take(data, "private_key", where, str, None), f"{where}.private_key")
    secured = any(policy != "none" for policy in security)
    if secured and (certificate is None or private_key is None):
        raise ConfigError(f"{where}: the {', '.join(security)} policies need certificate and private_key")
    trusted_raw = _take(data, "trusted_certificates", where, list, [])
    trusted = tuple(
        path
        for index, value in enumerate(trusted_raw)
        if (path := _file(value, f"{where}.trusted_certificates[{index}]")) is not None
    )
    anonymous = _take(data, "anonymous", where, bool, True)
    if not anonymous and (not secured or not trusted):
        raise ConfigError(
            f"{where}.anonymous: false needs a signed policy in security and the clients' "
            "certificates in trusted_certificates (they are the users)"
        )
    application_uri = _take(data, "application_uri", where, str, DEFAULT_APPLICATION_URI)
    names = _camera_names(data, where, cameras)
    weak = "its security allows unencrypted or anonymous access" if "none" in security or anonymous else ""
    _insecure(data, where, parts.hostname, weak)
    _no_extra(data, where)
    return OpcUaOutput(
        endpoint,
        parts.hostname,
        parts.port,
        names,
        security,
        certificate,
        private_key,
        trusted,
        anonymous,
        application_uri,
    )


def _gpio_output(data: dict[str, Any], where: str, cameras: list[str]) -> GpioOutput:
    chip = _take(data, "chip", where, str, "/dev/gpiochip0")
    lines = dict(_take(data, "lines", where, dict, {}))
    if not lines:
        raise ConfigError(f"{where}.lines: required, e.g. {{ng: 17, ok: 18}}")
    for role, offset in lines.items():
        if role not in GPIO_OUTPUT_LINES:
            raise ConfigError(f"{where}.lines: roles are {', '.join(GPIO_OUTPUT_LINES)}, got {role!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ConfigError(f"{where}.lines.{role}: a line offset (0 or more), got {offset!r}")
    if len(set(lines.values())) != len(lines):
        raise ConfigError(f"{where}.lines: one line per role, got {lines}")
    pulse_ms = _take(data, "pulse_ms", where, (int, float), 200)
    _positive(pulse_ms, f"{where}.pulse_ms")
    rule = _take(data, "rule", where, str, "all")
    if rule not in GPIO_RULES:
        raise ConfigError(f"{where}.rule: one of {', '.join(GPIO_RULES)}, got {rule!r}")
    active_low = _take(data, "active_low", where, bool, False)
    names = _camera_names(data, where, cameras)
    _no_extra(data, where)
    return GpioOutput(chip, lines, float(pulse_ms), rule, active_low, names)


def parse_outputs(raw: Any, cameras: list[str]) -> list[OutputConfig]:
    """The `outputs:` list; `cameras` are the configured camera names, in order."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"outputs: expected a list, got {type(raw).__name__}")
    outputs: list[OutputConfig] = []
    for index, item in enumerate(raw):
        where = f"outputs[{index}]"
        data = dict(_mapping(item, where))
        kind = _take(data, "type", where, str, None)
        if kind == "opcua":
            outputs.append(_opcua(data, where, cameras))
        elif kind == "modbus":
            host, port = _address(_take(data, "address", where, str, "127.0.0.1:5020"), f"{where}.address")
            names = _camera_names(data, where, cameras)
            _insecure(data, where, host, "Modbus TCP has no authentication")
            _no_extra(data, where)
            if len(cameras) > MAX_MODBUS_CAMERAS:
                raise ConfigError(f"{where}: the Modbus map holds {MAX_MODBUS_CAMERAS} cameras at most")
            outputs.append(ModbusOutput(host, port, names))
        elif kind == "gpio":
            outputs.append(_gpio_output(data, where, cameras))
        else:
            raise ConfigError(f"{where}.type: one of {', '.join(OUTPUT_TYPES)}, got {kind!r}")
    endpoints = [(o.host, o.port) for o in outputs if not isinstance(o, GpioOutput)]
    for endpoint in endpoints:
        if endpoints.count(endpoint) > 1:
            raise ConfigError(f"outputs: {endpoint[0]}:{endpoint[1]} is used twice")
    return outputs


def parse_trigger(raw: dict[str, Any], where: str) -> TriggerConfig:
    """`cameras[].trigger`; whether its protocol has a server is checked by `check_triggers`."""
    data = dict(raw)
    kind = _take(data, "type", where, str, None)
    if kind not in TRIGGER_TYPES:
        raise ConfigError(f"{where}.type: one of {', '.join(TRIGGER_TYPES)}, got {kind!r}")
    timeout = _take(data, "timeout", where, (int, float), DEFAULT_TRIGGER_TIMEOUT_S)
    _positive(timeout, f"{where}.timeout")
    models = _take(data, "models", where, list, [])
    for index, model in enumerate(models):
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}.models[{index}]: a model component name, got {model!r}")
    settings: dict[str, Any] = {}
    if kind == "gpio":
        settings["chip"] = _take(data, "chip", where, str, "/dev/gpiochip0")
        line = _take(data, "line", where, int, None)
        if line is None or line < 0:
            raise ConfigError(f"{where}.line: required, the input's line offset (0 or more)")
        settings["line"] = line
        settings["edge"] = _take(data, "edge", where, str, "rising")
        if settings["edge"] not in EDGES:
            raise ConfigError(f"{where}.edge: one of {', '.join(EDGES)}, got {settings['edge']!r}")
        debounce = _take(data, "debounce_ms", where, (int, float), 10)
        if debounce < 0:
            raise ConfigError(f"{where}.debounce_ms: 0 or more, got {debounce}")
        settings["debounce_ms"] = float(debounce)
        settings["bias"] = _take(data, "bias", where, str, "as-is")
        if settings["bias"] not in BIASES:
            raise ConfigError(f"{where}.bias: one of {', '.join(BIASES)}, got {settings['bias']!r}")
        settings["active_low"] = _take(data, "active_low", where, bool, False)
    _no_extra(data, where)
    return TriggerConfig(kind, float(timeout), tuple(models), **settings)


def check_triggers(cameras: list[tuple[str, TriggerConfig | None]], outputs: list[OutputConfig]) -> None:
    """A camera triggered over OPC UA or Modbus needs that server, serving that camera."""
    for index, (name, trigger) in enumerate(cameras):
        if trigger is None or trigger.type == "gpio":
            continue
        if not any(
            output.type == trigger.type and (output.cameras is None or name in output.cameras)
            for output in outputs
        ):
            raise ConfigError(
                f"cameras[{index}] ({name}).trigger.type: {trigger.type} needs an output of type "
                f"{trigger.type} serving this camera in outputs"
            )
