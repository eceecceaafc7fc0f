"""Agent settings: file, environment and flags, in that order of precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from lookout_edge import DEFAULT_SOCKET
from lookout_edge.agent.config import ConfigError, load_config


def test_defaults_match_the_guides_socket() -> None:
    config = load_config(environ={})
    assert config.socket == DEFAULT_SOCKET == "unix:///tmp/aws.iot.lookoutvision.EdgeAgent.sock"
    assert config.socket_path() == Path("/tmp/aws.iot.lookoutvision.EdgeAgent.sock")
    assert config.socket_mode == 0o660


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    settings = tmp_path / "agent.yaml"
    settings.write_text(
        "socket: unix:///tmp/from-file.sock\nqueue_size: 3\nworkers: 5\nsocket_mode: '0600'\n"
        "start_models: [a, b]\nmodels_dir: /srv/models\n"
    )
    environ = {"LOOKOUT_EDGE_QUEUE_SIZE": "4", "LOOKOUT_EDGE_WORKERS": "6", "LOOKOUT_EDGE_UNRELATED": "x"}
    config = load_config(settings, {"workers": 7}, environ)
    assert config.socket == "unix:///tmp/from-file.sock"
    assert config.queue_size == 4
    assert config.workers == 7
    assert config.socket_mode == 0o600
    assert config.start_models == ["a", "b"]
    assert config.models_dir == Path("/srv/models")
    from_env = load_config(
        environ={"LOOKOUT_EDGE_CONFIG": str(settings), "LOOKOUT_EDGE_START_MODELS": "x, y"}
    )
    assert from_env.start_models == ["x", "y"] and from_env.queue_size == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("queue_size: many\n", "setting 'queue_size' has an unusable value 'many'"),
        ("queu_size: 3\n", "unknown setting 'queu_size'"),
        ("socket: tcp://1.2.3.4:5\n", "must be a unix: address"),
        ("- a\n- b\n", "must hold a mapping"),
        ("tcp_address: 0.0.0.0:8443\n", "needs tls_cert and tls_key"),
        ("workers: true\n", "setting 'workers' has an unusable value True"),
        ("a: [\n", "is not valid YAML"),
    ],
)
def test_bad_settings_are_named(tmp_path: Path, content: str, message: str) -> None:
    settings = tmp_path / "agent.yaml"
    settings.write_text(content)
    with pytest.raises(ConfigError, match=None) as caught:
        load_config(settings, environ={})
    assert message in str(caught.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.yaml", environ={})


def test_large_buffers_are_recycled_on_glibc() -> None:
    import platform

    from lookout_edge.agent.malloc import tune_malloc

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert tune_malloc() is True
