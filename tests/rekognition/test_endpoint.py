"""The guide's flows through boto3 against the endpoint on loopback, and every error it returns."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, WaiterError

from lookout_edge.agent.rekognition.sigv4 import Credentials
from lookout_edge.client.custom_labels_client import CustomLabelsClient, CustomLabelsError
from tests.rekognition.conftest import KEY_ID, SECRET, Endpoint, arns, wait_running
from tests.rekognition.label_models import colour_image, png

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def error_code(call: Any, **params: Any) -> str:
    with pytest.raises(ClientError) as caught:
        call(**params)
    code: str = caught.value.response["Error"]["Code"]
    return code


@pytest.fixture(scope="module")
def running(endpoint: Endpoint) -> dict[str, str]:
    """Version ARNs by name, colours.v1 and halves.v1 started and RUNNING."""
    client = endpoint.client()
    result = {}
    for project in ("colours", "halves"):
        project_arn, versions = arns(client, project)
        result.update(versions)
        result[project] = project_arn
    for project, version in (("colours", "colours.v1"), ("halves", "halves.v1")):
        started = client.start_project_version(ProjectVersionArn=result[version], MinInferenceUnits=1)
        assert started["Status"] == "STARTING"
        wait_running(client, result[project], version)
    return result


def test_describe_lists_packages_as_projects_and_versions(endpoint: Endpoint) -> None:
    client = endpoint.client()
    projects = client.describe_projects()["ProjectDescriptions"]
    assert {p["ProjectArn"].split("/")[1] for p in projects} >= {"colours", "halves"}
    assert all(isinstance(p["CreationTimestamp"], datetime) and p["Status"] == "CREATED" for p in projects)
    project_arn, _ = arns(client, "colours")
    versions = client.describe_project_versions(ProjectArn=project_arn)["ProjectVersionDescriptions"]
    assert [v["ProjectVersionArn"].split("/")[3] for v in versions] == [
        "colours.v2",
        "colours.v1",
    ]  # newest first
    described = versions[1]
    assert described["EvaluationResult"]["F1Score"] == pytest.approx(0.9)
    assert described["TrainingEndTimestamp"] == described["CreationTimestamp"]
    page = client.describe_project_versions(ProjectArn=project_arn, MaxResults=1)
    assert len(page["ProjectVersionDescriptions"]) == 1 and page["NextToken"]
    rest = client.describe_project_versions(ProjectArn=project_arn, MaxResults=1, NextToken=page["NextToken"])
    assert rest["ProjectVersionDescriptions"][0]["ProjectVersionArn"] == versions[1]["ProjectVersionArn"]
    assert "NextToken" not in rest
    assert (
        error_code(client.describe_projects, NextToken=page["NextToken"]) == "InvalidPaginationTokenException"
    )
    paginator = client.get_paginator("describe_projects")
    names = [
        p["ProjectArn"]
        for page in paginator.paginate(PaginationConfig={"PageSize": 1})
        for p in page["ProjectDescriptions"]
    ]
    assert len(names) == len(projects)
    assert client.describe_projects(ProjectNames=["nothing"])["ProjectDescriptions"] == []


def test_detect_with_and_without_min_confidence_and_max_results(
    endpoint: Endpoint, running: dict[str, str]
) -> None:
    client = endpoint.client()
    image = {"Bytes": png(colour_image(RED))}
    labels = client.detect_custom_labels(ProjectVersionArn=running["colours.v1"], Image=image)["CustomLabels"]
    assert [label["Name"] for label in labels] == ["red"]  # assumed thresholds of 0.5
    assert labels[0]["Confidence"] == pytest.approx(99.99, abs=0.01) and "Geometry" not in labels[0]
    every = client.detect_custom_labels(ProjectVersionArn=running["colours.v1"], Image=image, MinConfidence=0)
    assert every["CustomLabels"][0]["Name"] == "red" and len(every["CustomLabels"]) == 3
    confidences = [label["Confidence"] for label in every["CustomLabels"]]
    assert confidences == sorted(confidences, reverse=True)
    top = client.detect_custom_labels(
        ProjectVersionArn=running["colours.v1"], Image=image, MinConfidence=0, MaxResults=1
    )
    assert len(top["CustomLabels"]) == 1
    boxes = client.detect_custom_labels(
        ProjectVersionArn=running["halves.v1"], Image={"Bytes": png(colour_image(GREEN, BLUE))}
    )["CustomLabels"]
    assert {label["Name"]: label["Geometry"]["BoundingBox"] for label in boxes} == {
        "green": {"Width": 0.5, "Height": 1.0, "Left": 0.0, "Top": 0.0},
        "blue": {"Width": 0.5, "Height": 1.0, "Left": 0.5, "Top": 0.0},
    }
    (endpoint.s3_root / "bucket" / "images").mkdir(exist_ok=True)
    (endpoint.s3_root / "bucket" / "images" / "blue.png").write_bytes(png(colour_image(BLUE)))
    from_s3 = client.detect_custom_labels(
        ProjectVersionArn=running["colours.v1"],
        Image={"S3Object": {"Bucket": "bucket", "Name": "images/blue.png"}},
    )
    assert [label["Name"] for label in from_s3["CustomLabels"]] == ["blue"]


def test_detect_errors(endpoint: Endpoint, running: dict[str, str]) -> None:
    client = endpoint.client(parameter_validation=False)  # what botocore would refuse reaches the endpoint
    arn = running["colours.v1"]
    detect = client.detect_custom_labels
    image = {"Bytes": png(colour_image(RED))}
    assert (
        error_code(detect, ProjectVersionArn=arn, Image={"Bytes": b"not an image"})
        == "InvalidImageFormatException"
    )
    assert (
        error_code(detect, ProjectVersionArn=arn, Image={"Bytes": b"\x00" * (4 * 1024 * 1024 + 1)})
        == "ImageTooLargeException"
    )
    s3 = {"S3Object": {"Bucket": "bucket", "Name": "missing.png"}}
    assert error_code(detect, ProjectVersionArn=arn, Image=s3) == "InvalidS3ObjectException"
    escape = {"S3Object": {"Bucket": "bucket", "Name": "../../models/colours-v1/manifest.json"}}
    assert error_code(detect, ProjectVersionArn=arn, Image=escape) == "InvalidS3ObjectException"
    for bad in (100.5, -1):
        assert (
            error_code(detect, ProjectVersionArn=arn, Image=image, MinConfidence=bad)
            == "InvalidParameterException"
        )
    assert error_code(detect, ProjectVersionArn=arn, Image={}) == "InvalidParameterException"
    unknown = arn.replace("colours.v1", "colours.v9")
    assert error_code(detect, ProjectVersionArn=unknown, Image=image) == "ResourceNotFoundException"
    assert (
        error_code(detect, ProjectVersionArn=running["colours.v2"], Image=image)
        == "ResourceNotReadyException"
    )
    tiny = png(colour_image(RED)[:32, :32])
    assert error_code(detect, ProjectVersionArn=arn, Image={"Bytes": tiny}) == "InvalidImageFormatException"


def test_lifecycle_errors_and_stop(endpoint: Endpoint, running: dict[str, str]) -> None:
    client = endpoint.client(parameter_validation=False)
    start = client.start_project_version
    assert (
        error_code(start, ProjectVersionArn=running["colours.v1"], MinInferenceUnits=1)
        == "ResourceInUseException"
    )
    assert (
        error_code(start, ProjectVersionArn=running["colours.v2"], MinInferenceUnits=0)
        == "InvalidParameterException"
    )
    assert (
        error_code(start, ProjectVersionArn=running["colours.v2"], MinInferenceUnits=2, MaxInferenceUnits=1)
        == "InvalidParameterException"
    )
    assert (
        error_code(client.stop_project_version, ProjectVersionArn=running["colours.v2"])
        == "ResourceInUseException"
    )
    missing_project = running["colours"].replace("colours", "nothing")
    assert (
        error_code(client.describe_project_versions, ProjectArn=missing_project)
        == "ResourceNotFoundException"
    )
    assert error_code(client.describe_project_versions, ProjectArn="arn:bad") == "InvalidParameterException"
    assert error_code(client.create_project, ProjectName="colours") == "ResourceInUseException"
    assert error_code(client.create_project, ProjectName="bad name!") == "InvalidParameterException"
    created = client.create_project(ProjectName="empty-project")["ProjectArn"]
    assert client.describe_project_versions(ProjectArn=created)["ProjectVersionDescriptions"] == []
    assert error_code(client.create_project, ProjectName="empty-project") == "ResourceInUseException"
    # multi-label: started with two inference units, then stopped
    assert start(ProjectVersionArn=running["colours.v2"], MinInferenceUnits=2)["Status"] == "STARTING"
    wait_running(client, running["colours"], "colours.v2")
    both = client.detect_custom_labels(
        ProjectVersionArn=running["colours.v2"], Image={"Bytes": png(colour_image((255, 255, 0)))}
    )
    assert sorted(label["Name"] for label in both["CustomLabels"]) == ["green", "red"]
    assert client.stop_project_version(ProjectVersionArn=running["colours.v2"])["Status"] == "STOPPING"
    for _ in range(200):
        described = client.describe_project_versions(
            ProjectArn=running["colours"], VersionNames=["colours.v2"]
        )
        if described["ProjectVersionDescriptions"][0]["Status"] == "STOPPED":
            break
    assert described["ProjectVersionDescriptions"][0]["Status"] == "STOPPED"
    image = {"Bytes": png(colour_image(RED))}
    assert (
        error_code(client.detect_custom_labels, ProjectVersionArn=running["colours.v2"], Image=image)
        == "ResourceNotReadyException"
    )


def test_a_model_that_cannot_load_fails_its_start(fresh_endpoint: Any) -> None:
    served = fresh_endpoint()
    model = served.models_dir / "colours-v1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    client = served.client()
    project_arn, versions = arns(client, "colours")
    client.start_project_version(ProjectVersionArn=versions["colours.v1"], MinInferenceUnits=1)
    with pytest.raises(WaiterError):
        wait_running(client, project_arn, "colours.v1")
    version = client.describe_project_versions(ProjectArn=project_arn, VersionNames=["colours.v1"])
    description = version["ProjectVersionDescriptions"][0]
    assert description["Status"] == "FAILED" and "SHA-256" in description["StatusMessage"]


def test_full_queue_is_provisioned_throughput_exceeded(fresh_endpoint: Any) -> None:
    served = fresh_endpoint(queue=0)
    client = served.client()
    project_arn, versions = arns(client, "colours")
    client.start_project_version(ProjectVersionArn=versions["colours.v1"], MinInferenceUnits=1)
    wait_running(client, project_arn, "colours.v1")
    hosting = served.server.service.catalog.version(versions["colours.v1"]).hosting
    image = {"Bytes": png(colour_image(RED))}
    with hosting.serving():  # the one inference unit is taken and nothing may wait
        code = error_code(client.detect_custom_labels, ProjectVersionArn=versions["colours.v1"], Image=image)
    assert code == "ProvisionedThroughputExceededException"
    assert client.detect_custom_labels(ProjectVersionArn=versions["colours.v1"], Image=image)["CustomLabels"]


def test_signatures_are_verified_when_a_key_is_configured(fresh_endpoint: Any) -> None:
    served = fresh_endpoint(credentials=Credentials(KEY_ID, SECRET))
    assert served.client().describe_projects()["ProjectDescriptions"]
    assert error_code(served.client(secret="wrong").describe_projects) == "InvalidSignatureException"
    assert error_code(served.client(key_id="AKIDOTHER").describe_projects) == "UnrecognizedClientException"
    assert error_code(served.client(region="eu-west-1").describe_projects) == "InvalidSignatureException"
    typed = CustomLabelsClient(served.url, KEY_ID, SECRET)
    assert {project.arn.split("/")[1] for project in typed.describe_projects()} == {"colours", "halves"}
    with pytest.raises(CustomLabelsError) as caught:
        CustomLabelsClient(served.url, KEY_ID, "wrong").describe_projects()
    assert caught.value.code == "InvalidSignatureException"
    with pytest.raises(CustomLabelsError) as caught:
        CustomLabelsClient(served.url).describe_projects()
    assert caught.value.code == "UnrecognizedClientException"


def test_the_typed_client_keeps_its_connection_and_replaces_one_the_server_closed(endpoint: Endpoint) -> None:
    with CustomLabelsClient(endpoint.url) as typed:
        assert typed.describe_projects()
        kept = typed._connection
        assert kept is not None and typed.describe_projects() and typed._connection is kept
        time.sleep(1.5)  # the endpoint shuts connections idle for longer than its read timeout (1 s)
        assert typed.describe_projects()
        assert typed._connection is not kept


SECOND_PROCESS = textwrap.dedent(
    """
    import json, sys
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError
    url, project_arn, arn, image = sys.argv[1:]
    client = boto3.client("rekognition", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
                          config=Config(retries={"total_max_attempts": 1}))
    data = open(image, "rb").read()
    try:
        client.detect_custom_labels(ProjectVersionArn=arn, Image={"Bytes": data})
    except ClientError as exc:
        print(exc.response["Error"]["Code"], flush=True)
    waiter = client.get_waiter("project_version_running")
    waiter.wait(ProjectArn=project_arn, VersionNames=[arn.split("/")[3]],
                WaiterConfig={"Delay": 0.05, "MaxAttempts": 400})
    labels = client.detect_custom_labels(ProjectVersionArn=arn, Image={"Bytes": data})["CustomLabels"]
    print(json.dumps([label["Name"] for label in labels]), flush=True)
    """
)


def test_second_process_detects_while_the_model_starts(fresh_endpoint: Any, tmp_path: Path) -> None:
    served = fresh_endpoint()
    served.gate.clear()  # the model stays STARTING until the other process has been refused
    client = served.client()
    project_arn, versions = arns(client, "halves")
    assert (
        client.start_project_version(ProjectVersionArn=versions["halves.v1"], MinInferenceUnits=1)["Status"]
        == "STARTING"
    )
    image = tmp_path / "image.png"
    image.write_bytes(png(colour_image(RED, GREEN)))
    other = subprocess.Popen(
        [sys.executable, "-c", SECOND_PROCESS, served.url, project_arn, versions["halves.v1"], str(image)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None
        assert other.stdout.readline().strip() == "ResourceNotReadyException"
        served.gate.set()
        assert sorted(json.loads(other.stdout.readline())) == ["green", "red"]
        assert other.wait(timeout=30) == 0
    finally:
        other.kill()


def test_typed_client(endpoint: Endpoint, running: dict[str, str]) -> None:
    client = CustomLabelsClient(endpoint.url)
    version = client.describe_project_version(running["halves.v1"])
    assert version.status == "RUNNING" and version.min_inference_units == 1 and version.name == "halves.v1"
    assert client.wait_until_running(running["halves.v1"]).status == "RUNNING"
    labels = client.detect_custom_labels(colour_image(BLUE, RED), running["halves.v1"], min_confidence=50)
    assert {label.name: label.box.left for label in labels if label.box} == {"blue": 0.0, "red": 0.5}
    assert (
        len(client.detect_custom_labels(png(colour_image(RED)), running["colours.v1"], 0, max_results=2)) == 2
    )
    with pytest.raises(CustomLabelsError) as caught:
        client.detect_custom_labels(b"junk", running["colours.v1"])
    assert caught.value.code == "InvalidImageFormatException"
