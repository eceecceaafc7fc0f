"""Agent settings, from defaults, a YAML file, LOOKOUT_EDGE_* variables and flags (in that order)."""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lookout_edge import DEFAULT_SOCKET

from .backends.base import ACCELERATORS, DEFAULT_ENGINE_CACHE_DIR

ENV_PREFIX = "LOOKOUT_EDGE_"
DEFAULT_MODELS_DIR = "/var/lib/lookout-edge/models"
PRECISIONS = ("auto", "fp16", "fp32")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it and says what is expected."""


@dataclass
class AgentConfig:
    socket: str = DEFAULT_SOCKET
    models_dir: Path = Path(DEFAULT_MODELS_DIR)
    socket_mode: int = 0o660
    socket_group: str | None = None
    queue_size: int = 8
    workers: int = 16
    max_concurrent_runs: int | None = None  # per model; None: one per CPU core the agent may use
    start_models: list[str] = field(default_factory=list)
    log_level: str = "INFO"
    memory_limit_mb: int | None = None
    rescan_interval: float = 2.0
    shutdown_grace: float = 10.0
    tcp_address: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Serve Prometheus metrics at http://HOST:PORT/metrics (docs/agent.md#metrics-and-health).
    metrics_address: str | None = None
    # Serve as this user ("name" or "name:group") once the socket exists (docs/agent.md#security).
    user: str | None = None
    # Accelerators (docs/accelerators.md).
    accelerator: str = "auto"
    engine_cache_dir: Path = Path(DEFAULT_ENGINE_CACHE_DIR)
    tensorrt_precision: str = "auto"

    def socket_path(self) -> Path:
        """The filesystem path of a `unix:` socket address."""
        return socket_path(self.socket)


@dataclass(frozen=True)
class Account:
    """The user (and group) of the `user` setting."""

    name: str
    uid: int
    gid: int


def resolve_account(spec: str) -> Account:
    """The account of a `user` setting, "NAME" or "NAME:GROUP"."""
    name, _, group = spec.partition(":")
    try:
        entry = pwd.getpwnam(name)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError:
        raise ConfigError(f"user {spec!r}: no such user or group on this device") from None
    if os.geteuid() not in (0, entry.pw_uid):
        raise ConfigError(
            f"user {spec!r}: only root can switch to another user; start the agent as root, or "
            "drop the user setting"
        )
    return Account(name, entry.pw_uid, gid)


def socket_path(address: str) -> Path:
    if address.startswith("unix://"):
        path = address[len("unix://") :]
    elif address.startswith("unix:"):
        path = address[len("unix:") :]
    else:
        raise ConfigError(f"socket {address!r} must be a unix: address, e.g. {DEFAULT_SOCKET}")
    if not path:
        raise ConfigError(f"socket {address!r} names no file")
    return Path(path)


def metrics_endpoint(address: str) -> tuple[str, int]:
    """The (host, port) of a `metrics_address`: HOST:PORT, or [ADDRESS]:PORT for IPv6."""
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(
            f"metrics_address {address!r} must be HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:9464"
        )
    return host, int(port)


def _convert(name: str, kind: Any, value: Any) -> Any:
    """Convert a raw value (a YAML scalar or an environment string) to the field's type."""
    if value is None:
        return None
    text_kind = str(kind)
    try:
        if "Path" in text_kind:
            return Path(str(value))
        if text_kind.startswith("list"):
            if isinstance(value, str):
                return [item.strip() for item in value.split(",") if item.strip()]
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                return value
            raise ValueError("expected a list of names")
        if name == "socket_mode":
            return int(value, 8) if isinstance(value, str) else int(value)
        if text_kind.startswith("int"):
            if isinstance(value, bool):
                raise ValueError("expected a whole number")
            return int(value)
        if text_kind.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting '{name}' has an unusable value {value!r}: {exc}") from None


_FIELDS = {item.name: item for item in dataclasses.fields(AgentConfig)}


def _apply(config: AgentConfig, values: Mapping[str, Any], origin: str) -> None:
    for key, value in values.items():
        if key not in _FIELDS:
            known = ", ".join(sorted(_FIELDS))
            raise ConfigError(f"unknown setting '{key}' in {origin}; known settings: {known}")
        setattr(config, key, _convert(key, _FIELDS[key].type, value))


def load_config(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Build the settings: defaults, then the file, then LOOKOUT_EDGE_*, then `overrides` (flags)."""
    environ = os.environ if environ is None else environ
    config = AgentConfig()
    config_file = config_file or (
        Path(environ[ENV_PREFIX + "CONFIG"]) if ENV_PREFIX + "CONFIG" in environ else None
    )
    if config_file is not None:
        try:
            data = yaml.safe_load(config_file.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {config_file} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {config_file} must hold a mapping of settings")
        _apply(config, data, str(config_file))
    # Other lookout-edge commands read LOOKOUT_EDGE_* variables of their own: only the
    # agent's settings are taken from the environment here.
    from_env = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in _FIELDS
    }
    _apply(config, from_env, "the environment")
    _apply(config, {key: value for key, value in (overrides or {}).items() if value is not None}, "the flags")
    _validate(config)
    return config


def _validate(config: AgentConfig) -> None:
    socket_path(config.socket)
    if config.queue_size < 1:
        raise ConfigError("queue_size must be at least 1")
    if config.workers < 1:
        raise ConfigError("workers must be at least 1")
    if config.max_concurrent_runs is not None and config.max_concurrent_runs < 1:
        raise ConfigError("max_concurrent_runs must be at least 1")
    if not 0 <= config.socket_mode <= 0o777:
        raise ConfigError(f"socket_mode {oct(config.socket_mode)} is not a file mode")
    if config.memory_limit_mb is not None and config.memory_limit_mb < 1:
        raise ConfigError("memory_limit_mb must be a positive number of MiB")
    if config.tcp_address and not (config.tls_cert and config.tls_key):
        raise ConfigError("tcp_address needs tls_cert and tls_key: the TCP listener only serves TLS")
    if config.accelerator not in ACCELERATORS:
        raise ConfigError(f"accelerator {config.accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    if config.tensorrt_precision not in PRECISIONS:
        raise ConfigError(
            f"tensorrt_precision {config.tensorrt_precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    if config.user is not None:
        resolve_account(config.user)
    if config.metrics_address:
        metrics_endpoint(config.metrics_address)
    if config.tls_client_ca and not config.tcp_address:
        raise ConfigError("tls_client_ca is set but tcp_address is not")
