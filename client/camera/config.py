"""The camera daemon's YAML configuration, checked up front: every error names the key at fault.

Every key is documented in docs/camera.md.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from PIL import Image

from lookout_edge import DEFAULT_SOCKET
from lookout_edge.package import find_package

if TYPE_CHECKING:  # factory_io.settings imports this module's helpers; it is imported where used
    from .factory_io.settings import OutputConfig, TriggerConfig

SINK_TYPES = ("jsonl", "mqtt", "greengrass")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Greengrass IoT Core QoS, by the names of awsiot.greengrasscoreipc.model.QOS.
QOS_NAMES = ("AT_MOST_ONCE", "AT_LEAST_ONCE")
DEFAULT_QOS = "AT_LEAST_ONCE"
DEFAULT_MAX_PIXELS = 50_000_000
# Pillow refuses larger images itself (DecompressionBombError) before our own check could run.
MAX_PIXELS_CEILING = 2 * int(Image.MAX_IMAGE_PIXELS or 89_478_485)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and what is wrong."""


@dataclass(frozen=True)
class Crop:
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class CaptureRule:
    """Frames a rule saves: at most `max_per_minute` of them (a sliding minute)."""

    max_per_minute: float
    band: float = 0.0  # near_threshold: |anomaly_score - threshold| <= band
    fraction: float = 0.0  # random: the share of frames taken


@dataclass(frozen=True)
class CaptureConfig:
    """Original frames kept for retraining under `<state_dir>/capture/<camera>/`."""

    anomalous: CaptureRule | None = None
    near_threshold: CaptureRule | None = None
    random: CaptureRule | None = None
    max_bytes: int = 1 << 30
    max_age_s: float = 30 * 86400.0


@dataclass(frozen=True)
class CameraConfig:
    name: str
    source: str
    model: str
    max_fps: float | None = None  # inferences per second; None: as fast as the agent answers
    crop: Crop | None = None
    width: int | None = None  # the model's training size; None: from agent.models_dir or as decoded
    height: int | None = None
    open_timeout: float = 10.0
    read_timeout: float = 5.0
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0
    loop: bool = False  # video files: start again at the end
    poll_interval: float = 0.5  # folders: how often to look for new images
    max_pixels: int = (
        DEFAULT_MAX_PIXELS  # larger images are refused before decoding (folders), frames skipped
    )
    options: dict[str, str] = field(default_factory=dict)  # demuxer options passed to FFmpeg
    capture: CaptureConfig | None = None
    trigger: TriggerConfig | None = None  # inspect on a PLC's trigger (docs/factory-io.md)

    @property
    def kind(self) -> str:
        """`live` (RTSP, HTTP, V4L2), `file` or `folder`."""
        if self.source.startswith(("rtsp://", "rtsps://", "http://", "https://", "/dev/video")):
            return "live"
        return "folder" if Path(self.source).is_dir() else "file"


@dataclass(frozen=True)
class ImagesConfig:
    """Anomalous frames saved with their mask overlaid, kept under all three limits."""

    directory: Path | None = None
    max_count: int = 1000
    max_bytes: int = 1 << 30
    max_age_s: float = 7 * 86400.0
    min_free_bytes: int = 100 << 20  # below this much free space, frames are not saved


@dataclass(frozen=True)
class SinkConfig:
    type: str
    settings: dict[str, Any]
    spool_dir: Path | None
    spool_max_events: int = 100_000


@dataclass(frozen=True)
class DashboardConfig:
    host: str
    port: int
    token: str | None = None  # required off loopback unless `insecure`
    insecure: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    review_band: float = 0.1  # frames this close to the threshold join the review queue
    review_random: float = 0.02  # and this share of the others
    review_size: int = 20  # review items held per camera (their frames stay in memory)


@dataclass(frozen=True)
class DaemonConfig:
    agent_socket: str
    models_dir: Path | None
    cameras: list[CameraConfig]
    sinks: list[SinkConfig]
    images: ImagesConfig
    state_dir: Path
    status_file: Path | None
    status_interval: float = 10.0
    shm_mode: int = 0o660
    agent_timeout: float = 10.0
    start_models: bool = True
    dashboard: DashboardConfig | None = None
    outputs: list[OutputConfig] = field(default_factory=list)  # OPC UA, Modbus, GPIO (docs/factory-io.md)


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    return value


def _take(data: dict[str, Any], key: str, where: str, kinds: type | tuple[type, ...], default: Any) -> Any:
    value = data.pop(key, default)
    if value is default:
        return value
    if isinstance(value, bool) and kinds in (int, float, (int, float)):
        raise ConfigError(f"{where}.{key}: expected a number, got {value!r}")
    if not isinstance(value, kinds):
        names = kinds.__name__ if isinstance(kinds, type) else " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where}.{key}: expected {names}, got {value!r}")
    return value


def _positive(value: float | None, key: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value}")


def _no_extra(data: dict[str, Any], where: str) -> None:
    if data:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, data)))}")


def _camera(raw: Any, index: int, models_dir: Path | None) -> CameraConfig:
    where = f"cameras[{index}]"
    data = dict(_mapping(raw, where))
    name = _take(data, "name", where, str, None)
    if name is None or not _NAME.match(name):
        raise ConfigError(
            f"{where}.name: required; letters, digits, '_', '.', '-' (64 at most), got {name!r}"
        )
    where = f"cameras[{index}] ({name})"
    source = _take(data, "source", where, str, None)
    model = _take(data, "model", where, str, None)
    for key, value in (("source", source), ("model", model)):
        if not value:
            raise ConfigError(f"{where}.{key}: required")
    max_fps = _take(data, "max_fps", where, (int, float), None)
    interval = _take(data, "interval", where, (int, float), None)
    if max_fps is not None and interval is not None:
        raise ConfigError(f"{where}: give max_fps or interval, not both")
    _positive(max_fps, f"{where}.max_fps")
    _positive(interval, f"{where}.interval")
    if interval is not None:
        max_fps = 1.0 / interval
    crop = None
    crop_raw = _take(data, "crop", where, dict, None)
    if crop_raw is not None:
        crop_data = dict(crop_raw)
        values = [_take(crop_data, k, f"{where}.crop", int, None) for k in ("x", "y", "width", "height")]
        _no_extra(crop_data, f"{where}.crop")
        if any(v is None for v in values) or values[0] < 0 or values[1] < 0 or values[2] < 1 or values[3] < 1:
            raise ConfigError(f"{where}.crop: needs x, y >= 0 and width, height >= 1, got {crop_raw}")
        crop = Crop(*values)
    width = _take(data, "width", where, int, None)
    height = _take(data, "height", where, int, None)
    if (width is None) != (height is None):
        raise ConfigError(f"{where}: give both width and height, or neither")
    if width is None and models_dir is not None:
        width, height = _model_size(models_dir, model, where)
    timings = {}
    for key in ("open_timeout", "read_timeout", "reconnect_initial", "reconnect_max", "poll_interval"):
        value = _take(data, key, where, (int, float), None)
        _positive(value, f"{where}.{key}")
        if value is not None:
            timings[key] = float(value)
    loop = _take(data, "loop", where, bool, False)
    options = _take(data, "options", where, dict, {})
    max_pixels = _take(data, "max_pixels", where, int, DEFAULT_MAX_PIXELS)
    if not 0 < max_pixels <= MAX_PIXELS_CEILING:
        raise ConfigError(f"{where}.max_pixels: from 1 to {MAX_PIXELS_CEILING}, got {max_pixels}")
    capture_raw = _take(data, "capture", where, dict, None)
    capture = _capture(capture_raw, f"{where}.capture") if capture_raw is not None else None
    trigger_raw = _take(data, "trigger", where, dict, None)
    trigger = None
    if trigger_raw is not None:
        from .factory_io.settings import parse_trigger

        trigger = parse_trigger(trigger_raw, f"{where}.trigger")
    _no_extra(data, where)
    camera = CameraConfig(
        name,
        source,
        model,
        max_fps,
        crop,
        width,
        height,
        loop=loop,
        options=dict(options),
        max_pixels=max_pixels,
        capture=capture,
        trigger=trigger,
        **timings,
    )
    if camera.kind == "file" and not Path(source).is_file():
        raise ConfigError(f"{where}.source: {source} is not a stream URL, a device, a file or a directory")
    return camera


def _fraction(value: float, key: str) -> float:
    if not 0 <= value <= 1:
        raise ConfigError(f"{key}: from 0 to 1, got {value}")
    return float(value)


def _capture_rule(raw: Any, where: str, extra: str | None) -> CaptureRule:
    data = dict(_mapping(raw, where))
    rate = _take(data, "max_per_minute", where, (int, float), 10)
    _positive(rate, f"{where}.max_per_minute")
    rule = CaptureRule(float(rate))
    if extra == "band":
        band = _take(data, "band", where, (int, float), None)
        if band is None or band < 0:
            raise ConfigError(f"{where}.band: required, a score distance of 0 or more")
        rule = CaptureRule(float(rate), band=float(band))
    elif extra == "fraction":
        fraction = _take(data, "fraction", where, (int, float), None)
        if fraction is None:
            raise ConfigError(f"{where}.fraction: required, the share of frames to take (0 to 1)")
        rule = CaptureRule(float(rate), fraction=_fraction(fraction, f"{where}.fraction"))
    _no_extra(data, where)
    return rule


def _capture(raw: dict[str, Any], where: str) -> CaptureConfig:
    data = dict(raw)
    rules = {}
    for key, extra in (("anomalous", None), ("near_threshold", "band"), ("random", "fraction")):
        value = data.pop(key, None)
        if value is not None and value is not False:
            rules[key] = _capture_rule({} if value is True else value, f"{where}.{key}", extra)
    max_mb = _take(data, "max_mb", where, (int, float), 1024)
    max_age_days = _take(data, "max_age_days", where, (int, float), 30)
    _positive(max_mb, f"{where}.max_mb")
    _positive(max_age_days, f"{where}.max_age_days")
    _no_extra(data, where)
    if not rules:
        raise ConfigError(f"{where}: give at least one of anomalous, near_threshold, random")
    return CaptureConfig(**rules, max_bytes=int(max_mb * (1 << 20)), max_age_s=float(max_age_days) * 86400.0)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _dashboard(raw: Any) -> DashboardConfig:
    where = "dashboard"
    data = dict(_mapping(raw, where))
    address = _take(data, "address", where, str, "127.0.0.1:8080")
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"dashboard.address: HOST:PORT, e.g. 127.0.0.1:8080, got {address!r}")
    token = _take(data, "token", where, str, None)
    token_file = _take(data, "token_file", where, str, None)
    if token is not None and token_file is not None:
        raise ConfigError("dashboard: give token or token_file, not both")
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"dashboard.token_file: cannot read {token_file}: {exc.strerror}") from None
    if token is not None and not token:
        raise ConfigError("dashboard.token: must not be empty")
    insecure = _take(data, "insecure", where, bool, False)
    if not is_loopback(host) and token is None and not insecure:
        raise ConfigError(
            f"dashboard.address: {address} is not a loopback address; give dashboard.token (or "
            "token_file) so that only holders of the token get in, or set dashboard.insecure: true "
            "to serve it to anyone who can reach it"
        )
    tls = dict(_mapping(_take(data, "tls", where, dict, None), "dashboard.tls"))
    cert = _take(tls, "cert", "dashboard.tls", str, None)
    key = _take(tls, "key", "dashboard.tls", str, None)
    _no_extra(tls, "dashboard.tls")
    if (cert is None) != (key is None):
        raise ConfigError("dashboard.tls: give both cert and key (PEM files)")
    band = _take(data, "review_band", where, (int, float), 0.1)
    if band < 0:
        raise ConfigError(f"dashboard.review_band: 0 or more, got {band}")
    review_random = _fraction(
        _take(data, "review_random", where, (int, float), 0.02), "dashboard.review_random"
    )
    review_size = _take(data, "review_size", where, int, 20)
    _positive(review_size, "dashboard.review_size")
    _no_extra(data, where)
    return DashboardConfig(
        host,
        int(port_text),
        token,
        insecure,
        Path(cert) if cert else None,
        Path(key) if key else None,
        float(band),
        review_random,
        review_size,
    )


def _model_size(models_dir: Path, model: str, where: str) -> tuple[int, int]:
    """The training size from the model package the agent serves (it is not in DescribeModel)."""
    package = find_package(models_dir, model)
    if package is None:
        raise ConfigError(
            f"{where}.model: no package for {model!r} under agent.models_dir {models_dir}; "
            "give the camera's width and height instead"
        )
    return package.width, package.height


def _sink(raw: Any, index: int, state_dir: Path) -> SinkConfig:
    where = f"sinks[{index}]"
    data = dict(_mapping(raw, where))
    kind = _take(data, "type", where, str, None)
    if kind not in SINK_TYPES:
        raise ConfigError(f"{where}.type: one of {', '.join(SINK_TYPES)}, got {kind!r}")
    spool_dir = _take(data, "spool_dir", where, str, None)
    spool_max = _take(data, "spool_max_events", where, int, 100_000)
    _positive(spool_max, f"{where}.spool_max_events")
    if kind == "jsonl":
        if not isinstance(data.get("path"), str):
            raise ConfigError(f"{where}.path: required (the JSONL file to write)")
        return SinkConfig(kind, data, None)
    if kind == "mqtt" and not isinstance(data.get("host"), str):
        raise ConfigError(f"{where}.host: required (the MQTT broker's host name)")
    if kind == "greengrass":
        if not (data.get("topic") or data.get("iot_core_topic")):
            raise ConfigError(f"{where}: give topic (local publish/subscribe), iot_core_topic, or both")
        if data.get("qos", DEFAULT_QOS) not in QOS_NAMES:
            raise ConfigError(f"{where}.qos: {' or '.join(QOS_NAMES)}, got {data['qos']!r}")
    spool = Path(spool_dir) if spool_dir else state_dir / "spool" / f"{index}-{kind}"
    return SinkConfig(kind, data, spool, spool_max)


def parse_config(raw: Any) -> DaemonConfig:
    data = dict(_mapping(raw, "configuration"))
    agent = dict(_mapping(data.pop("agent", None), "agent"))
    socket = _take(agent, "socket", "agent", str, DEFAULT_SOCKET)
    models_dir_raw = _take(agent, "models_dir", "agent", str, None)
    agent_timeout = _take(agent, "timeout", "agent", (int, float), 10.0)
    _positive(agent_timeout, "agent.timeout")
    start_models = _take(agent, "start_models", "agent", bool, True)
    shm_mode_raw = _take(agent, "shm_mode", "agent", (str, int), "0660")
    _no_extra(agent, "agent")
    try:
        shm_mode = int(shm_mode_raw, 8) if isinstance(shm_mode_raw, str) else shm_mode_raw
    except ValueError:
        raise ConfigError(f"agent.shm_mode: an octal mode such as '0660', got {shm_mode_raw!r}") from None
    if not 0 <= shm_mode <= 0o777 or not shm_mode & 0o600 == 0o600:
        raise ConfigError(
            f"agent.shm_mode: must let the owner read and write (e.g. '0660'), got {shm_mode_raw!r}"
        )
    models_dir = Path(models_dir_raw) if models_dir_raw else None
    state_dir = Path(_take(data, "state_dir", "configuration", str, "/var/lib/lookout-edge/camera"))

    cameras_raw = data.pop("cameras", None)
    if not isinstance(cameras_raw, list) or not cameras_raw:
        raise ConfigError("cameras: required, a list of at least one camera")
    cameras = [_camera(raw, i, models_dir) for i, raw in enumerate(cameras_raw)]
    names = [c.name for c in cameras]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"cameras: the name {name!r} is used twice")

    sinks_raw = data.pop("sinks", None)
    if not isinstance(sinks_raw, list) or not sinks_raw:
        raise ConfigError("sinks: required, a list of at least one sink")
    sinks = [_sink(raw, i, state_dir) for i, raw in enumerate(sinks_raw)]

    images_data = dict(_mapping(data.pop("images", None), "images"))
    images_dir = _take(images_data, "directory", "images", str, None)
    images = ImagesConfig(
        Path(images_dir) if images_dir else None,
        _take(images_data, "max_count", "images", int, 1000),
        _take(images_data, "max_bytes", "images", int, 1 << 30),
        float(_take(images_data, "max_age_days", "images", (int, float), 7.0)) * 86400.0,
        int(_take(images_data, "min_free_mb", "images", (int, float), 100) * (1 << 20)),
    )
    if images.min_free_bytes < 0:
        raise ConfigError(f"images.min_free_mb: must be 0 or more, got {images.min_free_bytes / (1 << 20):g}")
    _no_extra(images_data, "images")

    status = dict(_mapping(data.pop("status", None), "status"))
    status_file = _take(status, "file", "status", str, None)
    status_interval = _take(status, "interval", "status", (int, float), 10.0)
    _positive(status_interval, "status.interval")
    _no_extra(status, "status")
    dashboard_raw = data.pop("dashboard", None)
    dashboard = _dashboard(dashboard_raw) if dashboard_raw is not None else None
    from .factory_io.settings import check_triggers, parse_outputs

    outputs = parse_outputs(data.pop("outputs", None), names)
    check_triggers([(c.name, c.trigger) for c in cameras], outputs)
    _no_extra(data, "configuration")
    return DaemonConfig(
        agent_socket=socket,
        models_dir=models_dir,
        cameras=cameras,
        sinks=sinks,
        images=images,
        state_dir=state_dir,
        status_file=Path(status_file) if status_file else state_dir / "status.json",
        status_interval=float(status_interval),
        shm_mode=shm_mode,
        agent_timeout=float(agent_timeout),
        start_models=start_models,
        dashboard=dashboard,
        outputs=outputs,
    )


def load_config(path: Path) -> DaemonConfig:
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(raw)
