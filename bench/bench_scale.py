"""How training time and peak memory grow with the number of images (576x768).

    python bench/bench_scale.py [--sizes 200 1000 2000] [--json OUT]

Each size trains in a fresh process (`lookout-edge train --json`) on the synthetic
generator's parts at 768x576, 5 % of them anomalous, with a separate test set of 20 + 20
images; the parent reads the child's wall time and peak RSS (ru_maxrss of the child). The
targets: 2,000 images in at most 10 minutes and 3 GB of peak memory on the 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_agent import save_results  # noqa: E402
from lookout_edge.trainer.synthetic import write_synthetic_dataset  # noqa: E402

SIZE = (768, 576)
ANOMALOUS_SHARE = 0.05
TARGET_SECONDS = 600.0
TARGET_BYTES = 3 * 1024**3


def dataset(root: Path, images: int) -> Path:
    """A folder dataset with train/ and test/, each with normal/ and anomaly/."""
    anomalous = max(10, round(images * ANOMALOUS_SHARE))
    for part, (normal, anomaly, seed) in {
        "train": (images - anomalous, anomalous, 0),
        "test": (20, 20, 1),
    }.items():
        manifest = write_synthetic_dataset(
            root / f"{part}-source", normal, anomaly, size=SIZE, seed=seed, segmentation=False
        )
        for label in ("normal", "anomaly"):
            (root / part / label).mkdir(parents=True)
        for image in sorted(manifest.parent.rglob("*.png")):
            label = "anomaly" if image.name.startswith("anomaly-") else "normal"
            image.rename(root / part / label / image.name)
    return root


def train_child(data: Path, out: Path) -> dict[str, Any]:
    """Train in a child process; its wall time, peak RSS and the trainer's own timings."""
    began = time.perf_counter()
    child = subprocess.run(
        [
            sys.executable,
            "-m",
            "lookout_edge.cli",
            "train",
            str(data),
            "--out",
            str(out),
            "--name",
            "scale",
            "--json",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    seconds = time.perf_counter() - began
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise RuntimeError(f"training failed: {child.stderr[-2000:]}")
    result = json.loads(child.stdout)
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "trainer": result.get("seconds")}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "scale.json")
    args = parser.parse_args()
    rows = []
    for images in sorted(args.sizes):
        work = Path(tempfile.mkdtemp(prefix="le-scale-", dir="/tmp"))
        try:
            data = dataset(work / "data", images)
            row = {"images": images, **train_child(data, work / "model")}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append(row)
        # ru_maxrss of RUSAGE_CHILDREN is the largest child so far: sizes run smallest first.
        print(
            f"{images} images: {row['seconds']:.0f} s, peak RSS {row['peak_rss_bytes'] / 1024**3:.2f} GB,"
            f" trainer steps {row['trainer']}",
            flush=True,
        )
    largest = rows[-1]
    targets = {
        "seconds": {"measured": largest["seconds"], "target": f"<= {TARGET_SECONDS}"},
        "peak_rss_bytes": {"measured": largest["peak_rss_bytes"], "target": f"<= {TARGET_BYTES}"},
    }
    met_time = largest["seconds"] <= TARGET_SECONDS
    met_memory = largest["peak_rss_bytes"] <= TARGET_BYTES
    print(
        f"target {largest['images']} images <= 10 min: {'met' if met_time else 'NOT MET'};"
        f" <= 3 GB: {'met' if met_memory else 'NOT MET'}"
    )
    save_results({"rows": rows, "targets": targets}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
