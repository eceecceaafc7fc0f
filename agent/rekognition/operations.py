"""The operations served: each takes a validated request (shapes.validate) and returns the
response document of botocore's Rekognition service model, or raises RekognitionError."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, UnidentifiedImageError

from lookout_edge.custom_labels import (
    DEFAULT_ACCOUNT,
    DEFAULT_REGION,
    ImageFormatError,
    LabelModel,
    Prediction,
    decode_image,
    project_arn,
    version_arn,
)
from lookout_edge.package import MAX_SIDE, MIN_SIDE, PackageError

from .catalog import Catalog, Project, Version
from .errors import (
    IMAGE_TOO_LARGE,
    INVALID_IMAGE_FORMAT,
    INVALID_PAGINATION_TOKEN,
    INVALID_PARAMETER,
    INVALID_S3_OBJECT,
    RESOURCE_IN_USE,
    RekognitionError,
)
from .hosting import ModelLoader
from .registry import ProjectRecord, Registry, VersionRecord
from .training import FAILED, IN_PROGRESS, MESSAGES, Trainer

MAX_IMAGE_BYTES = 4 * 1024 * 1024  # the guide's limit for an image sent as bytes
MAX_S3_IMAGE_BYTES = 15 * 1024 * 1024  # and for one read from S3
MAX_ASPECT_RATIO = 20
DEFAULT_PAGE_SIZE = 100
T = TypeVar("T")


@dataclass(frozen=True)
class EndpointConfig:
    models_dir: Path
    s3_root: Path | None = None  # S3 object s3://BUCKET/NAME is the file S3_ROOT/BUCKET/NAME
    region: str = DEFAULT_REGION
    account: str = DEFAULT_ACCOUNT
    queue: int = 8  # requests that may wait for a running model's inference units


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


class Service:
    """The Rekognition operations over one models directory."""

    def __init__(self, config: EndpointConfig, loader: ModelLoader = LabelModel) -> None:
        self.config = config
        registry = Registry(config.models_dir)
        self.trainer = Trainer(config.models_dir, registry, config.s3_root)
        self.catalog = Catalog(config.models_dir, registry, loader, config.queue)
        self._registry = registry
        self.catalog.scan()
        self.operations: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "CreateProject": self.create_project,
            "CreateProjectVersion": self.create_project_version,
            "DescribeProjectVersions": self.describe_project_versions,
            "DescribeProjects": self.describe_projects,
            "DetectCustomLabels": self.detect_custom_labels,
            "StartProjectVersion": self.start_project_version,
            "StopProjectVersion": self.stop_project_version,
        }

    def close(self) -> None:
        self.trainer.close()

    # DetectCustomLabels

    def detect_custom_labels(self, params: dict[str, Any]) -> dict[str, Any]:
        version = self.catalog.version(params["ProjectVersionArn"])
        # Read and decoded before taking an inference unit, which only the inference needs.
        rgb = _decode(self._image_bytes(params["Image"]))
        min_confidence = params.get("MinConfidence")
        with version.hosting.serving() as model:
            predictions = model.predict(rgb, None if min_confidence is None else min_confidence / 100.0)
        if "MaxResults" in params:
            predictions = predictions[: params["MaxResults"]]
        return {"CustomLabels": [_custom_label(prediction) for prediction in predictions]}

    def _image_bytes(self, image: dict[str, Any]) -> bytes:
        if ("Bytes" in image) == ("S3Object" in image):
            raise RekognitionError(INVALID_PARAMETER, "Image must have exactly one of Bytes and S3Object")
        if "Bytes" in image:
            data: bytes = image["Bytes"]
            if len(data) > MAX_IMAGE_BYTES:
                raise RekognitionError(
                    IMAGE_TOO_LARGE,
                    f"the image is {len(data)} bytes; images sent as bytes must be under 4 MB",
                )
            return data
        path = self._s3_path(image["S3Object"], INVALID_S3_OBJECT)
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_S3_IMAGE_BYTES + 1)
        except OSError as exc:
            raise RekognitionError(
                INVALID_S3_OBJECT, f"the S3 object cannot be read: {exc.strerror}"
            ) from None
        if len(data) > MAX_S3_IMAGE_BYTES:
            raise RekognitionError(
                IMAGE_TOO_LARGE, "the S3 object is larger than 15 MB, the most an image may be"
            )
        return data

    def _s3_path(self, s3_object: dict[str, Any], code: str) -> Path:
        """The file of an S3 object (its Version is not kept: a folder has one version of a file)."""
        root = self.config.s3_root
        if root is None:
            raise RekognitionError(code, "this endpoint maps no S3 buckets (start it with --s3-root)")
        if "Bucket" not in s3_object or "Name" not in s3_object:
            raise RekognitionError(INVALID_PARAMETER, "S3Object needs a Bucket and a Name")
        path = (root / s3_object["Bucket"] / s3_object["Name"]).resolve()
        if (root.resolve() / s3_object["Bucket"]).resolve() not in path.parents or not path.is_file():
            raise RekognitionError(
                code, f"the S3 object s3://{s3_object['Bucket']}/{s3_object['Name']} does not exist"
            )
        return path

    # Projects and versions

    def describe_projects(self, params: dict[str, Any]) -> dict[str, Any]:
        projects = sorted(self.catalog.scan().values(), key=lambda item: item.created, reverse=True)
        names = params.get("ProjectNames")
        if names is not None:
            projects = [project for project in projects if project.name in names]
        if "CUSTOM_LABELS" not in params.get("Features", ["CUSTOM_LABELS"]):
            projects = []
        page, token = _page(projects, params, [names, params.get("Features")])
        return {
            "ProjectDescriptions": [_project_description(project) for project in page],
            "NextToken": token,
        }

    def describe_project_versions(self, params: dict[str, Any]) -> dict[str, Any]:
        project = self.catalog.project(params["ProjectArn"])
        versions = sorted(project.versions, key=lambda item: item.created, reverse=True)
        names = params.get("VersionNames")
        if names is not None:
            versions = [version for version in versions if version.name in names]
        page, token = _page(versions, params, [project.arn, names])
        return {
            "ProjectVersionDescriptions": [self._version_description(v) for v in page],
            "NextToken": token,
        }

    def _version_description(self, version: Version) -> dict[str, Any]:
        status, message = version.state()
        record, package = version.record, version.package
        description: dict[str, Any] = {
            "ProjectVersionArn": version.arn,
            "CreationTimestamp": version.created,
            "Status": status,
            "StatusMessage": message,
            "MinInferenceUnits": version.hosting.min_units,
            "MaxInferenceUnits": version.hosting.max_units,
            "Feature": "CUSTOM_LABELS",
        }
        ended = record.training_ended if record is not None else package.created if package else None
        if ended is not None:
            description["TrainingEndTimestamp"] = ended
            description["BillableTrainingTimeInSeconds"] = max(
                0, int((ended - version.created).total_seconds())
            )
        if record is not None:
            request = record.request
            description["OutputConfig"] = request.get("OutputConfig")
            description["TrainingDataResult"] = {"Input": request.get("TrainingData")}
            description["TestingDataResult"] = {"Input": request.get("TestingData")}
            description["VersionDescription"] = request.get("VersionDescription")
            if "TrainingData" in request:
                description["ManifestSummary"] = request["TrainingData"]["Assets"][0]["GroundTruthManifest"]
        evaluation = _evaluation(version)
        if evaluation is not None:
            description["EvaluationResult"] = {
                "F1Score": evaluation,
                "Summary": {"S3Object": record.summary} if record and record.summary else None,
            }
        return description

    def start_project_version(self, params: dict[str, Any]) -> dict[str, Any]:
        version = self.catalog.version(params["ProjectVersionArn"])
        minimum, maximum = params["MinInferenceUnits"], params.get("MaxInferenceUnits")
        if maximum is not None and maximum < minimum:
            raise RekognitionError(
                INVALID_PARAMETER, "MaxInferenceUnits must not be less than MinInferenceUnits"
            )
        status, _ = version.state()
        if status in (IN_PROGRESS, FAILED):
            raise RekognitionError(
                RESOURCE_IN_USE, f"the model is {status}; only a trained model can be started"
            )
        return {"Status": version.hosting.start(version.package, minimum, maximum)}

    def stop_project_version(self, params: dict[str, Any]) -> dict[str, Any]:
        version = self.catalog.version(params["ProjectVersionArn"])
        return {"Status": version.hosting.stop()}

    def create_project(self, params: dict[str, Any]) -> dict[str, Any]:
        if params.get("Feature", "CUSTOM_LABELS") != "CUSTOM_LABELS":
            raise RekognitionError(INVALID_PARAMETER, "this endpoint serves CUSTOM_LABELS projects only")
        name, created = params["ProjectName"], _now()
        arn = project_arn(name, _millis(created), self.config.region, self.config.account)
        self.catalog.scan()
        if not self.catalog.add_project(ProjectRecord(name, arn, created)):
            raise RekognitionError(RESOURCE_IN_USE, f"a project named {name} already exists")
        return {"ProjectArn": arn}

    def create_project_version(self, params: dict[str, Any]) -> dict[str, Any]:
        project = self.catalog.project(params["ProjectArn"])
        name = params["VersionName"]
        manifest, test_manifest = self._training_manifests(params)
        created = _now()
        arn = version_arn(project.name, name, _millis(created), self.config.region, self.config.account)
        record = VersionRecord(project.name, name, arn, created, IN_PROGRESS, MESSAGES[IN_PROGRESS], params)
        if any(version.name == name for version in project.versions) or not self._registry.add_version(
            record
        ):
            raise RekognitionError(RESOURCE_IN_USE, f"the project {project.name} has a version named {name}")
        self.trainer.start(record, manifest, test_manifest)
        self.catalog.scan()
        return {"ProjectVersionArn": arn}

    def _training_manifests(self, params: dict[str, Any]) -> tuple[Path, Path | None]:
        def manifest(data: dict[str, Any], member: str) -> Path:
            assets = data.get("Assets", [])
            if len(assets) != 1 or "S3Object" not in assets[0].get("GroundTruthManifest", {}):
                raise RekognitionError(
                    INVALID_PARAMETER, f"{member}.Assets must hold one GroundTruthManifest with an S3Object"
                )
            s3_object = assets[0]["GroundTruthManifest"]["S3Object"]
            root = self.config.s3_root
            if root is None:
                raise RekognitionError(
                    INVALID_PARAMETER, "this endpoint maps no S3 buckets (start it with --s3-root)"
                )
            path = (root / s3_object.get("Bucket", "") / s3_object.get("Name", "")).resolve()
            if root.resolve() not in path.parents:
                raise RekognitionError(INVALID_PARAMETER, f"{member}'s S3Object lies outside its bucket")
            return path

        if "TrainingData" not in params:
            raise RekognitionError(
                INVALID_PARAMETER,
                "TrainingData is required: this endpoint has no project datasets to train from",
            )
        testing = params.get("TestingData", {})
        if testing.get("AutoCreate") and "Assets" in testing:
            raise RekognitionError(INVALID_PARAMETER, "TestingData takes Assets or AutoCreate, not both")
        test = manifest(testing, "TestingData") if "Assets" in testing else None
        return manifest(params["TrainingData"], "TrainingData"), test


def _decode(data: bytes) -> Any:
    """The RGB pixels of an image within the guide's limits (sides 64..4096 px, aspect ratio up to 20:1),
    its size checked from its header before its pixels are decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise RekognitionError(
            INVALID_IMAGE_FORMAT, "the image is not a readable PNG or JPEG image"
        ) from None
    if max(width, height) > MAX_SIDE:
        raise RekognitionError(
            IMAGE_TOO_LARGE, f"the image is {width}x{height}; its sides may be at most {MAX_SIDE} px"
        )
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise RekognitionError(
            INVALID_IMAGE_FORMAT,
            f"the image is {width}x{height}; its sides must be at least {MIN_SIDE} px, "
            f"its aspect ratio at most {MAX_ASPECT_RATIO}:1",
        )
    try:
        return decode_image(data)
    except ImageFormatError as exc:
        raise RekognitionError(INVALID_IMAGE_FORMAT, str(exc)) from None


def _custom_label(prediction: Prediction) -> dict[str, Any]:
    label: dict[str, Any] = {"Name": prediction.name, "Confidence": prediction.confidence * 100.0}
    if prediction.box is not None:
        left, top, width, height = prediction.box
        label["Geometry"] = {"BoundingBox": {"Width": width, "Height": height, "Left": left, "Top": top}}
    return label


def _project_description(project: Project) -> dict[str, Any]:
    return {
        "ProjectArn": project.arn,
        "CreationTimestamp": project.created,
        "Status": "CREATED",
        "Feature": "CUSTOM_LABELS",
    }


def _evaluation(version: Version) -> float | None:
    """The F1 score of the package's evaluation summary, if it has one."""
    if version.package is None:
        return None
    try:
        summary = version.package.evaluation()
    except PackageError:
        return None
    score = (summary or {}).get("AggregatedEvaluationResults", {}).get("F1Score")
    return float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None


def _page(items: Sequence[T], params: dict[str, Any], query: object) -> tuple[Sequence[T], str | None]:
    """One page of `items` and the NextToken of the next one; a token holds its offset and a
    digest of the filter it was issued for, so a token of another query is refused."""
    digest = hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]
    offset = 0
    if "NextToken" in params:
        try:
            token = json.loads(base64.urlsafe_b64decode(params["NextToken"].encode()))
            offset = int(token["offset"])
            valid = token["query"] == digest and offset >= 0
        except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError):
            valid = False
        if not valid:
            raise RekognitionError(INVALID_PAGINATION_TOKEN, "the NextToken was not issued for this request")
    size = params.get("MaxResults", DEFAULT_PAGE_SIZE)
    end = offset + size
    token = None
    if end < len(items):
        token = base64.urlsafe_b64encode(json.dumps({"offset": end, "query": digest}).encode()).decode()
    return items[offset:end], token


__all__ = ["EndpointConfig", "Service"]
