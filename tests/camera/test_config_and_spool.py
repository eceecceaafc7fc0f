"""Configuration errors name the key; the spool and the JSONL sink keep order and bounds on disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lookout_edge.client.camera.config import ConfigError, parse_config
from lookout_edge.client.camera.processed import FileKey, ProcessedFiles
from lookout_edge.client.camera.sinks import JsonlSink
from lookout_edge.client.camera.spool import Spool
from tests.conftest import lookout_edge_command


def config(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "cameras": [{"name": "line1", "source": "rtsp://10.0.0.5/stream1", "model": "m"}],
        "sinks": [{"type": "jsonl", "path": "/tmp/events.jsonl"}],
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cameras": []}, "cameras: required"),
        ({"cameras": [{"name": "a b", "source": "x", "model": "m"}]}, "cameras[0].name"),
        ({"cameras": [{"name": "a", "model": "m"}]}, "cameras[0] (a).source: required"),
        ({"cameras": [{"name": "a", "source": "rtsp://h/s", "model": "m", "max_fps": 0}]}, ".max_fps: must"),
        ({"cameras": [{"name": "a", "source": "rtsp://h/s", "model": "m", "fps": 2}]}, "unknown key(s) fps"),
        ({"cameras": [{"name": "a", "source": "rtsp://h/s", "model": "m", "width": 64}]}, "both width"),
        ({"cameras": [{"name": "a", "source": "/nonexistent.mp4", "model": "m"}]}, "cameras[0] (a).source"),
        (
            {"cameras": [{"name": "a", "source": "rtsp://h/s", "model": "m", "crop": {"x": 0}}]},
            "cameras[0] (a).crop",
        ),
        ({"sinks": [{"type": "kafka"}]}, "sinks[0].type"),
        ({"sinks": [{"type": "mqtt"}]}, "sinks[0].host"),
        ({"sinks": [{"type": "greengrass"}]}, "sinks[0]: give topic"),
        ({"sinks": [{"type": "greengrass", "topic": "t", "qos": 1}]}, "sinks[0].qos"),
        ({"agent": {"shm_mode": "0400"}}, "agent.shm_mode"),
        ({"agent": {"models_dir": "/nonexistent"}}, "cameras[0] (line1).model: no package"),
        ({"status": {"interval": "often"}}, "status.interval"),
        (
            {"cameras": [{"name": "a", "source": "/tmp", "model": "m", "max_pixels": 200_000_000}]},
            "cameras[0] (a).max_pixels: from 1 to 178956970",
        ),
        ({"images": {"directory": "/tmp/i", "min_free_mb": -1}}, "images.min_free_mb: must be 0 or more"),
    ],
)
def test_bad_configuration_names_the_key(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config(config(**overrides))
    assert message in str(raised.value)


def test_model_size_comes_from_the_package(models_dir: Path) -> None:
    parsed = parse_config(
        config(
            agent={"models_dir": str(models_dir)},
            cameras=[{"name": "a", "source": "rtsp://h/s", "model": "seg"}],
        )
    )
    assert (parsed.cameras[0].width, parsed.cameras[0].height) == (128, 96)


def test_cli_reports_a_bad_configuration(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "camera.yaml"
    path.write_text("cameras: []\nsinks: []\n")
    result = subprocess.run(
        lookout_edge_command("camera", "--config", str(path)), capture_output=True, text=True
    )
    assert result.returncode == 2 and "cameras: required" in result.stderr


def test_spool_keeps_order_across_reopen_and_drops_the_oldest_when_full(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_events=3)
    for index in range(5):
        spool.append(json.dumps({"n": index}).encode())
    assert spool.dropped == 2 and len(spool) == 3
    head = spool.head()
    assert head is not None
    spool.remove(head[0])
    reopened = Spool(tmp_path / "spool", max_events=3)
    reopened.append(b'{"n": 5}')
    seen = []
    while (head := reopened.head()) is not None:
        seen.append(json.loads(head[1])["n"])
        reopened.remove(head[0])
    assert seen == [3, 4, 5]


def test_jsonl_sink_rotates_and_keeps_the_backups(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink({"path": str(path), "max_bytes": 200, "backups": 2})
    for index in range(30):
        sink.submit({"n": index, "pad": "x" * 20})
    sink.close()
    files = [path, path.with_name("events.jsonl.1"), path.with_name("events.jsonl.2")]
    assert all(f.exists() for f in files) and not path.with_name("events.jsonl.3").exists()
    lines = [json.loads(line)["n"] for f in reversed(files) for line in f.read_text().splitlines()]
    assert lines == list(range(30 - len(lines), 30))
    assert all(f.stat().st_size <= 200 for f in files)


def test_processed_files_survive_a_reopen_and_forget_files_that_left(tmp_path: Path) -> None:
    journal = tmp_path / "state" / "bench.processed"
    kept, gone = FileKey("a.png", 10, 1), FileKey("b.png", 20, 2)
    processed = ProcessedFiles(journal, set())
    processed.add(kept)
    processed.add(gone)
    processed.close()
    reopened = ProcessedFiles(journal, {"a.png", "c.png"})
    assert kept in reopened and gone not in reopened
    assert FileKey("a.png", 11, 1) not in reopened  # replaced under the same name: a new image
    assert len(journal.read_text().splitlines()) == 1
    reopened.close()
