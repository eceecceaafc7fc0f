"""The request shapes are botocore's, and validation reads them as AWS does."""

from __future__ import annotations

import base64
import re
from typing import Any

import botocore.session
import pytest

from lookout_edge.agent.rekognition.errors import RekognitionError
from lookout_edge.agent.rekognition.shapes import OPERATIONS, SHAPES, validate
from lookout_edge.custom_labels import project_arn, project_of_arn, version_arn, version_of_arn

KEYS = ("type", "required", "min", "max", "pattern", "enum")


def test_shapes_are_the_service_models() -> None:
    model = botocore.session.get_session().get_service_model("rekognition")
    raw = model._shape_resolver._shape_map
    seen: dict[str, dict[str, Any]] = {}

    def walk(name: str) -> None:
        if name in seen:
            return
        shape = raw[name]
        reduced = {key: shape[key] for key in KEYS if key in shape}
        if shape["type"] == "structure":
            reduced["members"] = {member: ref["shape"] for member, ref in shape["members"].items()}
            for ref in shape["members"].values():
                walk(ref["shape"])
        elif shape["type"] == "list":
            reduced["member"] = shape["member"]["shape"]
            walk(shape["member"]["shape"])
        elif shape["type"] == "map":
            reduced["key"], reduced["value"] = shape["key"]["shape"], shape["value"]["shape"]
            walk(reduced["key"])
            walk(reduced["value"])
        seen[name] = reduced

    for operation, shape in OPERATIONS.items():
        assert model.operation_model(operation).input_shape.name == shape
        walk(shape)
    assert seen == SHAPES


def test_validation() -> None:
    arn = "arn:aws:rekognition:us-east-1:000000000000:project/p/version/v/1"
    image = base64.b64encode(b"png").decode()
    assert validate(
        "DetectCustomLabels", {"ProjectVersionArn": arn, "Image": {"Bytes": image}, "Extra": 1}
    ) == {
        "ProjectVersionArn": arn,
        "Image": {"Bytes": b"png"},
    }
    bad = [
        ("DetectCustomLabels", {"Image": {"Bytes": image}}, "InvalidParameterException"),
        ("DetectCustomLabels", {"ProjectVersionArn": arn + "x", "Image": {}}, "InvalidParameterException"),
        (
            "DetectCustomLabels",
            {"ProjectVersionArn": arn, "Image": {"Bytes": "***"}},
            "SerializationException",
        ),
        (
            "DetectCustomLabels",
            {"ProjectVersionArn": arn, "Image": {}, "MaxResults": 1.5},
            "InvalidParameterException",
        ),
        (
            "DetectCustomLabels",
            {"ProjectVersionArn": arn, "Image": {}, "MinConfidence": True},
            "InvalidParameterException",
        ),
        ("DescribeProjects", {"ProjectNames": ["a"] * 11}, "InvalidParameterException"),
        ("CreateProject", {"ProjectName": "p", "Tags": {"aws:x": "y"}}, "InvalidParameterException"),
        ("CreateProject", {"ProjectName": "p", "AutoUpdate": "SOMETIMES"}, "InvalidParameterException"),
        (
            "StartProjectVersion",
            {"ProjectVersionArn": arn, "MinInferenceUnits": 0},
            "InvalidParameterException",
        ),
    ]
    for operation, params, code in bad:
        with pytest.raises(RekognitionError) as caught:
            validate(operation, params)
        assert caught.value.code == code, params
    assert validate("CreateProject", {"ProjectName": "p", "Tags": {"line": "Straße 1"}})["Tags"] == {
        "line": "Straße 1"
    }


def test_the_arns_written_are_the_services_and_read_back() -> None:
    """project_arn / version_arn match botocore's ARN patterns and parse back to their names;
    anything else parses to None (the catalog then answers ResourceNotFoundException)."""
    model = botocore.session.get_session().get_service_model("rekognition")
    project, version = project_arn("cells", 1700000000000), version_arn("cells", "v1", 1700000000123)
    assert re.fullmatch(model.shape_for("ProjectArn").metadata["pattern"], project)
    assert re.fullmatch(model.shape_for("ProjectVersionArn").metadata["pattern"], version)
    assert project_of_arn(project) == "cells" and version_of_arn(version) == ("cells", "v1")
    assert project_of_arn(version) is None and version_of_arn(project) is None
    for other in ("", "cells", "arn:aws:s3:::bucket/key", project + "/extra"):
        assert project_of_arn(other) is None and version_of_arn(other) is None
