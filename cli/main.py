"""The `lookout-edge` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from lookout_edge import DEFAULT_SOCKET, __version__
from lookout_edge.agent.backends.base import ACCELERATORS
from lookout_edge.trainer.labels.dataset import KINDS as LABEL_KINDS

if TYPE_CHECKING:
    from lookout_edge.trainer.progress import Progress


# A box's keys in DetectCustomLabels' Geometry.BoundingBox, in the order of
# lookout_edge.custom_labels' boxes.
BOX_KEYS = ("Left", "Top", "Width", "Height")


def _socket_default() -> str:
    return os.environ.get("LOOKOUT_EDGE_SOCKET", DEFAULT_SOCKET)


def _add_agent_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("agent", help="run the Edge Agent (gRPC server)")
    parser.add_argument("--config", type=Path, help="YAML settings file (also LOOKOUT_EDGE_CONFIG)")
    parser.add_argument("--socket", help=f"unix: address to serve on (default {DEFAULT_SOCKET})")
    parser.add_argument("--models-dir", type=Path, help="directory holding model packages")
    parser.add_argument("--socket-group", help="group that owns the socket (e.g. ggc_group)")
    parser.add_argument("--socket-mode", help="socket file mode in octal (default 0660)")
    parser.add_argument(
        "--queue-size", type=int, help="calls admitted per running model before RESOURCE_EXHAUSTED"
    )
    parser.add_argument("--workers", type=int, help="threads serving calls")
    parser.add_argument(
        "--max-concurrent-runs", type=int, help="calls one model runs at once (default: one per CPU core)"
    )
    parser.add_argument(
        "--user", help="serve as this user (NAME or NAME:GROUP) once the socket exists; needs root"
    )
    parser.add_argument(
        "--start-model", action="append", dest="start_models", help="start this model at launch"
    )
    parser.add_argument("--memory-limit-mb", type=int, help="memory budget for all running models")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--tcp-address", help="also serve TLS on host:port (off by default)")
    parser.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for --tcp-address")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM) for --tcp-address")
    parser.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA")
    parser.add_argument(
        "--metrics-address", help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default)"
    )
    # Accelerators (docs/accelerators.md).
    parser.add_argument("--accelerator", help=f"one of {', '.join(ACCELERATORS)} (default auto)")
    parser.add_argument("--engine-cache-dir", type=Path, help="where built TensorRT engines are cached")
    parser.add_argument("--tensorrt-precision", help="auto (FP16 where fast, default), fp16 or fp32")


def _add_client_parsers(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=_socket_default(), help="agent address (default %(default)s)")
    common.add_argument("--json", action="store_true", help="machine-readable output")

    models = commands.add_parser("models", help="list, describe, start or stop models on the agent")
    actions = models.add_subparsers(dest="action", required=True)
    actions.add_parser("list", parents=[common], help="list the deployed models")
    for action in ("describe", "start", "stop"):
        sub = actions.add_parser(action, parents=[common], help=f"{action} one model")
        sub.add_argument("name", help="model component name")
        if action == "start":
            sub.add_argument("--wait", type=float, metavar="SECONDS", help="wait until RUNNING (or fail)")

    detect = commands.add_parser(
        "detect",
        parents=[common],
        help="run DetectAnomalies on image files, or a Custom Labels model's DetectCustomLabels",
    )
    detect.add_argument("images", nargs="+", type=Path, help="image files (any format Pillow reads)")
    which = detect.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="anomaly model: its component name on the agent")
    which.add_argument(
        "--package", type=Path, help="Custom Labels model: its package directory, run in this process"
    )
    detect.add_argument(
        "--min-confidence",
        type=float,
        help="Custom Labels: lowest confidence (0-100) to print; default each label's assumed threshold",
    )
    detect.add_argument("--shm", action="store_true", help="pass images through shared memory")
    detect.add_argument("--mask-out", type=Path, help="write masks of segmentation models here as PNG")


def _add_trainer_parsers(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train, evaluate and package a model from a labelled dataset")
    train.add_argument(
        "dataset", type=Path, help="normal/ + anomaly/ folders, train/ + test/ folders, or a manifest"
    )
    train.add_argument("--out", type=Path, required=True, help="model package directory to write")
    train.add_argument(
        "--kind",
        choices=("anomaly", *LABEL_KINDS),
        default="anomaly",
        help="anomaly model (default), or a Custom Labels model: image classification, "
        "multi-label classification or object localisation (docs/custom-labels.md)",
    )
    train.add_argument("--name", help="anomaly models: the model component name clients will use")
    train.add_argument("--project", help="Custom Labels: the project name (default: the dataset's name)")
    train.add_argument(
        "--version-name", help="Custom Labels: the version name (default: <project>.<UTC time>)"
    )
    train.add_argument("--project-arn", help="Custom Labels: the project's ARN (default: made up)")
    train.add_argument("--version-arn", help="Custom Labels: the version's ARN (default: made up)")
    train.add_argument(
        "--s3-root",
        type=Path,
        help="Custom Labels: a local mirror of S3; s3://BUCKET/KEY images are read from "
        "S3_ROOT/BUCKET/KEY (missing ones are downloaded there with boto3)",
    )
    train.add_argument(
        "--test", type=Path, help="a separate test dataset, evaluated beside the cross-validated estimate"
    )
    train.add_argument(
        "--favour-recall", action="store_true", help="threshold for recall (F2) rather than F1"
    )
    train.add_argument(
        "--short-side",
        type=int,
        help="network input short side (default 256; Custom Labels localisation 320)",
    )
    train.add_argument(
        "--seed", type=int, default=0, help="seed for the cross-validation and the coreset (default 0)"
    )
    train.add_argument(
        "--region",
        type=Path,
        help="inspect only this region: a PNG mask (non-zero = inspect) or a polygons JSON file",
    )
    train.add_argument("--json", action="store_true", help="print the evaluation as JSON")

    evaluate = commands.add_parser("evaluate", help="evaluate a model package on a labelled dataset")
    evaluate.add_argument("model_dir", type=Path, help="model package directory")
    evaluate.add_argument("dataset", type=Path, help="labelled dataset (folders or manifest)")
    evaluate.add_argument("--report", type=Path, default=Path("evaluation"), help="where to write the report")
    evaluate.add_argument("--json", action="store_true", help="print the evaluation as JSON")


def _add_revision_parsers(commands: argparse._SubParsersAction) -> None:
    calibrate = commands.add_parser(
        "calibrate", help="a new version of a model package with thresholds chosen on labelled images"
    )
    calibrate.add_argument("package", type=Path, help="model package directory written by `train`")
    calibrate.add_argument(
        "dataset", type=Path, help="labelled images (folders or manifest) at the model's size"
    )
    calibrate.add_argument("--out", type=Path, required=True, help="new package directory to write")
    calibrate.add_argument(
        "--favour-recall",
        action=argparse.BooleanOptionalAction,
        help="threshold for recall (F2) rather than F1 (default: as the model was trained)",
    )
    calibrate.add_argument("--json", action="store_true", help="print the evaluation as JSON")

    update = commands.add_parser(
        "update", help="a new version of a model package that learnt from more images"
    )
    update.add_argument("package", type=Path, help="model package directory written by `train`")
    update.add_argument(
        "--add",
        type=Path,
        required=True,
        metavar="DATASET",
        help="labelled images to add (folders or manifest)",
    )
    update.add_argument("--out", type=Path, required=True, help="new package directory to write")
    update.add_argument("--json", action="store_true", help="print the evaluation as JSON")


def _run_revision(args: argparse.Namespace) -> int:
    from lookout_edge.trainer.calibrate import calibrate, update
    from lookout_edge.trainer.evaluate import summary_lines

    if args.command == "calibrate":
        result = calibrate(args.package, args.dataset, args.out, args.favour_recall)
    else:
        result = update(args.package, args.add, args.out)
    manifest = json.loads((result.package / "manifest.json").read_text(encoding="utf-8"))
    if args.json:
        record = {
            "package": str(result.package),
            "model_arn": manifest["model_arn"],
            "changes": result.changes,
        }
        print(json.dumps({**record, "seconds": result.seconds, **result.evaluation}, indent=2))
        return 0
    print(f"{manifest['model_arn']} written to {result.package} ({result.seconds:.1f} s)")
    for key, change in result.changes.items():
        print(f"  {key}: {change['from']} -> {change['to']}")
    if not result.changes:
        print("  nothing changed: the new version serves the same graph")
    estimate = manifest["metrics"]["classification"]
    if estimate["f1"] is not None and estimate["f1_interval"] is not None:
        low, high = estimate["f1_interval"]
        print(f"estimated F1 on unseen images {estimate['f1']:.1%} ({low:.1%}-{high:.1%})")
    print("on the given images:")
    print("\n".join(summary_lines(result.evaluation)))
    print(f"report: {result.package / 'report.html'}")
    return 0


def _add_package_parser(commands: argparse._SubParsersAction) -> None:
    package = commands.add_parser("package", help="make a Greengrass model component from a model package")
    package.add_argument("model_dir", type=Path, help="model package directory")
    package.add_argument("--component-name", required=True, help="component name, also the model's name")
    package.add_argument("--component-version", help="X.Y.Z (default: from the model's version, else 1.0.0)")
    package.add_argument("--component-description", help="description shown in the Greengrass console")
    target = package.add_mutually_exclusive_group()
    target.add_argument("--target-device", help="a target device, e.g. jetson_xavier")
    target.add_argument("--target-platform", help="OS/ARCH[/ACCELERATOR], e.g. linux/x86_64/nvidia")
    package.add_argument(
        "--compiler-options", help='JSON, e.g. \'{"gpu-code": "sm_75", "trt-ver": "7.1.3", ...}\''
    )
    package.add_argument("--bucket", default="BUCKET", help="S3 bucket of the artifact URIs (default BUCKET)")
    package.add_argument("--prefix", default="", help="key prefix inside the bucket")
    package.add_argument("--out", type=Path, required=True, help="writes OUT/recipes/ and OUT/artifacts/")


def _run_package(args: argparse.Namespace) -> int:
    from lookout_edge.components.model import package_model
    from lookout_edge.components.targets import resolve_target

    try:
        target = resolve_target(args.target_device, args.target_platform, args.compiler_options)
        built = package_model(
            args.model_dir,
            args.out,
            args.component_name,
            target,
            args.component_version,
            args.bucket,
            args.prefix,
            args.component_description,
        )
    except (OSError, ValueError) as exc:  # TargetError, PackageError and RecipeError are ValueErrors
        print(f"lookout-edge package: {exc}", file=sys.stderr)
        return 1
    print(f"component {built.name} {built.version}: {built.recipe} and {built.artifact}")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from lookout_edge.trainer.evaluate import summary_lines
    from lookout_edge.trainer.progress import Progress
    from lookout_edge.trainer.train import TrainOptions, train

    progress = Progress(enabled=not args.json and sys.stderr.isatty())
    if args.kind != "anomaly":
        return _run_train_labels(args, progress)
    if not args.name:
        raise ValueError("an anomaly model needs --name, the component name clients will use")
    options = TrainOptions(
        short_side=args.short_side or 256,
        favour_recall=args.favour_recall,
        seed=args.seed,
        region=args.region,
    )
    result = train(args.dataset, args.out, args.name, args.test, options, progress)
    if args.json:
        print(
            json.dumps(
                {"package": str(result.package), "seconds": result.seconds, **result.evaluation}, indent=2
            )
        )
    else:
        print(f"model package written to {result.package} ({result.seconds['total']:.1f} s)")
        print("\n".join(summary_lines(result.evaluation)))
        print(f"report: {result.package / 'report.html'}")
    return 0


def _run_train_labels(args: argparse.Namespace, progress: Progress) -> int:
    from lookout_edge.trainer.labels.dataset import load_label_dataset
    from lookout_edge.trainer.labels.train import LabelTrainOptions, train_labels

    dataset = load_label_dataset(
        args.dataset, args.kind, test=args.test, s3_cache=args.s3_root, seed=args.seed
    )
    for warning in dataset.warnings:
        print(f"lookout-edge train: warning: {warning}", file=sys.stderr)
    project = args.project or (args.dataset.stem if args.dataset.is_file() else args.dataset.name)
    options = LabelTrainOptions(
        short_side=args.short_side, seed=args.seed, project_arn=args.project_arn, version_arn=args.version_arn
    )
    result = train_labels(dataset, args.out, project, args.version_name, options, progress)
    if args.json:
        print(
            json.dumps(
                {"package": str(result.package), "seconds": result.seconds, **result.summary}, indent=2
            )
        )
        return 0
    aggregate = result.summary["AggregatedEvaluationResults"]
    print(f"model package written to {result.package} ({result.seconds['total']:.1f} s)")
    print(
        f"test images {result.summary['EvaluationDetails']['NumberOfTestingImages']}: "
        f"F1 {aggregate['F1Score']:.3f}, precision {aggregate['Precision']:.3f}, "
        f"recall {aggregate['Recall']:.3f}"
        + (f", mAP {aggregate['AveragePrecision']:.3f}" if "AveragePrecision" in aggregate else "")
    )
    for row in result.summary["LabelEvaluationResults"]:
        metrics = row["Metrics"]
        print(
            f"  {row['Label']}: F1 {metrics['F1Score']:.3f}, precision {metrics['Precision']:.3f}, "
            f"recall {metrics['Recall']:.3f}, assumed threshold {100 * metrics['Threshold']:.1f}"
        )
    print(f"report: {result.package / 'report.html'}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from lookout_edge.trainer.evaluate import evaluate_package, summary_lines
    from lookout_edge.trainer.report import write_report

    evaluated = evaluate_package(args.model_dir, args.dataset)
    report = write_report(args.report, evaluated.metrics, evaluated.items)
    if args.json:
        print(json.dumps(evaluated.metrics, indent=2))
    else:
        print("\n".join(summary_lines(evaluated.metrics)))
        print(f"report: {report}")
    return 0


def _add_camera_parser(commands: argparse._SubParsersAction) -> None:
    camera = commands.add_parser("camera", help="run the camera daemon (cameras → agent → events)")
    camera.add_argument("--config", type=Path, required=True, help="YAML file (see docs/camera.md)")
    camera.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def _log_to_stderr(level: str) -> None:
    """Timestamped logs on standard error, which Greengrass captures into the component log."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _run_camera(args: argparse.Namespace) -> int:
    from lookout_edge.client.camera.config import ConfigError, load_config
    from lookout_edge.client.camera.daemon import CameraDaemon

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"lookout-edge camera: {exc}", file=sys.stderr)
        return 2
    _log_to_stderr(args.log_level)
    try:
        daemon = CameraDaemon(config)
    except OSError as exc:  # e.g. the dashboard's port is taken
        print(f"lookout-edge camera: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return daemon.run_until_signalled()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookout-edge", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lookout-edge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_agent_parser(commands)
    _add_client_parsers(commands)
    _add_trainer_parsers(commands)
    _add_revision_parsers(commands)
    _add_camera_parser(commands)
    _add_package_parser(commands)
    from lookout_edge.agent.rekognition import cli as rekognition

    rekognition.add_parser(commands)
    return parser


def _run_agent(args: argparse.Namespace) -> int:
    from lookout_edge.agent.config import ConfigError, load_config
    from lookout_edge.agent.server import serve

    overrides = {
        key: value
        for key, value in vars(args).items()
        if key not in ("command", "config") and value is not None
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"lookout-edge agent: {exc}", file=sys.stderr)
        return 2
    _log_to_stderr(config.log_level)
    return serve(config)


def _print(args: argparse.Namespace, data: object, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _run_models(args: argparse.Namespace) -> int:
    from lookout_edge.client.edge_client import EdgeAgentClient

    with EdgeAgentClient(args.socket) as client:
        if args.action == "list":
            states = client.list_models()
            lines = [f"{s.name}\t{s.status}\t{s.status_message}" for s in states] or ["(no models deployed)"]
            _print(args, [dataclasses.asdict(s) for s in states], "\n".join(lines))
        elif args.action == "describe":
            state = client.describe_model(args.name)
            _print(args, dataclasses.asdict(state), f"{state.name}\t{state.status}\t{state.status_message}")
        elif args.action == "start":
            if args.wait is not None:
                state = client.start_and_wait(args.name, timeout=args.wait)
                _print(args, dataclasses.asdict(state), f"{state.name}\t{state.status}")
            else:
                status = client.start_model(args.name)
                _print(args, {"name": args.name, "status": status}, f"{args.name}\t{status}")
        else:
            status = client.stop_model(args.name)
            _print(args, {"name": args.name, "status": status}, f"{args.name}\t{status}")
    return 0


def _run_detect_labels(args: argparse.Namespace) -> int:
    """DetectCustomLabels in this process, printed as the endpoint would answer it."""
    from lookout_edge.custom_labels import LabelModel, decode_image, read_label_package

    if args.min_confidence is not None and not 0 <= args.min_confidence <= 100:
        raise ValueError(f"--min-confidence {args.min_confidence} is outside 0..100")
    model = LabelModel(read_label_package(args.package))
    floor = None if args.min_confidence is None else args.min_confidence / 100
    results = []
    for path in args.images:
        predictions = model.predict(decode_image(path.read_bytes()), floor)
        labels = [
            {"Name": p.name, "Confidence": round(100 * p.confidence, 3)}
            | (
                {}
                if p.box is None
                else {"Geometry": {"BoundingBox": dict(zip(BOX_KEYS, p.box, strict=True))}}
            )
            for p in predictions
        ]
        results.append({"image": str(path), "CustomLabels": labels})
        if not args.json:
            shown = [
                f"{p.name} {100 * p.confidence:.1f}%"
                + ("" if p.box is None else " at " + ",".join(f"{value:.3f}" for value in p.box))
                for p in predictions
            ]
            print(f"{path}: " + ("; ".join(shown) or "no label"))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def _run_detect(args: argparse.Namespace) -> int:
    from lookout_edge.client.edge_client import EdgeAgentClient

    if args.package is not None:
        return _run_detect_labels(args)

    if args.mask_out:
        args.mask_out.mkdir(parents=True, exist_ok=True)
    results = []
    with EdgeAgentClient(args.socket) as client:
        for path in args.images:
            detection = client.detect(path, args.model, shared_memory=args.shm)
            record = {
                "image": str(path),
                "is_anomalous": detection.is_anomalous,
                "confidence": round(detection.confidence, 6),
                "anomaly_score": round(detection.anomaly_score, 6),
                "anomaly_threshold": round(detection.anomaly_threshold, 6),
                "anomalies": [dataclasses.asdict(a) for a in detection.anomalies],
            }
            if args.mask_out and detection.mask is not None:
                mask_path = args.mask_out / f"{path.stem}_mask.png"
                Image.fromarray(detection.mask).save(mask_path)
                record["mask"] = str(mask_path)
            results.append(record)
            if not args.json:
                verdict = "ANOMALOUS" if detection.is_anomalous else "normal"
                areas = ", ".join(
                    f"{a.name} {a.area:.2%}" for a in detection.anomalies if a.name != "background"
                )
                print(
                    f"{path}: {verdict} (score {detection.anomaly_score:.3f}, threshold "
                    f"{detection.anomaly_threshold:.3f}, confidence {detection.confidence:.3f})"
                    + (f" [{areas}]" if areas else "")
                )
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "agent":
        return _run_agent(args)
    if args.command == "camera":
        return _run_camera(args)
    if args.command == "package":
        return _run_package(args)
    if args.command == "rekognition":
        from lookout_edge.agent.rekognition import cli as rekognition

        return rekognition.run(args)
    if args.command in ("train", "evaluate", "calibrate", "update"):
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            if args.command in ("calibrate", "update"):
                return _run_revision(args)
            return _run_train(args) if args.command == "train" else _run_evaluate(args)
        except (OSError, ValueError) as exc:  # DatasetError and PackageError are ValueErrors
            print(f"lookout-edge {args.command}: {exc}", file=sys.stderr)
            return 1
    from lookout_edge.client.edge_client import EdgeAgentError

    try:
        if args.command == "models":
            return _run_models(args)
        return _run_detect(args)
    except EdgeAgentError as exc:
        print(f"lookout-edge {args.command}: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TimeoutError) as exc:
        print(f"lookout-edge {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
