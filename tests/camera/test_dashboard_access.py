"""The dashboard's access rules, its metrics against the events written, and capture of the
original frames, with the daemon as a process."""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import numpy as np
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from lookout_edge.client.camera.config import ConfigError, DashboardConfig, parse_config
from lookout_edge.client.camera.dashboard.api import Api, ModelStates
from lookout_edge.client.camera.dashboard.feed import Feed
from lookout_edge.client.camera.dashboard.metrics import Metrics
from lookout_edge.client.camera.dashboard.review import ReviewStore
from lookout_edge.client.camera.dashboard.server import Dashboard
from tests.camera.conftest import (
    agent_and_folder,
    folder_camera_config,
    free_port,
    http,
    read_events,
    save_image,
    wait_for,
)
from tests.conftest import HEIGHT, lookout_edge_command, make_image

TOKEN = "s3cret-token"


def config_with(dashboard: dict[str, object], tmp_path: Path) -> dict[str, object]:
    config = folder_camera_config(
        "unix:///nowhere", "line1", tmp_path, [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}]
    )
    config["dashboard"] = dashboard
    return config


def test_a_non_loopback_address_needs_a_token_or_an_explicit_opt_out(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=re.escape("dashboard.address: 0.0.0.0:8080 is not a loopback address")
    ):
        parse_config(config_with({"address": "0.0.0.0:8080"}, tmp_path))
    with pytest.raises(ConfigError, match="not a loopback"):
        parse_config(config_with({"address": "camera-host.example:8080"}, tmp_path))
    assert parse_config(config_with({}, tmp_path)).dashboard.host == "127.0.0.1"  # type: ignore[union-attr]
    assert parse_config(config_with({"address": "[::1]:80"}, tmp_path)).dashboard.token is None  # type: ignore[union-attr]
    opened = parse_config(config_with({"address": "0.0.0.0:8080", "insecure": True}, tmp_path)).dashboard
    assert opened is not None and opened.insecure
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    guarded = parse_config(
        config_with({"address": "0.0.0.0:8080", "token_file": str(tmp_path / "token")}, tmp_path)
    )
    assert guarded.dashboard is not None and guarded.dashboard.token == TOKEN
    with pytest.raises(ConfigError, match=re.escape("dashboard.tls: give both cert and key")):
        parse_config(config_with({"tls": {"cert": "c.pem"}}, tmp_path))

    # The command refuses to start, with the message.
    config_path = tmp_path / "camera.yaml"
    config_path.write_text(yaml.safe_dump(config_with({"address": "0.0.0.0:8080"}, tmp_path)))
    refused = subprocess.run(
        lookout_edge_command("camera", "--config", str(config_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "dashboard.address: 0.0.0.0:8080 is not a loopback address; give dashboard.token" in refused.stderr


def test_a_dashboard_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config_path = tmp_path / "camera.yaml"
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config_path.write_text(yaml.safe_dump(config_with({"address": address}, tmp_path)))
        refused = subprocess.run(
            lookout_edge_command("camera", "--config", str(config_path)),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert refused.returncode == 1, refused.stderr
    assert f"dashboard.address {address}: Address already in use" in refused.stderr
    assert "Traceback" not in refused.stderr


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_token_metrics_and_capture(tmp_path: Path, agent_process, camera_daemon) -> None:
    agent, folder = agent_and_folder(agent_process, tmp_path)
    events_path = tmp_path / "events.jsonl"
    config = folder_camera_config(
        agent.address, "line1", folder, [{"type": "jsonl", "path": str(events_path)}]
    )
    port = free_port()
    config["dashboard"] = {"address": f"0.0.0.0:{port}", "token": TOKEN}
    config["cameras"][0]["capture"] = {"anomalous": {"max_per_minute": 2}}
    state = Path(tmp_path / "state")
    daemon = camera_daemon(config)
    sources = {f"{i}-bad.png": make_image(red=HEIGHT // (2 + i)) for i in range(3)}
    sources.update({f"{i}-good.png": make_image() + np.uint8(i) for i in range(3, 5)})
    for name, pixels in sources.items():
        save_image(folder, name, pixels)
    wait_for(lambda: len(read_events(events_path)) == 5, 30, "five events")
    events = read_events(events_path)
    url = f"http://127.0.0.1:{port}"
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    basic = {"Authorization": "Basic " + base64.b64encode(f"any:{TOKEN}".encode()).decode()}

    # Without the token, or with a wrong one: 401 everywhere, and a review changes nothing.
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic " + base64.b64encode(b"u:bad").decode()},
    ):
        for path in ("/", "/api/status", "/metrics", f"/frames/{events[0]['event_id']}.jpg", "/nothing"):
            assert http(url + path, headers=headers)[0] == 401
        body = json.dumps({"label": "anomaly"}).encode()
        status, _ = http(
            f"{url}/api/events/{events[0]['event_id']}/review",
            body,
            {**headers, "Content-Type": "application/json"},
        )
        assert status == 401
    assert not (state / "review" / "review.manifest").exists()
    assert list((state / "review" / "images").iterdir()) == []
    for headers in (bearer, basic):
        assert http(url + "/", headers=headers)[0] == 200
    status, reply = http(
        f"{url}/api/events/{events[-1]['event_id']}/review", json.dumps({"label": "normal"}).encode(), bearer
    )
    assert status == 200, reply
    assert (state / "review" / "review.manifest").exists()

    # The API's events are the events the sink wrote.
    status, reply = http(f"{url}/api/events?camera=line1&verdict=anomaly&limit=10", headers=bearer)
    assert status == 200
    assert {e["event_id"] for e in json.loads(reply)["events"]} == {
        e["event_id"] for e in events if e["is_anomalous"]
    }
    assert http(f"{url}/api/events?limit=0", headers=bearer)[0] == 400
    assert http(f"{url}/api/events?camera=nope", headers=bearer)[0] == 404

    # Metrics: the frame and inference counters are the events written.
    anomalous = sum(e["is_anomalous"] for e in events)
    assert anomalous == 3

    def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return metric_values(http(url + "/metrics", headers=bearer)[1].decode())

    values = wait_for(
        lambda: (
            (v := scraped())[("lookout_edge_camera_latency_seconds_count", (("camera", "line1"),))] == 5 and v
        ),
        10,
        "the metrics",
    )
    camera = (("camera", "line1"),)
    assert values[("lookout_edge_camera_frames_total", camera)] == len(events)
    assert (
        values[("lookout_edge_camera_inferences_total", (("camera", "line1"), ("verdict", "anomaly")))]
        == anomalous
    )
    assert (
        values[("lookout_edge_camera_inferences_total", (("camera", "line1"), ("verdict", "normal")))]
        == 5 - anomalous
    )
    assert values[("lookout_edge_camera_errors_total", camera)] == 0
    assert values[("lookout_edge_camera_sink_delivered_total", (("sink", f"jsonl:{events_path}"),))] == 5
    assert values[("lookout_edge_camera_captured_total", camera)] == 2

    # Capture: two of the three anomalous frames (the cap), as they were, not the overlays.
    captured = sorted((state / "capture" / "line1").glob("*.png"))
    assert len(captured) == 2 and all("-anomalous-" in p.name for p in captured)
    by_event = {e["event_id"]: Path(e["source_file"]).name for e in events}
    for path in captured:
        source = by_event[path.stem.rsplit("-", 1)[1]]
        assert np.array_equal(np.asarray(Image.open(path)), sources[source])  # an overlay would differ
    assert daemon.stop() == 0
    assert json.loads(daemon.status_path.read_text())["capture"]["line1"]["rate_limited"] == 1


def test_tls_with_a_token(certificates: Path, tmp_path: Path) -> None:
    def status() -> dict[str, Any]:
        return {"cameras": {}, "sinks": {}}

    config = DashboardConfig(
        "127.0.0.1", 0, TOKEN, tls_cert=certificates / "server.pem", tls_key=certificates / "server.key"
    )
    feed = Feed([], config)
    api = Api(feed, ReviewStore(tmp_path / "review"), status, ModelStates("unix:///nowhere"))
    dashboard = Dashboard(config, feed, api, Metrics(status))
    dashboard.start()
    context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
    url = f"https://127.0.0.1:{dashboard.port}/metrics"
    try:
        with urlopen(Request(url, headers={"Authorization": f"Bearer {TOKEN}"}), context=context) as reply:
            assert reply.status == 200
        with pytest.raises(HTTPError) as refused:
            urlopen(url, context=context)
        assert refused.value.code == 401
        with pytest.raises((URLError, ConnectionError)):  # plain HTTP is not served
            urlopen(url.replace("https", "http"), timeout=5)
    finally:
        dashboard.stop()


def test_without_a_token_only_requests_naming_the_dashboards_host_are_served(tmp_path: Path) -> None:
    """DNS rebinding: a page at attacker.example whose name resolves to 127.0.0.1 reaches a
    loopback dashboard from the operator's browser, with Host: attacker.example."""

    def status() -> dict[str, Any]:
        return {"cameras": {}, "sinks": {}}

    config = DashboardConfig("127.0.0.1", 0)
    feed = Feed([], config)
    api = Api(feed, ReviewStore(tmp_path / "review"), status, ModelStates("unix:///nowhere"))
    dashboard = Dashboard(config, feed, api, Metrics(status))
    dashboard.start()
    url = f"http://127.0.0.1:{dashboard.port}"
    try:
        assert http(url + "/api/status")[0] == 200
        assert http(url + "/api/status", headers={"Host": f"localhost:{dashboard.port}"})[0] == 200
        for host in ("attacker.example", f"attacker.example:{dashboard.port}", "127.0.0.1.attacker.example"):
            assert http(url + "/api/status", headers={"Host": host})[0] == 403, host
        review = url + "/api/events/" + "0" * 32 + "/review"
        assert http(review, b'{"label": "anomaly"}', {"Host": "attacker.example"})[0] == 403
        assert not [path for path in (tmp_path / "review").rglob("*") if path.is_file()]
    finally:
        dashboard.stop()
