"""AWS Signature Version 4, both ways: `sign` (the typed client) and `verify` (the endpoint).

The one place that knows the algorithm (docs.aws.amazon.com/general/latest/gr/sigv4_signing.html):
canonical request, string to sign, signing key, Authorization header. It follows botocore's
signer for what botocore sends (tests/rekognition/test_sigv4.py signs one request both ways):
the path is quoted once more, the query is sorted as sent, header values are whitespace-trimmed,
and the payload hash is `X-Amz-Content-SHA256` when present, else the body's SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_SKEW = timedelta(minutes=15)
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_AUTHORIZATION = re.compile(
    rf"^{ALGORITHM} +Credential=(?P<credential>[^,\s]+), *SignedHeaders=(?P<signed>[^,\s]+), *"
    r"Signature=(?P<signature>[0-9a-f]{64})$"
)


class SignatureError(Exception):
    """A request whose signature cannot be accepted; `code` is the AWS error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None


def _stamp(moment: datetime) -> str:
    return moment.strftime(TIMESTAMP_FORMAT)


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode("utf-8"), hashlib.sha256).digest()


def signing_key(secret_access_key: str, date: str, region: str, service: str) -> bytes:
    key = _hmac(f"AWS4{secret_access_key}".encode(), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def canonical_request(
    method: str,
    path: str,
    query: str,
    headers: Iterable[tuple[str, str]],
    signed: list[str],
    payload_hash: str,
) -> str:
    """The canonical request of the SigV4 specification; `headers` are (name, value) pairs as sent."""
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(" ".join(value.split()))
    lines = [f"{name}:{','.join(values.get(name, []))}" for name in signed]
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&")) if query else []
    return "\n".join(
        [
            method.upper(),
            quote(path or "/", safe="/~"),
            "&".join(f"{key}={value}" for key, value in pairs),
            "\n".join(lines) + "\n",
            ";".join(signed),
            payload_hash,
        ]
    )


def _signature(secret: str, timestamp: str, scope: str, request: str, region: str, service: str) -> str:
    string_to_sign = "\n".join(
        [ALGORITHM, timestamp, scope, hashlib.sha256(request.encode("utf-8")).hexdigest()]
    )
    key = signing_key(secret, timestamp[:8], region, service)
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: Credentials,
    region: str,
    service: str,
    now: datetime | None = None,
) -> dict[str, str]:
    """`headers` plus Host, X-Amz-Date, X-Amz-Security-Token (with a session token) and the
    Authorization header that signs them all."""
    parts = urlsplit(url)
    timestamp = (now or datetime.now(timezone.utc)).strftime(TIMESTAMP_FORMAT)
    signed_headers = {name: value for name, value in headers.items() if name.lower() != "authorization"}
    signed_headers.setdefault("Host", parts.netloc)
    signed_headers["X-Amz-Date"] = timestamp
    if credentials.session_token:
        signed_headers["X-Amz-Security-Token"] = credentials.session_token
    names = sorted({name.lower() for name in signed_headers})
    request = canonical_request(
        method, parts.path, parts.query, signed_headers.items(), names, hashlib.sha256(body).hexdigest()
    )
    scope = f"{timestamp[:8]}/{region}/{service}/aws4_request"
    signature = _signature(credentials.secret_access_key, timestamp, scope, request, region, service)
    signed_headers["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={signature}"
    )
    return signed_headers


def verify(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    secret_for: Callable[[str], str | None],
    region: str,
    service: str,
    now: datetime | None = None,
) -> str:
    """Check a request's Authorization header; the access key id it was signed with.

    `target` is the request line's path and query, `headers` every header as received, and
    `secret_for` the secret access key of an access key id (None: unknown). Raises SignatureError
    with the code AWS returns for each failure.
    """
    by_name: dict[str, str] = {}
    for name, value in headers:
        by_name.setdefault(name.lower(), value)
    authorization = by_name.get("authorization")
    if authorization is None:
        raise SignatureError("MissingAuthenticationTokenException", "Missing Authentication Token")
    match = _AUTHORIZATION.match(authorization.strip())
    if match is None:
        raise SignatureError(
            "IncompleteSignatureException",
            f"Authorization header requires the {ALGORITHM} parameters Credential, SignedHeaders, Signature",
        )
    credential = match["credential"].split("/")
    if len(credential) != 5 or credential[4] != "aws4_request":
        raise SignatureError(
            "IncompleteSignatureException", "Credential must be <key>/<date>/<region>/<service>/aws4_request"
        )
    key_id, date, scope_region, scope_service, _ = credential
    secret = secret_for(key_id)
    if secret is None:
        raise SignatureError(
            "UnrecognizedClientException", "The security token included in the request is invalid."
        )
    if scope_service != service:
        raise SignatureError(
            "InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'."
        )
    if scope_region != region:
        raise SignatureError(
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region, not '{scope_region}'.",
        )
    timestamp = by_name.get("x-amz-date", "")
    try:
        signed_at = datetime.strptime(timestamp, TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise SignatureError(
            "IncompleteSignatureException", "the X-Amz-Date header must hold a time as YYYYMMDDTHHMMSSZ"
        ) from None
    if date != timestamp[:8]:
        raise SignatureError(
            "InvalidSignatureException",
            f"Date in Credential scope does not match YYYYMMDD from X-Amz-Date: {date} != {timestamp[:8]}",
        )
    current = now or datetime.now(timezone.utc)
    if abs(current - signed_at) > MAX_SKEW:
        raise SignatureError(
            "InvalidSignatureException",
            f"Signature expired: {timestamp} is now earlier than {_stamp(current - MAX_SKEW)} "
            f"({_stamp(current)} - 15 min.)"
            if signed_at < current
            else f"Signature not yet current: {timestamp} is still later than {_stamp(current + MAX_SKEW)} "
            f"({_stamp(current)} + 15 min.)",
        )
    signed = match["signed"].split(";")
    if "host" not in signed or "x-amz-date" not in signed or signed != sorted(set(signed)):
        raise SignatureError(
            "InvalidSignatureException", "SignedHeaders must list host and x-amz-date, sorted and unique"
        )
    payload_hash = hashlib.sha256(body).hexdigest()
    declared = by_name.get("x-amz-content-sha256")
    if declared is not None and declared not in (payload_hash, UNSIGNED_PAYLOAD):
        raise SignatureError(
            "InvalidSignatureException", "X-Amz-Content-SHA256 does not match the request body"
        )
    path, _, query = target.partition("?")
    request = canonical_request(method, path, query, headers, signed, declared or payload_hash)
    expected = _signature(secret, timestamp, "/".join(credential[1:]), request, region, service)
    if not hmac.compare_digest(expected, match["signature"]):
        raise SignatureError(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your "
            "AWS Secret Access Key and signing method. Consult the service documentation for details.",
        )
    return key_id
