"""`make demo`: the whole edge story on this machine, with no data of its own.

Generates a small labelled dataset (textured parts with scratches and missing pieces, with
masks), trains and evaluates a segmentation model on it, starts the Edge Agent on a private
socket and runs a client application against it: start the model, detect anomalies on new
parts it has never seen, over bytes and over shared memory, print the verdicts, stop the
model, stop the agent.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from lookout_edge.client.edge_client import EdgeAgentClient
from lookout_edge.trainer.evaluate import summary_lines
from lookout_edge.trainer.synthetic import write_synthetic_dataset
from lookout_edge.trainer.train import train

MODEL = "parts-inspection"
TRAINING_NORMAL = 20


def unseen_images(out: Path, count: int = 3) -> list[Path]:
    """A few normal and anomalous parts of the same kind that the model has never seen.

    The seed chooses the kind of part (its texture), so they come from the training seed: the
    generator writes images in order, and the first TRAINING_NORMAL normal images of a larger
    set are the training images; the rest, and its anomalies (drawn after more normals), are new.
    """
    manifest = write_synthetic_dataset(out, normal=TRAINING_NORMAL + count, anomalous=count)
    folder = manifest.parent
    normals = sorted((folder / "normal").glob("*.png"))[TRAINING_NORMAL:]
    return normals + sorted((folder / "anomaly").glob("*.png"))


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
    dataset = write_synthetic_dataset(out / "dataset", normal=TRAINING_NORMAL, anomalous=40)
    print(f"1. generated a labelled dataset: {dataset}")
    models_dir = out / "models"
    print("2. training (PatchCore on EfficientNet-Lite0 features, segmentation head)...")
    result = train(dataset, models_dir / MODEL, MODEL)
    print(f"   model package {result.package}, trained and evaluated in {result.seconds['total']:.1f} s")
    for line in summary_lines(result.evaluation):
        print(f"   {line}")
    print(f"   report: {result.package / 'report.html'}")
    images = unseen_images(out / "unseen")

    socket = f"unix://{out}/agent.sock"
    print(f"3. starting the Edge Agent on {socket}")
    agent = subprocess.Popen(
        [sys.executable, "-m", "lookout_edge.cli", "agent", "--socket", socket,
         "--models-dir", str(models_dir), "--log-level", "WARNING"],
    )  # fmt: skip
    try:
        with EdgeAgentClient(socket) as client:
            wait_for_agent(client, agent)
            for state in client.list_models():
                print(f"   model {state.name}: {state.status}")
            began = time.perf_counter()
            client.start_and_wait(MODEL, timeout=60)
            print(f"4. {MODEL} is RUNNING ({time.perf_counter() - began:.2f} s after StartModel)")
            for shared_memory in (False, True):
                how = "shared memory" if shared_memory else "bytes"
                for path in images:
                    detection = client.detect(path, MODEL, shared_memory=shared_memory)
                    verdict = "ANOMALOUS" if detection.is_anomalous else "normal"
                    areas = ", ".join(f"{a.name} {a.area:.1%}" for a in detection.anomalies[1:] if a.area > 0)
                    print(
                        f"   [{how:>13}] {path.name:<16} {verdict:<9} score {detection.anomaly_score:.3f} "
                        f"(threshold {detection.anomaly_threshold:.3f}, "
                        f"confidence {detection.confidence:.2f})" + (f"  {areas}" if areas else "")
                    )
                    if detection.mask is not None and shared_memory:
                        mask_path = out / "masks" / f"{path.stem}.png"
                        mask_path.parent.mkdir(exist_ok=True)
                        Image.fromarray(detection.mask).save(mask_path)
            print(f"5. stopping {MODEL}: {client.stop_model(MODEL)}")
            print(f"   masks written to {out / 'masks'}")
    finally:
        agent.send_signal(signal.SIGTERM)
        status = agent.wait(30)
    print(f"6. agent stopped (exit status {status})")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
