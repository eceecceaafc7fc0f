"""The Greengrass IPC sink: awsiotsdk's real client against an in-test event-stream RPC server.

The nucleus is the one boundary that cannot exist here; tests/camera/eventstream_server.py
speaks its wire protocol (see its docstring).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.camera.conftest import agent_and_folder, folder_camera_config, wait_for
from tests.camera.eventstream_server import IpcServer
from tests.conftest import HEIGHT, make_image, short_tmpdir

TOKEN = "svcuid-token-for-the-test"


def test_events_reach_local_pubsub_and_iot_core_through_real_ipc_client(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path, monkeypatch
) -> None:
    socket_dir = short_tmpdir()
    server = IpcServer(socket_dir / "ipc.sock", TOKEN)
    monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", str(server.path))
    monkeypatch.setenv("SVCUID", TOKEN)
    agent, folder = agent_and_folder(agent_process, tmp_path)
    for index in range(4):
        Image.fromarray(np.asarray(make_image(red=HEIGHT if index == 2 else 0))).save(folder / f"{index}.png")
    try:
        sink_settings = {
            "type": "greengrass",
            "topic": "lookout/{camera}/events",
            "iot_core_topic": "factory/{camera}/{model}",
        }
        daemon = camera_daemon(folder_camera_config(agent.address, "cell7", folder, [sink_settings]))
        wait_for(lambda: len(server.requests()) >= 8, 30, "8 IPC publishes")
        assert daemon.stop() == 0
    finally:
        server.close()
    assert server.connects and all(server.connects)
    requests = server.requests()
    local = [r for op, r in requests if op == "aws.greengrass#PublishToTopic"]
    cloud = [r for op, r in requests if op == "aws.greengrass#PublishToIoTCore"]
    assert len(local) == len(cloud) == 4
    assert {r["topic"] for r in local} == {"lookout/cell7/events"}
    events = [r["publishMessage"]["jsonMessage"]["message"] for r in local]
    assert [Path(e["source_file"]).name for e in events] == ["0.png", "1.png", "2.png", "3.png"]
    assert [e["is_anomalous"] for e in events] == [False, False, True, False]
    assert {r["topicName"] for r in cloud} == {"factory/cell7/seg"}
    assert {r["qos"] for r in cloud} == {"1"}
    assert [json.loads(base64.b64decode(r["payload"])) for r in cloud] == events
