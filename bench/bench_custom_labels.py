"""Benchmark Custom Labels models: quality, training time, and DetectCustomLabels through the endpoint.

    python bench/bench_custom_labels.py [--quick] [--json OUT]

Quality, through the real trainer (`train_labels`, with a test set as the guide evaluates):

- ELPV solar cells (monocrystalline; PyPI `elpv-dataset`, fetched on demand into build/elpv, its
  data licence CC BY-NC-SA 4.0: never committed, never in the tests): image classification of
  the four defect grades (probability 0, 1/3, 2/3, 1), seeded stratified 75/25 splits;
- the synthetic parts (trainer/synthetic.py): classification (normal / scratch / missing) and
  multi-label, trained on 60 images and tested on 60 others; localisation of the two defects;
- cookies (../shared/datasets/cookies): localisation of `cracked`, one box per crack (the
  mask's pixels grouped when closer than 16 px), seeded 75/25 splits.

Printed per split: per-label F1 (at the assumed threshold, the guide's rule), the aggregate F1,
mAP at IoU 0.5 for boxes, training seconds. Then DetectCustomLabels p50/p99 through
`lookout-edge rekognition` (JPEG bytes; the request's SigV4 signing, HTTP, JSON, base64 and JPEG
decoding included) with the project's typed client and with boto3, beside the same package run
in this process (JPEG decoding and ONNX Runtime on the same graph), interleaved call by call;
target: endpoint ≤ 1.3× in-process, through the typed client. boto3 adds its own client-side
work per call (about 2.5 ms here), shown beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_agent import save_results  # noqa: E402
from bench.elpv import elpv_cells  # noqa: E402
from lookout_edge.client.custom_labels_client import CustomLabelsClient  # noqa: E402
from lookout_edge.custom_labels import LabelModel, decode_image, read_label_package  # noqa: E402
from lookout_edge.trainer.labels.dataset import load_label_dataset  # noqa: E402
from lookout_edge.trainer.labels.train import LabelTrainOptions, train_labels  # noqa: E402
from lookout_edge.trainer.synthetic import write_label_dataset  # noqa: E402

COOKIES = ROOT.parent / "shared" / "datasets" / "cookies"
GRADES = {0.0: "functional", 1 / 3: "mildly-defective", 2 / 3: "likely-defective", 1.0: "defective"}
ENDPOINT_RATIO_TARGET = 1.3
CRACK_GAP = 16  # px: crack pixels closer than this are one crack


def classification_line(ref: str, label: str, names: list[str]) -> dict[str, Any]:
    return {
        "source-ref": ref,
        "grade": names.index(label),
        "grade-metadata": {
            "confidence": 1,
            "class-name": label,
            "human-annotated": "yes",
            "creation-date": "2024-01-01T00:00:00",
            "type": "groundtruth/image-classification",
            "job-name": "labeling-job/bench",
        },
    }


def box_line(ref: str, size: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> dict[str, Any]:
    return {
        "source-ref": ref,
        "bounding-box": {
            "image_size": [{"width": size[0], "height": size[1], "depth": 3}],
            "annotations": [
                {"class_id": 0, "left": left, "top": top, "width": right - left, "height": bottom - top}
                for left, top, right, bottom in boxes
            ],
        },
        "bounding-box-metadata": {
            "objects": [{"confidence": 1} for _ in boxes],
            "class-map": {"0": "cracked"},
            "type": "groundtruth/object-detection",
            "human-annotated": "yes",
            "creation-date": "2024-01-01T00:00:00",
            "job-name": "labeling-job/bench",
        },
    }


def write_manifest(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def stratified_split(keys: list[str], seed: int, test_share: float = 0.25) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    train, test = [], []
    for key in sorted(set(keys)):
        members = [i for i, k in enumerate(keys) if k == key]
        rng.shuffle(members)
        cut = max(1, round(test_share * len(members)))
        test += members[:cut]
        train += members[cut:]
    return sorted(train), sorted(test)


def crack_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """One box per crack: the mask's pixels, grouped when closer than CRACK_GAP (flood fill on
    the mask dilated by half the gap)."""
    grown = np.asarray(
        Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(CRACK_GAP + 1))
    )
    seen = np.zeros(mask.shape, bool)
    boxes = []
    for y, x in zip(*np.nonzero(grown), strict=True):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, members = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            members.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and grown[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        rows, columns = np.array(members).T
        inside = mask[rows, columns]
        if inside.any():
            ys, xs = rows[inside], columns[inside]
            boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    return boxes


def cookies_box_lines() -> list[dict[str, Any]]:
    lines = []
    for raw in (COOKIES / "train.manifest").read_text().splitlines():
        data = json.loads(raw)
        image = COOKIES / data["source-ref"]
        with Image.open(image) as opened:
            size = opened.size
        boxes = []
        mask_ref = data.get("anomaly-mask-ref")
        if mask_ref:
            with Image.open(COOKIES / mask_ref) as mask:
                pixels = np.asarray(mask.convert("RGBA"))[:, :, :3]
            boxes = crack_boxes(pixels.any(axis=2))
        lines.append(box_line(str(image), size, boxes))
    return lines


def run(train: Path, test: Path, out: Path, kind: str) -> dict[str, Any]:
    began = time.perf_counter()
    dataset = load_label_dataset(train, kind, test=test)
    result = train_labels(dataset, out, out.parent.name, options=LabelTrainOptions())
    seconds = time.perf_counter() - began
    aggregate = result.summary["AggregatedEvaluationResults"]
    row: dict[str, Any] = {
        "f1": aggregate["F1Score"],
        "labels": {r["Label"]: r["Metrics"]["F1Score"] for r in result.summary["LabelEvaluationResults"]},
        "train_seconds": seconds,
        "package": str(result.package),
    }
    if "AveragePrecision" in aggregate:
        row["map"] = aggregate["AveragePrecision"]
        row["mar"] = aggregate["AverageRecall"]
    return row


def show(name: str, index: int, row: dict[str, Any]) -> None:
    labels = ", ".join(f"{label} {f1:.3f}" for label, f1 in sorted(row["labels"].items()))
    boxes = f", mAP {row['map']:.3f}, mAR {row['mar']:.3f}" if "map" in row else ""
    print(
        f"{name} split {index}: F1 {row['f1']:.3f}{boxes} [{labels}], {row['train_seconds']:.1f} s",
        flush=True,
    )


def summarise(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {"splits": rows}
    for key in ("f1", "map", "mar", "train_seconds"):
        values = [row[key] for row in rows if key in row]
        if values:
            mean = statistics.fmean(values)
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[key] = {"mean": mean, "sd": sd}
            print(f"  {name} {key}: {mean:.3f} ± {sd:.3f}")
    labels = sorted(rows[0]["labels"])
    summary["labels"] = {label: statistics.fmean(row["labels"][label] for row in rows) for label in labels}
    print(f"  {name} per-label F1: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["labels"].items()))
    return summary


def manifest_splits(
    name: str, lines: list[dict[str, Any]], keys: list[str], kind: str, work: Path, splits: int
) -> dict[str, Any]:
    """Train and test on seeded splits of manifest `lines`, stratified by `keys`."""
    rows = []
    for seed in range(splits):
        train, test = stratified_split(keys, seed)
        folder = work.with_name(f"{work.name}-{seed}")
        row = run(
            write_manifest(folder / "train.manifest", [lines[i] for i in train]),
            write_manifest(folder / "test.manifest", [lines[i] for i in test]),
            folder / "package",
            kind,
        )
        show(name, seed, row)
        rows.append(row)
    return summarise(name, rows)


def elpv(work: Path, splits: int) -> dict[str, Any]:
    cells = elpv_cells("mono")
    names = list(GRADES.values())
    grades = [min(GRADES.items(), key=lambda item: abs(item[0] - p))[1] for _, p in cells]
    lines = [
        classification_line(str(path), grade, names) for (path, _), grade in zip(cells, grades, strict=True)
    ]
    return manifest_splits("elpv grades", lines, grades, "classification", work / "elpv", splits)


def synthetic(work: Path, kind: str, splits: int) -> dict[str, Any]:
    rows = []
    for seed in range(splits):
        manifest = write_label_dataset(work / f"{kind}-{seed}", kind, 120, seed=seed)
        lines = manifest.read_text().splitlines(keepends=True)
        train = manifest.with_name("train.manifest")
        test = manifest.with_name("test.manifest")
        train.write_text("".join(lines[:60]))
        test.write_text("".join(lines[60:]))
        row = run(train, test, work / f"{kind}-{seed}" / "package", kind)
        show(f"synthetic {kind}", seed, row)
        rows.append(row)
    return summarise(f"synthetic {kind}", rows)


def cookies(work: Path, splits: int) -> dict[str, Any]:
    lines = cookies_box_lines()
    keys = ["cracked" if line["bounding-box"]["annotations"] else "none" for line in lines]
    return manifest_splits("cookies boxes", lines, keys, "localisation", work / "cookies", splits)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": ordered[len(ordered) // 2] * 1000,
        "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
    }


def _detectors(client: Any, typed: CustomLabelsClient, local: LabelModel, arn: str) -> dict[str, Any]:
    """DetectCustomLabels on JPEG bytes three ways: boto3, the typed client, in this process."""
    return {
        "boto3": lambda data: client.detect_custom_labels(ProjectVersionArn=arn, Image={"Bytes": data}),
        "typed_client": lambda data: typed.detect_custom_labels(data, arn),
        "in_process": lambda data: local.predict(decode_image(data)),
    }


def endpoint_latency(packages: list[Path], images: list[Path], calls: int) -> dict[str, Any]:
    """DetectCustomLabels through the endpoint beside in-process inference, interleaved."""
    import boto3

    models = Path(tempfile.mkdtemp(prefix="bench-models-", dir=ROOT / "build"))
    for package in packages:
        os.symlink(package, models / package.parent.name)
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lookout_edge.cli",
            "rekognition",
            "--models-dir",
            str(models),
            "--address",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results: dict[str, Any] = {}
    try:
        client = boto3.client(
            "rekognition",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="AKIDEXAMPLE",
            aws_secret_access_key="bench",
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.describe_projects()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        jpegs = []
        for path in images:
            buffer = io.BytesIO()
            Image.open(path).convert("RGB").save(buffer, format="JPEG", quality=90)
            jpegs.append(buffer.getvalue())
        for package in packages:
            label_package = read_label_package(package)
            arn = label_package.model_arn
            client.start_project_version(ProjectVersionArn=arn, MinInferenceUnits=1)
            client.get_waiter("project_version_running").wait(
                ProjectArn=label_package.project_arn,
                VersionNames=[label_package.version_name],
                WaiterConfig={"Delay": 1, "MaxAttempts": 60},
            )
            local = LabelModel(label_package)
            typed = CustomLabelsClient(f"http://127.0.0.1:{port}", "AKIDEXAMPLE", "bench")
            timings: dict[str, list[float]] = {"boto3": [], "typed_client": [], "in_process": []}
            calls_by_way = _detectors(client, typed, local, arn)
            for call in range(calls + 5):
                data = jpegs[call % len(jpegs)]
                for way, detect in calls_by_way.items():
                    began = time.perf_counter()
                    detect(data)
                    if call >= 5:  # warm-up
                        timings[way].append(time.perf_counter() - began)
            client.stop_project_version(ProjectVersionArn=arn)
            figures: dict[str, Any] = {way: percentiles(values) for way, values in timings.items()}
            inside = figures["in_process"]["p50"]
            for way in ("typed_client", "boto3"):
                figures[f"{way}_ratio_p50"] = figures[way]["p50"] / inside
            figures["met"] = figures["typed_client_ratio_p50"] <= ENDPOINT_RATIO_TARGET
            results[label_package.model_type] = figures
            shown = "; ".join(
                f"{way} p50 {figures[way]['p50']:.1f} ms p99 {figures[way]['p99']:.1f} ms" for way in timings
            )
            print(
                f"DetectCustomLabels {label_package.model_type} "
                f"({label_package.width}x{label_package.height}): {shown}; "
                f"endpoint / in-process p50: typed client {figures['typed_client_ratio_p50']:.2f} "
                f"(target <= {ENDPOINT_RATIO_TARGET}: {'met' if figures['met'] else 'NOT MET'}), "
                f"boto3 {figures['boto3_ratio_p50']:.2f} (boto3's own work per call included)",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
        for entry in models.iterdir():
            entry.unlink()
        models.rmdir()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one split of each, fewer calls")
    parser.add_argument("--splits", type=int, default=None, help="splits per data set (default 5)")
    parser.add_argument(
        "--calls", type=int, default=None, help="DetectCustomLabels calls per model (default 200)"
    )
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "custom_labels.json")
    args = parser.parse_args()
    splits = args.splits if args.splits is not None else (1 if args.quick else 5)
    calls = args.calls if args.calls is not None else (50 if args.quick else 200)
    work = ROOT / "build" / "bench" / "custom-labels"
    results: dict[str, Any] = {
        "synthetic_classification": synthetic(work, "classification", splits),
        "synthetic_multi_label": synthetic(work, "multi-label", splits),
        "synthetic_localisation": synthetic(work, "localisation", splits),
        "elpv_grades": elpv(work, splits),
    }
    if (COOKIES / "train.manifest").is_file():
        results["cookies_localisation"] = cookies(work, splits)
    packages = [
        Path(results["elpv_grades"]["splits"][0]["package"]),
        Path(results["synthetic_localisation"]["splits"][0]["package"]),
    ]
    images = [path for path, _ in elpv_cells("mono")[:20]]
    results["endpoint"] = endpoint_latency(packages, images, calls)
    save_results(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
