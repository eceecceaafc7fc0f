"""CreateProjectVersion: training in a subprocess, its outcome as the version's status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, WaiterError
from PIL import Image

from tests.rekognition.conftest import Endpoint
from tests.rekognition.label_models import colour_image


def wait_trained(client: Any, project_arn: str, version: str, attempts: int = 400) -> None:
    client.get_waiter("project_version_training_completed").wait(
        ProjectArn=project_arn, VersionNames=[version], WaiterConfig={"Delay": 0.1, "MaxAttempts": attempts}
    )


def write_manifest(folder: Path, images: int = 6) -> None:
    """A classification manifest of red and blue images, refs relative to its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(images):
        shade = 20 + 3 * index  # distinct images: the loader refuses duplicates
        label, colour = ("red", (230, shade, 20)) if index % 2 == 0 else ("blue", (20, shade, 230))
        Image.fromarray(colour_image(colour)).save(folder / f"{index}.png")
        lines.append(
            {
                "source-ref": f"{index}.png",
                "colour": 1,
                "colour-metadata": {
                    "class-name": label,
                    "type": "groundtruth/image-classification",
                    "confidence": 1,
                },
            }
        )
    (folder / "train.manifest").write_text("".join(json.dumps(line) + "\n" for line in lines))


def create(client: Any, project_arn: str, version: str, name: str = "data/train.manifest") -> str:
    arn: str = client.create_project_version(
        ProjectArn=project_arn,
        VersionName=version,
        OutputConfig={"S3Bucket": "bucket", "S3KeyPrefix": "output/"},
        TrainingData={"Assets": [{"GroundTruthManifest": {"S3Object": {"Bucket": "bucket", "Name": name}}}]},
        TestingData={"AutoCreate": True},
    )["ProjectVersionArn"]
    return arn


def test_bad_training_data_fails_the_training_not_the_request(fresh_endpoint: Any) -> None:
    served: Endpoint = fresh_endpoint()
    client = served.client()
    project_arn = client.create_project(ProjectName="trained")["ProjectArn"]
    arn = create(client, project_arn, "trained.missing", "data/missing.manifest")
    assert "/version/trained.missing/" in arn
    with pytest.raises(WaiterError):
        wait_trained(client, project_arn, "trained.missing")
    description = client.describe_project_versions(ProjectArn=project_arn)["ProjectVersionDescriptions"][0]
    assert description["Status"] == "TRAINING_FAILED" and "missing.manifest" in description["StatusMessage"]
    assert description["OutputConfig"] == {"S3Bucket": "bucket", "S3KeyPrefix": "output/"}
    with pytest.raises(ClientError) as caught:
        create(client, project_arn, "trained.missing")
    assert caught.value.response["Error"]["Code"] == "ResourceInUseException"
    with pytest.raises(ClientError) as caught:
        client.start_project_version(ProjectVersionArn=arn, MinInferenceUnits=1)
    assert caught.value.response["Error"]["Code"] == "ResourceInUseException"
    with pytest.raises(ClientError) as caught:
        create(client, project_arn.replace("trained", "nothing"), "v1")
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"


def test_training_data_the_trainer_refuses_fails_the_version_with_its_problems(fresh_endpoint: Any) -> None:
    served: Endpoint = fresh_endpoint()
    folder = served.s3_root / "bucket" / "data"
    write_manifest(folder)
    for image in folder.glob("*.png"):  # every line's image is gone: far above the 20 % tolerance
        image.unlink()
    client = served.client()
    project_arn = client.create_project(ProjectName="broken")["ProjectArn"]
    create(client, project_arn, "broken.v1")
    with pytest.raises(WaiterError):
        wait_trained(client, project_arn, "broken.v1", attempts=1200)
    (description,) = client.describe_project_versions(ProjectArn=project_arn)["ProjectVersionDescriptions"]
    assert description["Status"] == "TRAINING_FAILED"
    message = description["StatusMessage"]
    assert message.startswith("lookout-edge train: the dataset cannot be used") and "0.png" in message


def test_create_project_version_trains_a_model_that_then_serves(fresh_endpoint: Any) -> None:
    served: Endpoint = fresh_endpoint()
    write_manifest(served.s3_root / "bucket" / "data")
    client = served.client()
    project_arn = client.create_project(ProjectName="trained")["ProjectArn"]
    arn = create(client, project_arn, "trained.v1")
    described = client.describe_project_versions(ProjectArn=project_arn)["ProjectVersionDescriptions"][0]
    assert described["Status"] in ("TRAINING_IN_PROGRESS", "TRAINING_COMPLETED")
    try:
        wait_trained(client, project_arn, "trained.v1", attempts=1200)
    except WaiterError:
        description = client.describe_project_versions(ProjectArn=project_arn)["ProjectVersionDescriptions"][
            0
        ]
        pytest.fail(f"training failed: {description['StatusMessage']}")
    client.start_project_version(ProjectVersionArn=arn, MinInferenceUnits=1)
    client.get_waiter("project_version_running").wait(
        ProjectArn=project_arn, VersionNames=["trained.v1"], WaiterConfig={"Delay": 0.1, "MaxAttempts": 300}
    )
    image = served.s3_root / "bucket" / "data" / "0.png"
    labels = client.detect_custom_labels(ProjectVersionArn=arn, Image={"Bytes": image.read_bytes()})[
        "CustomLabels"
    ]
    assert labels[0]["Name"] == "red"
    # The package the trainer wrote carries the ARNs CreateProjectVersion answered with.
    (package,) = [p for p in served.models_dir.iterdir() if p.name.startswith("trained@")]
    manifest = json.loads((package / "manifest.json").read_text())
    assert (manifest["model_arn"], manifest["project_arn"]) == (arn, project_arn)


def test_a_version_is_looked_up_as_the_registry_holds_it_now(tmp_path: Path) -> None:
    """The catalog reads the registry again on each lookup: a training that ended since the last
    call shows at once (Start and Detect need no Describe in between)."""
    from datetime import datetime, timezone

    from lookout_edge.agent.rekognition.catalog import Catalog
    from lookout_edge.agent.rekognition.registry import ProjectRecord, Registry, VersionRecord
    from lookout_edge.agent.rekognition.training import FAILED, IN_PROGRESS, MESSAGES
    from lookout_edge.custom_labels import LabelModel, project_arn, version_arn

    created = datetime(2026, 12, 2, tzinfo=timezone.utc)
    registry = Registry(tmp_path)
    registry.add_project(ProjectRecord("cells", project_arn("cells", 1), created))
    record = VersionRecord(
        "cells", "v1", version_arn("cells", "v1", 2), created, IN_PROGRESS, MESSAGES[IN_PROGRESS]
    )
    registry.add_version(record)
    catalog = Catalog(tmp_path, registry, LabelModel, 1)
    assert catalog.version(record.arn).state() == (IN_PROGRESS, MESSAGES[IN_PROGRESS])
    registry.update_version(record, status=FAILED, status_message="the dataset cannot be used")
    assert catalog.version(record.arn).state() == (FAILED, "the dataset cannot be used")
