"""The request shapes of the operations served, as botocore's Rekognition service model defines
them, and the validation AWS applies to them before an operation runs.

`SHAPES` is the service model's input shapes reduced to what validation reads (type, members,
required, min, max, pattern, enum); tests/rekognition/test_shapes.py checks it against botocore's
service-2.json, so it cannot drift. Patterns are Java regular expressions matched against the whole
value; the tag patterns' Unicode classes are approximated by Python's `\\w` and `\\s`.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from functools import cache
from typing import Any

from .errors import INVALID_PARAMETER, SERIALIZATION, RekognitionError

OPERATIONS = {
    "CreateProject": "CreateProjectRequest",
    "CreateProjectVersion": "CreateProjectVersionRequest",
    "DescribeProjectVersions": "DescribeProjectVersionsRequest",
    "DescribeProjects": "DescribeProjectsRequest",
    "DetectCustomLabels": "DetectCustomLabelsRequest",
    "StartProjectVersion": "StartProjectVersionRequest",
    "StopProjectVersion": "StopProjectVersionRequest",
}

_ARN = r"[a-zA-Z0-9_.\-]{1,255}"
_ARN_PREFIX = r"(^arn:[a-z\d-]+:rekognition:[a-z\d-]+:\d{12}:project\/"
SHAPES: dict[str, dict[str, Any]] = {
    "Asset": {"type": "structure", "members": {"GroundTruthManifest": "GroundTruthManifest"}},
    "Assets": {"type": "list", "member": "Asset"},
    "Boolean": {"type": "boolean"},
    "CreateProjectRequest": {
        "type": "structure",
        "required": ["ProjectName"],
        "members": {
            "ProjectName": "ProjectName",
            "Feature": "CustomizationFeature",
            "AutoUpdate": "ProjectAutoUpdate",
            "Tags": "TagMap",
        },
    },
    "CreateProjectVersionRequest": {
        "type": "structure",
        "required": ["ProjectArn", "VersionName", "OutputConfig"],
        "members": {
            "ProjectArn": "ProjectArn",
            "VersionName": "VersionName",
            "OutputConfig": "OutputConfig",
            "TrainingData": "TrainingData",
            "TestingData": "TestingData",
            "Tags": "TagMap",
            "KmsKeyId": "KmsKeyId",
            "VersionDescription": "VersionDescription",
            "FeatureConfig": "CustomizationFeatureConfig",
        },
    },
    "CustomizationFeature": {"type": "string", "enum": ["CONTENT_MODERATION", "CUSTOM_LABELS"]},
    "CustomizationFeatureConfig": {
        "type": "structure",
        "members": {"ContentModeration": "CustomizationFeatureContentModerationConfig"},
    },
    "CustomizationFeatureContentModerationConfig": {
        "type": "structure",
        "members": {"ConfidenceThreshold": "Percent"},
    },
    "CustomizationFeatures": {"type": "list", "max": 2, "min": 1, "member": "CustomizationFeature"},
    "DescribeProjectVersionsRequest": {
        "type": "structure",
        "required": ["ProjectArn"],
        "members": {
            "ProjectArn": "ProjectArn",
            "VersionNames": "VersionNames",
            "NextToken": "ExtendedPaginationToken",
            "MaxResults": "ProjectVersionsPageSize",
        },
    },
    "DescribeProjectsRequest": {
        "type": "structure",
        "members": {
            "NextToken": "ExtendedPaginationToken",
            "MaxResults": "ProjectsPageSize",
            "ProjectNames": "ProjectNames",
            "Features": "CustomizationFeatures",
        },
    },
    "DetectCustomLabelsRequest": {
        "type": "structure",
        "required": ["ProjectVersionArn", "Image"],
        "members": {
            "ProjectVersionArn": "ProjectVersionArn",
            "Image": "Image",
            "MaxResults": "UInteger",
            "MinConfidence": "Percent",
        },
    },
    "ExtendedPaginationToken": {"type": "string", "max": 1024},
    "GroundTruthManifest": {"type": "structure", "members": {"S3Object": "S3Object"}},
    "Image": {"type": "structure", "members": {"Bytes": "ImageBlob", "S3Object": "S3Object"}},
    "ImageBlob": {"type": "blob", "max": 5242880, "min": 1},
    "InferenceUnits": {"type": "integer", "min": 1},
    "KmsKeyId": {
        "type": "string",
        "max": 2048,
        "min": 1,
        "pattern": "^[A-Za-z0-9][A-Za-z0-9:_/+=,@.-]{0,2048}$",
    },
    "OutputConfig": {"type": "structure", "members": {"S3Bucket": "S3Bucket", "S3KeyPrefix": "S3KeyPrefix"}},
    "Percent": {"type": "float", "max": 100, "min": 0},
    "ProjectArn": {
        "type": "string",
        "max": 2048,
        "min": 20,
        "pattern": rf"{_ARN_PREFIX}{_ARN}\/[0-9]+$)",
    },
    "ProjectAutoUpdate": {"type": "string", "enum": ["ENABLED", "DISABLED"]},
    "ProjectName": {"type": "string", "max": 255, "min": 1, "pattern": r"[a-zA-Z0-9_.\-]+"},
    "ProjectNames": {"type": "list", "max": 10, "min": 1, "member": "ProjectName"},
    "ProjectVersionArn": {
        "type": "string",
        "max": 2048,
        "min": 20,
        "pattern": rf"{_ARN_PREFIX}{_ARN}\/version\/{_ARN}\/[0-9]+$)",
    },
    "ProjectVersionsPageSize": {"type": "integer", "max": 100, "min": 1},
    "ProjectsPageSize": {"type": "integer", "max": 100, "min": 1},
    "S3Bucket": {"type": "string", "max": 255, "min": 3, "pattern": r"[0-9A-Za-z\.\-_]*"},
    "S3KeyPrefix": {"type": "string", "max": 1024},
    "S3Object": {
        "type": "structure",
        "members": {"Bucket": "S3Bucket", "Name": "S3ObjectName", "Version": "S3ObjectVersion"},
    },
    "S3ObjectName": {"type": "string", "max": 1024, "min": 1},
    "S3ObjectVersion": {"type": "string", "max": 1024, "min": 1},
    "StartProjectVersionRequest": {
        "type": "structure",
        "required": ["ProjectVersionArn", "MinInferenceUnits"],
        "members": {
            "ProjectVersionArn": "ProjectVersionArn",
            "MinInferenceUnits": "InferenceUnits",
            "MaxInferenceUnits": "InferenceUnits",
        },
    },
    "StopProjectVersionRequest": {
        "type": "structure",
        "required": ["ProjectVersionArn"],
        "members": {"ProjectVersionArn": "ProjectVersionArn"},
    },
    "TagKey": {"type": "string", "max": 128, "min": 1, "pattern": r"^(?!aws:)[\p{L}\p{Z}\p{N}_.:/=+\-@]*$"},
    "TagMap": {"type": "map", "max": 200, "min": 0, "key": "TagKey", "value": "TagValue"},
    "TagValue": {"type": "string", "max": 256, "min": 0, "pattern": r"^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$"},
    "TestingData": {"type": "structure", "members": {"Assets": "Assets", "AutoCreate": "Boolean"}},
    "TrainingData": {"type": "structure", "members": {"Assets": "Assets"}},
    "UInteger": {"type": "integer", "min": 0},
    "VersionDescription": {"type": "string", "max": 255, "min": 1, "pattern": "[a-zA-Z0-9-_. ()':,;?]+"},
    "VersionName": {"type": "string", "max": 255, "min": 1, "pattern": r"[a-zA-Z0-9_.\-]+"},
    "VersionNames": {"type": "list", "max": 10, "min": 1, "member": "VersionName"},
}


@cache
def _pattern(java: str) -> re.Pattern[str]:
    return re.compile(java.replace(r"\p{L}\p{Z}\p{N}", r"\w\s"))


def validate(operation: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` checked against the operation's request shape, blobs decoded to bytes.

    Members the shape does not know are dropped, as AWS ignores them. The first problem raises
    InvalidParameterException naming the member (undecodable base64 is a SerializationException).
    """
    value: dict[str, Any] = _check(OPERATIONS[operation], params, "")
    return value


def _bad(where: str, what: str) -> RekognitionError:
    return RekognitionError(INVALID_PARAMETER, f"{where or 'the request'} {what}")


def _check(shape_name: str, value: Any, where: str) -> Any:
    shape = SHAPES[shape_name]
    kind = shape["type"]
    if kind == "structure":
        if not isinstance(value, dict):
            raise _bad(where, "must be an object")
        for member in shape.get("required", ()):
            if value.get(member) is None:
                raise _bad(f"{where}{member}", "is required")
        return {
            member: _check(shape["members"][member], item, f"{where}{member}.")
            for member, item in value.items()
            if member in shape["members"] and item is not None
        }
    where = where.rstrip(".")
    if kind == "list":
        if not isinstance(value, list):
            raise _bad(where, "must be a list")
        _check_size(shape, len(value), where, "items")
        return [_check(shape["member"], item, f"{where}[{index}]") for index, item in enumerate(value)]
    if kind == "map":
        if not isinstance(value, dict):
            raise _bad(where, "must be an object")
        _check_size(shape, len(value), where, "entries")
        for key, item in value.items():
            _check(shape["key"], key, f"{where} key")
            _check(shape["value"], item, f"{where}[{key!r}]")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise _bad(where, "must be a string")
        _check_size(shape, len(value), where, "characters")
        if "enum" in shape and value not in shape["enum"]:
            raise _bad(where, f"must be one of {', '.join(shape['enum'])}")
        if "pattern" in shape and not _pattern(shape["pattern"]).fullmatch(value):
            raise _bad(where, f"does not match the pattern {shape['pattern']}")
        return value
    if kind == "blob":
        # The size limit is the operation's (DetectCustomLabels: ImageTooLargeException), not here.
        if not isinstance(value, str):
            raise _bad(where, "must be a base64 string")
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise RekognitionError(SERIALIZATION, f"{where} is not valid base64") from None
        _check_size({"min": shape.get("min", 0)}, len(data), where, "bytes")
        return data
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _bad(where, "must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, "must be a number")
    if kind in ("integer", "long") and not (isinstance(value, int) or float(value).is_integer()):
        raise _bad(where, "must be an integer")
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(where, "must be a finite number")
    if value < shape.get("min", -math.inf) or value > shape.get("max", math.inf):
        raise _bad(where, f"must be in {shape.get('min', '-∞')}..{shape.get('max', '∞')}")
    return int(value) if kind in ("integer", "long") else float(value)


def _check_size(shape: dict[str, Any], size: int, where: str, unit: str) -> None:
    if size < shape.get("min", 0):
        raise _bad(where, f"must have at least {shape['min']} {unit}")
    if size > shape.get("max", size):
        raise _bad(where, f"must have at most {shape['max']} {unit}")
