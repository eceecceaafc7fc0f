"""The `lookout-edge` client commands against a running agent."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from .conftest import RunningAgent, lookout_edge_command, make_image


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lookout_edge_command(*args), capture_output=True, text=True, timeout=120)


def test_models_commands(agent: RunningAgent) -> None:
    socket = ("--socket", agent.address)
    listed = json.loads(run("models", "list", "--json", *socket).stdout)
    assert {m["name"]: m["status"] for m in listed} == {"cls": "STOPPED", "seg": "STOPPED"}
    started = json.loads(run("models", "start", "seg", "--wait", "30", "--json", *socket).stdout)
    assert started["status"] == "RUNNING"
    described = run("models", "describe", "seg", *socket)
    assert described.returncode == 0 and "RUNNING" in described.stdout
    stopped = json.loads(run("models", "stop", "seg", "--json", *socket).stdout)
    assert stopped == {"name": "seg", "status": "STOPPED"}
    missing = run("models", "describe", "nope", *socket)
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr and "nope" in missing.stderr


def test_detect_command_bytes_and_shared_memory(agent: RunningAgent, tmp_path: Path) -> None:
    agent.start("seg")
    normal, anomalous = tmp_path / "normal.png", tmp_path / "anomalous.bmp"
    Image.fromarray(make_image()).save(normal)
    Image.fromarray(make_image(red=20)).save(anomalous)
    for flags in ((), ("--shm",)):
        masks = tmp_path / f"masks{len(flags)}"
        completed = run(
            "detect", str(normal), str(anomalous), "--model", "seg", "--json", "--mask-out", str(masks),
            "--socket", agent.address, *flags,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        results = json.loads(completed.stdout)
        assert [r["is_anomalous"] for r in results] == [False, True]
        mask = np.asarray(Image.open(results[1]["mask"]))
        assert (mask[:20] == (255, 0, 0)).all() and (mask[20:] == (255, 255, 255)).all()
    text = run("detect", str(anomalous), "--model", "seg", "--socket", agent.address)
    assert "ANOMALOUS" in text.stdout and "red-paint" in text.stdout


def test_detect_wrong_size_is_a_clear_error(agent: RunningAgent, tmp_path: Path) -> None:
    agent.start("cls")
    small = tmp_path / "small.png"
    Image.fromarray(make_image(width=64, height=64)).save(small)
    completed = run("detect", str(small), "--model", "cls", "--socket", agent.address)
    assert completed.returncode == 1
    assert "INVALID_ARGUMENT" in completed.stderr and "128x96" in completed.stderr
