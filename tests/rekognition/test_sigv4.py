"""The one SigV4 implementation against botocore's signer, both ways."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from lookout_edge.agent.rekognition.sigv4 import Credentials, SignatureError, sign, verify

NOW = datetime(2026, 12, 2, 10, 15, 30, tzinfo=timezone.utc)
URL = "http://127.0.0.1:8480/"
HEADERS = {
    "Content-Type": "application/x-amz-json-1.1",
    "X-Amz-Target": "RekognitionService.DescribeProjects",
}
BODY = b'{"MaxResults": 5}'


def botocore_signed(token: str | None = None) -> dict[str, str]:
    request = AWSRequest(method="POST", url=URL, data=BODY, headers=dict(HEADERS))
    with mock.patch("botocore.auth.get_current_datetime", return_value=NOW.replace(tzinfo=None)):
        SigV4Auth(BotoCredentials("AKIDEXAMPLE", "secret", token), "rekognition", "us-east-1").add_auth(
            request
        )
    return dict(request.headers.items())


@pytest.mark.parametrize("token", [None, "session-token"])
def test_sign_matches_botocore(token: str | None) -> None:
    ours = sign(
        "POST",
        URL,
        HEADERS,
        BODY,
        Credentials("AKIDEXAMPLE", "secret", token),
        "us-east-1",
        "rekognition",
        NOW,
    )
    assert ours["Authorization"] == botocore_signed(token)["Authorization"]


def check(headers: dict[str, str], body: bytes = BODY, now: datetime = NOW, region: str = "us-east-1") -> str:
    received = (
        [*headers.items(), ("Host", "127.0.0.1:8480")] if "Host" not in headers else list(headers.items())
    )
    return verify("POST", "/", received, body, {"AKIDEXAMPLE": "secret"}.get, region, "rekognition", now)


def test_verify_accepts_botocore_and_names_each_failure() -> None:
    signed = botocore_signed()
    assert check(signed) == "AKIDEXAMPLE"
    failures = {
        "InvalidSignatureException": [
            lambda: check(signed, body=b"{}"),
            lambda: check(signed, now=NOW + timedelta(minutes=16)),
            lambda: check(signed, now=NOW - timedelta(minutes=16)),
            lambda: check(signed, region="eu-west-1"),
            lambda: check({**signed, "X-Amz-Target": "RekognitionService.CreateProject"}),
        ],
        "UnrecognizedClientException": [
            lambda: check(
                {**signed, "Authorization": signed["Authorization"].replace("AKIDEXAMPLE", "AKIDOTHER")}
            )
        ],
        "MissingAuthenticationTokenException": [
            lambda: check({k: v for k, v in signed.items() if k != "Authorization"})
        ],
        "IncompleteSignatureException": [
            lambda: check({**signed, "Authorization": "AWS4-HMAC-SHA256 nonsense"})
        ],
    }
    for code, calls in failures.items():
        for call in calls:
            with pytest.raises(SignatureError) as caught:
                call()
            assert caught.value.code == code
    assert check(signed, now=NOW + timedelta(minutes=14)) == "AKIDEXAMPLE"
