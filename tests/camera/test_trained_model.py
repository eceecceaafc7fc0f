"""The daemon with a model trained by `lookout-edge train`, over real HTTP MJPEG streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from lookout_edge.trainer.synthetic import write_synthetic_dataset
from lookout_edge.trainer.train import train
from tests.camera.conftest import MjpegServer, jpeg, read_events, wait_for


def test_trained_model_over_mjpeg_streams(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    """One camera films a normal part, another a part with a piece missing: the events of a
    trained model say which is which."""
    dataset = write_synthetic_dataset(tmp_path / "dataset", normal=20, anomalous=10, segmentation=False)
    # The training images are what the camera delivers: JPEG frames of the streams' quality.
    # (Trained on the generator's lossless pixels, whose sensor noise JPEG smooths away, the
    # model sees every streamed frame as unlike its training parts.)
    for image in dataset.parent.rglob("*.png"):
        image.write_bytes(jpeg(np.asarray(Image.open(image).convert("RGB"))))
    package = train(dataset.parent, models_dir / "parts", "parts").package
    # Parts of the same kind the model never saw (the seed picks the kind of part): the generator
    # writes in order, so a larger set of the same seed starts with the 20 training normals and
    # goes on with new ones; its anomalies come after more normals, so they are new too. The
    # second anomaly of a dataset is a missing piece.
    unseen = write_synthetic_dataset(tmp_path / "unseen", normal=21, anomalous=2, segmentation=False).parent
    normal = np.asarray(Image.open(unseen / "normal" / "normal-020.png").convert("RGB"))
    missing = np.asarray(Image.open(unseen / "anomaly" / "anomaly-001.png").convert("RGB"))
    agent = agent_process()
    agent.wait_ready()
    servers = {"good": MjpegServer(normal), "bad": MjpegServer(missing)}
    events_path = tmp_path / "events.jsonl"
    try:
        camera_daemon(
            {
                "agent": {"socket": agent.address, "models_dir": str(models_dir)},
                "cameras": [
                    {"name": name, "source": server.url, "model": "parts"} for name, server in servers.items()
                ],
                "sinks": [{"type": "jsonl", "path": str(events_path)}],
            }
        )

        def both() -> bool:
            cameras = [e["camera"] for e in read_events(events_path)]
            return cameras.count("good") >= 3 and cameras.count("bad") >= 3

        wait_for(both, 60, "three events from each camera")
    finally:
        for server in servers.values():
            server.close()
    events = read_events(events_path)
    assert all(e["model"] == "parts" for e in events)
    assert not any(e["is_anomalous"] for e in events if e["camera"] == "good")
    assert all(e["is_anomalous"] for e in events if e["camera"] == "bad")
    threshold = {e["threshold"] for e in events}
    assert threshold == {0.5}  # the package's calibrated threshold
    assert package.name == "parts"
