"""An endpoint on loopback over a models directory of rule-based packages, and boto3 clients of it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from lookout_edge.agent.rekognition.operations import EndpointConfig, Service
from lookout_edge.agent.rekognition.server import RekognitionServer
from lookout_edge.agent.rekognition.sigv4 import Credentials
from lookout_edge.custom_labels import LabelModel, LabelPackage
from tests.rekognition.label_models import write_label_package

KEY_ID, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
NO_RETRIES = Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=20)


@dataclass
class Endpoint:
    server: RekognitionServer
    models_dir: Path
    s3_root: Path
    gate: threading.Event  # models finish loading only while it is set

    @property
    def url(self) -> str:
        return self.server.url

    def client(
        self, secret: str = SECRET, key_id: str = KEY_ID, region: str = "us-east-1", **config: Any
    ) -> Any:
        return boto3.client(
            "rekognition",
            endpoint_url=self.url,
            region_name=region,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            config=NO_RETRIES.merge(Config(**config)) if config else NO_RETRIES,
        )


def write_models(models_dir: Path) -> dict[str, LabelPackage]:
    return {
        "classification": write_label_package(
            models_dir / "colours-v1", "classification", "colours", "colours.v1"
        ),
        "multi-label": write_label_package(
            models_dir / "colours-v2",
            "multi-label",
            "colours",
            "colours.v2",
            created=datetime(2026, 12, 3, tzinfo=timezone.utc),
        ),
        "localisation": write_label_package(models_dir / "halves-v1", "localisation", "halves", "halves.v1"),
    }


def start_endpoint(tmp: Path, credentials: Credentials | None = None, **config: Any) -> Endpoint:
    models_dir, s3_root = tmp / "models", tmp / "s3"
    models_dir.mkdir(exist_ok=True)
    (s3_root / "bucket").mkdir(parents=True, exist_ok=True)
    if not any(models_dir.iterdir()):
        write_models(models_dir)
    gate = threading.Event()
    gate.set()

    def load(package: LabelPackage) -> LabelModel:
        gate.wait(30)
        return LabelModel(package)

    service = Service(EndpointConfig(models_dir, s3_root, **config), loader=load)
    server = RekognitionServer(service, credentials=credentials, read_timeout=1.0).start()
    return Endpoint(server, models_dir, s3_root, gate)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """An endpoint without a configured key (any credentials are accepted)."""
    served = start_endpoint(tmp_path_factory.mktemp("endpoint"))
    yield served
    served.server.close()


@pytest.fixture
def fresh_endpoint(tmp_path: Path) -> Iterator[Callable[..., Endpoint]]:
    """Endpoints of this test alone, made with `start_endpoint`'s options."""
    started: list[Endpoint] = []

    def make(**options: Any) -> Endpoint:
        started.append(start_endpoint(tmp_path, **options))
        return started[-1]

    yield make
    for served in started:
        served.server.close()


def wait_running(client: Any, project_arn: str, version: str) -> None:
    client.get_waiter("project_version_running").wait(
        ProjectArn=project_arn, VersionNames=[version], WaiterConfig={"Delay": 0.05, "MaxAttempts": 400}
    )


def arns(client: Any, project: str) -> tuple[str, dict[str, str]]:
    """A project's ARN and its versions' ARNs by version name."""
    project_arn = client.describe_projects(ProjectNames=[project])["ProjectDescriptions"][0]["ProjectArn"]
    versions = client.describe_project_versions(ProjectArn=project_arn)["ProjectVersionDescriptions"]
    return project_arn, {
        v["ProjectVersionArn"].split("/version/")[1].split("/")[0]: v["ProjectVersionArn"] for v in versions
    }
