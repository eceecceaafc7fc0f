"""`make demo`: the whole edge story on this machine, with no data of its own.

Writes model packages, starts the Edge Agent on a private socket, and runs a client
application against it: start the model, detect anomalies on a few images over bytes and
over shared memory, print the verdicts, stop the model, stop the agent.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from client.edge_client import EdgeAgentClient
from lookout_edge.sample_models import write_sample_package

WIDTH, HEIGHT = 640, 480


def demo_images(directory: Path) -> list[Path]:
    """A clean part, a part with a red paint defect, and one with red and blue defects."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for name, red, blue in (("clean", 0, 0), ("red-defect", 40, 0), ("two-defects", 25, 30)):
        image = rng.integers(100, 150, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
        image[200 : 200 + red, 100:400] = (240, 20, 20)
        image[300 : 300 + blue, 350:600] = (20, 20, 240)
        path = directory / f"{name}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def wait_for_agent(client: EdgeAgentClient, agent: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_models()
            return
        except Exception:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the agent did not come up; see its log above") from None
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="where the demo writes its files"
    )
    args = parser.parse_args()
    out: Path = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    models_dir = out / "models"
    print(f"1. writing model packages to {models_dir}")
    write_sample_package(models_dir / "paint-check", "paint-check", WIDTH, HEIGHT)
    write_sample_package(
        models_dir / "paint-segmentation", "paint-segmentation", WIDTH, HEIGHT, segmentation=True
    )
    images = demo_images(out / "images")

    socket = f"unix://{out}/agent.sock"
    print(f"2. starting the Edge Agent on {socket}")
    agent = subprocess.Popen(
        [sys.executable, "-m", "lookout_edge.cli", "agent", "--socket", socket,
         "--models-dir", str(models_dir), "--log-level", "WARNING"],
    )  # fmt: skip
    try:
        with EdgeAgentClient(socket) as client:
            wait_for_agent(client, agent)
            for state in client.list_models():
                print(f"   model {state.name}: {state.status}")
            for model in ("paint-check", "paint-segmentation"):
                began = time.perf_counter()
                client.start_and_wait(model, timeout=60)
                print(f"3. {model} is RUNNING ({time.perf_counter() - began:.2f} s after StartModel)")
                for shared_memory in (False, True):
                    how = "shared memory" if shared_memory else "bytes"
                    for path in images:
                        result = client.detect(path, model, shared_memory=shared_memory)
                        verdict = "ANOMALOUS" if result.is_anomalous else "normal"
                        areas = ", ".join(
                            f"{a.name} {a.area:.1%}" for a in result.anomalies[1:] if a.area > 0
                        )
                        print(
                            f"   [{how:>13}] {path.name:<16} {verdict:<9} score {result.anomaly_score:.3f} "
                            f"(threshold {result.anomaly_threshold:.3f}, confidence {result.confidence:.2f})"
                            + (f"  {areas}" if areas else "")
                        )
                        if result.mask is not None and shared_memory:
                            mask_path = out / "masks" / f"{path.stem}.png"
                            mask_path.parent.mkdir(exist_ok=True)
                            Image.fromarray(result.mask).save(mask_path)
                print(f"4. stopping {model}: {client.stop_model(model)}")
            print(f"   masks written to {out / 'masks'}")
    finally:
        agent.send_signal(signal.SIGTERM)
        status = agent.wait(30)
    print(f"5. agent stopped (exit status {status})")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
