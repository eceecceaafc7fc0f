"""Benchmark the trainer on the real cookies dataset: time, memory, quality, and inference latency.

    python bench/bench_trainer.py [--runs N] [--json OUT]

Training runs as `lookout-edge train` in a child process, so its wall time and peak
resident memory are those a user sees. The trained package is then served by an agent
process and timed through DetectAnomalies (shared memory and bytes) beside in-process
`session.run` of the same graph on the same images.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_agent import Agent, save_results, summary, timed  # noqa: E402
from lookout_edge.agent.malloc import tune_malloc  # noqa: E402
from lookout_edge.protocol import pb2  # noqa: E402
from lookout_edge.shm import OwnedSegment  # noqa: E402

COOKIES = ROOT.parent / "shared" / "datasets" / "cookies"
TARGETS = {
    "train_seconds": ("<=", 30.0),
    "peak_train_memory_mb": ("<=", 2048.0),
    "agent_shm_p50_ms": ("<=", 60.0),
    "image_auroc": (">=", 0.98),
    "f1": (">=", 0.95),
    "pixel_auroc": (">=", 0.97),
    "cracked_iou": (">=", 0.50),
}


def train_once(out: Path) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one `lookout-edge train` on cookies."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "lookout_edge.cli", "train", str(COOKIES / "train.manifest"),
         "--out", str(out), "--name", "cookies"],
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wall = time.perf_counter() - began
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak_kb, before) / 1024


def latency(
    package: Path, models_dir: Path, work: Path, images: list[np.ndarray], rounds: int
) -> dict[str, float]:
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = ["anomaly_score", "label_map"]
    agent = Agent(models_dir, work)
    times: dict[str, list[float]] = {"in_process": [], "shm": [], "bytes": []}
    try:
        agent.start_model("cookies")
        height, width = images[0].shape[:2]
        size = images[0].nbytes
        with OwnedSegment.create(2 * size, prefix="lookout_edge_bench") as segment:
            shm_request = pb2.DetectAnomaliesRequest(
                model_component="cookies",
                bitmap=pb2.Bitmap(
                    width=width,
                    height=height,
                    shared_memory_handle=pb2.SharedMemoryHandle(name=segment.name, size=size),
                ),
            )
            shm_request.anomaly_mask_params.shared_memory_handle.CopyFrom(
                pb2.SharedMemoryHandle(name=segment.name, offset=size, size=size)
            )
            requests = []
            for image in images:
                requests.append(
                    pb2.DetectAnomaliesRequest(
                        model_component="cookies",
                        bitmap=pb2.Bitmap(width=width, height=height, byte_data=image.tobytes()),
                    )
                )
            # One path at a time over all images, rotating (see BLOCK in bench_agent.py).
            for _ in range(rounds):
                for image in images:
                    times["in_process"].append(timed(lambda: session.run(outputs, {"image": image})))  # noqa: B023
                for image in images:
                    segment.array(size)[:] = image.reshape(-1)
                    times["shm"].append(timed(lambda: agent.stub.DetectAnomalies(shm_request)))
                for request in requests:
                    times["bytes"].append(timed(lambda: agent.stub.DetectAnomalies(request)))  # noqa: B023
    finally:
        agent.close()
    result = {}
    for key, values in times.items():
        for stat, value in summary(values).items():
            result[f"{key}_{stat}"] = value
    base = statistics.median(times["in_process"])
    result["shm_ratio"] = statistics.median(times["shm"]) / base
    result["bytes_ratio"] = statistics.median(times["bytes"]) / base
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="training runs (the median is reported)")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images for latency")
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "trainer.json")
    args = parser.parse_args()
    # The agent recycles large buffers (agent/malloc.py); the in-process baseline gets the same
    # allocator settings, so that the ratios compare like with like.
    tune_malloc()
    if not COOKIES.is_dir():
        print(f"the cookies dataset is not at {COOKIES}; nothing to benchmark")
        return 1
    work = Path(tempfile.mkdtemp(prefix="le-bench-", dir="/tmp"))
    try:
        models_dir = work / "models"
        runs = []
        for run in range(args.runs):
            shutil.rmtree(models_dir, ignore_errors=True)
            runs.append(train_once(models_dir / "cookies"))
            print(f"training run {run + 1}: {runs[-1][0]:.1f} s, peak {runs[-1][1]:.0f} MiB", flush=True)
        package = models_dir / "cookies"
        evaluation = json.loads((package / "evaluation.json").read_text())
        images = [
            np.asarray(Image.open(path).convert("RGB"))
            for path in sorted((COOKIES / "training-images").glob("*.jpg"))
        ][:20]
        timings = latency(package, models_dir, work, images, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cracked = next(label for label in evaluation["segmentation"]["labels"] if label["name"] == "cracked")
    measured = {
        "train_seconds": statistics.median(wall for wall, _ in runs),
        "peak_train_memory_mb": max(peak for _, peak in runs),
        "agent_shm_p50_ms": timings["shm_p50_ms"],
        "image_auroc": evaluation["auroc"],
        "f1": evaluation["classification"]["f1"],
        "pixel_auroc": evaluation["pixel_auroc"],
        "cracked_iou": cracked["iou"],
    }
    print("per-image latency at 576x768, p50 / p99 ms:")
    for key, name in (
        ("in_process", "in-process session.run"),
        ("shm", "agent, shared memory"),
        ("bytes", "agent, bytes"),
    ):
        ratio = "" if key == "in_process" else f" (x{timings[key + '_ratio']:.3f})"
        print(f"  {name}: {timings[key + '_p50_ms']:.1f} / {timings[key + '_p99_ms']:.1f}{ratio}")
    print(f"cracked: pooled IoU {cracked['iou']:.3f}, mean per-image IoU {cracked['average_iou']:.3f}")
    results = {"runs": runs, "latency": timings, "measured": measured, "targets": {}}
    for key, (op, target) in TARGETS.items():
        value = measured[key]
        met = value <= target if op == "<=" else value >= target
        results["targets"][key] = {"measured": value, "target": f"{op} {target}", "met": met}
        print(f"target {key}: {value:.3f} {op} {target}: {'met' if met else 'NOT MET'}")
    save_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
