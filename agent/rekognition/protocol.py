"""AWS JSON 1.1 on the wire: the operation named by `X-Amz-Target`, JSON bodies in and out.

Requests are `POST /` with `Content-Type: application/x-amz-json-1.1` and
`X-Amz-Target: RekognitionService.<Operation>`. Responses carry the same content type; errors
put their code both in the body's `__type` and in the `x-amzn-ErrorType` header (botocore reads
the body, other SDKs the header). Timestamps travel as epoch seconds, blobs as base64 strings
(decoded by `shapes.validate`).
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from .errors import SERIALIZATION, UNKNOWN_OPERATION, RekognitionError

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "RekognitionService."


def operation_name(target: str | None, operations: frozenset[str]) -> str:
    """The operation an `X-Amz-Target` header names; UnknownOperationException for any other."""
    if target and target.startswith(TARGET_PREFIX) and target[len(TARGET_PREFIX) :] in operations:
        return target[len(TARGET_PREFIX) :]
    raise RekognitionError(UNKNOWN_OPERATION, f"the operation {target!r} is not served by this endpoint")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_body(body: bytes) -> dict[str, Any]:
    """A request body's JSON object (an empty body is `{}`, as AWS reads it)."""
    if not body.strip():
        return {}
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise RekognitionError(SERIALIZATION, "the request body is not UTF-8") from None
    except RecursionError:
        raise RekognitionError(SERIALIZATION, "the request body nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers of thousands of digits
        raise RekognitionError(SERIALIZATION, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RekognitionError(SERIALIZATION, "the request body must be a JSON object")
    return data


def _wire_value(value: object) -> object:
    if isinstance(value, datetime):
        return round(value.timestamp(), 3)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"{type(value).__name__} has no JSON form")


def encode(document: dict[str, Any]) -> bytes:
    """A response body: `document` without its None members, datetimes as epoch seconds."""
    return json.dumps(_without_none(document), default=_wire_value, separators=(",", ":")).encode()


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


def error_document(error: RekognitionError) -> dict[str, Any]:
    return {"__type": error.code, "message": error.message, "Message": error.message, "Code": error.code}
