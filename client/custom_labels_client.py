"""A typed Python client for the Rekognition Custom Labels API (lookout-edge's `rekognition`
endpoint or AWS), on http.client and the endpoint's SigV4 module: no boto3 needed at run time.

One client keeps one HTTP/1.1 connection open (a new connection per call would cost a TCP
handshake and a server thread each time) and may be shared between threads: calls take turns
on it. A connection the server closed while idle is replaced once, transparently."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from lookout_edge.agent.rekognition.sigv4 import Credentials, sign

__all__ = [
    "BoundingBox",
    "CustomLabel",
    "CustomLabelsClient",
    "CustomLabelsError",
    "Project",
    "ProjectVersion",
]

# Credentials for endpoints that accept any (lookout-edge's without a configured key).
ANONYMOUS = Credentials("lookout-edge", "lookout-edge")


class CustomLabelsError(Exception):
    """A failed call: the AWS error code (e.g. ResourceNotReadyException) and its message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class BoundingBox:
    left: float  # fractions of the image's width and height
    top: float
    width: float
    height: float


@dataclass(frozen=True)
class CustomLabel:
    name: str
    confidence: float  # percent, 0..100
    box: BoundingBox | None  # localisation models only


@dataclass(frozen=True)
class Project:
    arn: str
    created: datetime
    status: str


@dataclass(frozen=True)
class ProjectVersion:
    arn: str
    created: datetime
    status: str
    status_message: str
    min_inference_units: int | None
    f1_score: float | None

    @property
    def name(self) -> str:
        return self.arn.split("/version/", 1)[1].rpartition("/")[0]


def _time(value: float) -> datetime:
    return datetime.fromtimestamp(value, timezone.utc)


def _image_bytes(image: bytes | str | Path | np.ndarray | Image.Image) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


class CustomLabelsClient:
    def __init__(
        self,
        endpoint_url: str,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        region: str = "us-east-1",
        timeout: float = 30.0,
    ) -> None:
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("give both access_key_id and secret_access_key, or neither")
        self._url = endpoint_url.rstrip("/") + "/"
        parts = urlsplit(self._url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"endpoint_url {endpoint_url!r} is not an http:// or https:// URL")
        self._parts = parts
        self._credentials = (
            ANONYMOUS if access_key_id is None else Credentials(access_key_id, secret_access_key or "")
        )
        self._region = region
        self._timeout = timeout
        self._lock = threading.Lock()
        self._connection: http.client.HTTPConnection | None = None

    def __enter__(self) -> CustomLabelsClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """One signed AWS JSON 1.1 call; the response document, or CustomLabelsError."""
        body = json.dumps(params).encode()
        headers = {
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"RekognitionService.{operation}",
        }
        headers = sign("POST", self._url, headers, body, self._credentials, self._region, "rekognition")
        with self._lock:
            status, response_headers, raw = self._exchange(body, headers)
        if status < 400:
            document: dict[str, Any] = json.loads(raw or b"{}")
            return document
        try:
            error = json.loads(raw)
        except ValueError:
            error = {"message": raw.decode("utf-8", "replace")}
        code = str(error.get("__type") or response_headers.get("x-amzn-ErrorType") or status)
        raise CustomLabelsError(code.split(":")[0].rsplit("#")[-1], str(error.get("message", "")))

    def _exchange(self, body: bytes, headers: dict[str, str]) -> tuple[int, http.client.HTTPMessage, bytes]:
        """POST on the kept connection (called with the lock held). A kept connection the server
        has closed fails at once; the call then goes again, once, on a fresh one."""
        reused = self._connection is not None
        try:
            return self._post(body, headers)
        except (http.client.HTTPException, OSError) as exc:
            if not reused or isinstance(exc, TimeoutError):
                raise CustomLabelsError("ConnectionError", f"{self._url}: {exc}") from None
        try:
            return self._post(body, headers)
        except (http.client.HTTPException, OSError) as exc:
            raise CustomLabelsError("ConnectionError", f"{self._url}: {exc}") from None

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, http.client.HTTPMessage, bytes]:
        if self._connection is None:
            kind = (
                http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            )
            self._connection = kind(self._parts.hostname or "", self._parts.port, timeout=self._timeout)
        try:
            self._connection.request("POST", self._parts.path or "/", body, headers)
            response = self._connection.getresponse()
            raw = response.read()
        except BaseException:
            self._connection.close()
            self._connection = None
            raise
        if response.will_close:
            self._connection.close()
            self._connection = None
        return response.status, response.headers, raw

    def detect_custom_labels(
        self,
        image: bytes | str | Path | np.ndarray | Image.Image,
        project_version_arn: str,
        min_confidence: float | None = None,
        max_results: int | None = None,
    ) -> list[CustomLabel]:
        """DetectCustomLabels on image bytes (PNG/JPEG), a file, or pixels (sent as PNG)."""
        params: dict[str, Any] = {
            "ProjectVersionArn": project_version_arn,
            "Image": {"Bytes": base64.b64encode(_image_bytes(image)).decode()},
        }
        if min_confidence is not None:
            params["MinConfidence"] = min_confidence
        if max_results is not None:
            params["MaxResults"] = max_results
        labels = []
        for item in self.call("DetectCustomLabels", params).get("CustomLabels", []):
            box = item.get("Geometry", {}).get("BoundingBox")
            labels.append(
                CustomLabel(
                    item["Name"],
                    float(item["Confidence"]),
                    None
                    if box is None
                    else BoundingBox(box["Left"], box["Top"], box["Width"], box["Height"]),
                )
            )
        return labels

    def describe_projects(self, names: list[str] | None = None) -> list[Project]:
        params: dict[str, Any] = {} if names is None else {"ProjectNames": names}
        projects = []
        while True:
            response = self.call("DescribeProjects", params)
            projects += [
                Project(item["ProjectArn"], _time(item["CreationTimestamp"]), item.get("Status", ""))
                for item in response.get("ProjectDescriptions", [])
            ]
            if not response.get("NextToken"):
                return projects
            params["NextToken"] = response["NextToken"]

    def describe_project_versions(
        self, project_arn: str, version_names: list[str] | None = None
    ) -> list[ProjectVersion]:
        params: dict[str, Any] = {"ProjectArn": project_arn}
        if version_names is not None:
            params["VersionNames"] = version_names
        versions = []
        while True:
            response = self.call("DescribeProjectVersions", params)
            versions += [_version(item) for item in response.get("ProjectVersionDescriptions", [])]
            if not response.get("NextToken"):
                return versions
            params["NextToken"] = response["NextToken"]

    def describe_project_version(self, project_version_arn: str) -> ProjectVersion:
        """One version by its ARN. A version ARN holds its project's name but not the project ARN's
        creation time, so the project is looked up by name first."""
        project, _, rest = project_version_arn.partition(":project/")[2].partition("/version/")
        for found in self.describe_projects([project]) if project and rest else []:
            for version in self.describe_project_versions(found.arn, [rest.rpartition("/")[0]]):
                if version.arn == project_version_arn:
                    return version
        raise CustomLabelsError(
            "ResourceNotFoundException", f"the model {project_version_arn} does not exist"
        )

    def start_project_version(
        self, project_version_arn: str, min_inference_units: int = 1, max_inference_units: int | None = None
    ) -> str:
        params: dict[str, Any] = {
            "ProjectVersionArn": project_version_arn,
            "MinInferenceUnits": min_inference_units,
        }
        if max_inference_units is not None:
            params["MaxInferenceUnits"] = max_inference_units
        return str(self.call("StartProjectVersion", params)["Status"])

    def stop_project_version(self, project_version_arn: str) -> str:
        return str(self.call("StopProjectVersion", {"ProjectVersionArn": project_version_arn})["Status"])

    def wait_until_running(
        self, project_version_arn: str, timeout: float = 600.0, poll: float = 1.0
    ) -> ProjectVersion:
        """Poll until the version is RUNNING (as the project_version_running waiter);
        CustomLabelsError if it FAILED, TimeoutError when `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            version = self.describe_project_version(project_version_arn)
            if version.status == "RUNNING":
                return version
            if version.status == "FAILED":
                raise CustomLabelsError(
                    "ModelFailed", f"{project_version_arn} failed: {version.status_message}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{project_version_arn} is still {version.status} after {timeout:.0f} s")
            time.sleep(poll)


def _version(item: dict[str, Any]) -> ProjectVersion:
    evaluation = item.get("EvaluationResult", {})
    return ProjectVersion(
        arn=item["ProjectVersionArn"],
        created=_time(item["CreationTimestamp"]),
        status=item["Status"],
        status_message=item.get("StatusMessage", ""),
        min_inference_units=item.get("MinInferenceUnits"),
        f1_score=evaluation.get("F1Score"),
    )
