"""Who may use a local cloud's API: signed requests with its own credentials, on its host.

Each cloud makes a random access key id and secret (:class:`Credentials`), written 0600
into its state dir. :func:`check_request` verifies a request as EC2 does: the ``Host``
header must name this endpoint (no DNS rebinding from a web page), and the signature,
SigV4 (``Authorization: AWS4-HMAC-SHA256 ...``) or SigV2 (``SignatureVersion=2`` among
the parameters, as older Query-API clients sign), must be the one the secret gives.
The signatures are recomputed with botocore's own signers over the request as received,
not with crypto written here.

A cloud also makes a second, read-only pair; :func:`signer` tells which pair a request
names, and :mod:`._iam` what that pair may call.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import hmac
import os
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import SigV2Auth, SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials as BotoCredentials

SERVICES = ("ec2", "kms")  # KMS: the keys EC2's encryption names (._kms)
MAX_SKEW = timedelta(minutes=15)  # EC2 refuses requests signed longer ago (or ahead)
_SIGV4 = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request,\s*SignedHeaders=(?P<headers>[a-z0-9;-]+),\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})\s*$"
)


class AuthFailure(Exception):
    """A request that is not this cloud's: its code and message go back as EC2's error."""

    def __init__(self, message: str, code: str = "AuthFailure", status: int = 401) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class Credentials:
    """The access key id and secret of one local cloud."""

    access_key_id: str
    secret_access_key: str

    @classmethod
    def generate(cls) -> Credentials:
        """New random credentials, shaped like AWS's (``AKIA`` + 16, 40-character secret)."""
        alphabet = string.ascii_uppercase + string.digits
        key = "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))
        secret = base64.b64encode(secrets.token_bytes(30)).decode()
        return cls(key, secret)

    def write(self, path: Path, others: Mapping[str, Credentials] = {}) -> None:
        """An AWS shared-credentials file (``[default]``, then a profile for each of
        ``others`` by name), mode 0600 from the start."""
        config = configparser.ConfigParser()
        for profile, pair in {"default": self, **others}.items():
            config[profile] = pair.as_kwargs()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            config.write(f)

    def as_kwargs(self) -> dict[str, str]:
        return {
            "aws_access_key_id": self.access_key_id,
            "aws_secret_access_key": self.secret_access_key,
        }


def signer(
    environ: dict[str, Any], params: dict[str, str], pairs: Sequence[Credentials]
) -> Credentials:
    """The pair among ``pairs`` whose access key id the request names (the first when
    none does: its check then refuses the request)."""
    m = _SIGV4.match(environ.get("HTTP_AUTHORIZATION", ""))
    key = m["key"] if m else params.get("AWSAccessKeyId")
    return next((p for p in pairs if p.access_key_id == key), pairs[0])


def check_host(environ: dict[str, Any], port: int) -> None:
    """Refuse a ``Host`` that is not this endpoint's (``127.0.0.1:PORT``, ``localhost:PORT``)."""
    host = environ.get("HTTP_HOST", "")
    if host.lower() not in {f"127.0.0.1:{port}", f"localhost:{port}"}:
        raise AuthFailure(
            f"Host header {host!r} is not this endpoint's (127.0.0.1:{port}): refused",
            code="InvalidHost",
            status=403,
        )


def check_request(
    environ: dict[str, Any], body: bytes, params: dict[str, str], credentials: Credentials
) -> None:
    """Raise :class:`AuthFailure` unless the request is signed with ``credentials``."""
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    if authorization:
        _check_sigv4(environ, body, authorization, credentials)
    elif "Signature" in params and "AWSAccessKeyId" in params:
        _check_sigv2(environ, params, credentials)
    elif "X-Amz-Signature" in params:
        raise AuthFailure("presigned (query string) SigV4 requests are not supported here")
    else:
        raise AuthFailure("the request is not signed (no Authorization header, no Signature)")


def _url(environ: dict[str, Any]) -> str:
    path = environ.get("RAW_URI") or environ.get("REQUEST_URI") or ""
    if not path:
        path = quote(environ.get("PATH_INFO", "") or "/")
        if environ.get("QUERY_STRING"):
            path += "?" + environ["QUERY_STRING"]
    return f"http://{environ.get('HTTP_HOST', '')}{path}"


def _header(environ: dict[str, Any], name: str) -> str | None:
    if name == "content-type":
        return environ.get("CONTENT_TYPE")
    if name == "content-length":
        return environ.get("CONTENT_LENGTH")
    value = environ.get("HTTP_" + name.upper().replace("-", "_"))
    return None if value is None else str(value)


class _Verifier(SigV4Auth):  # type: ignore[misc]
    """botocore's SigV4 signer, signing exactly the headers the client signed."""

    def __init__(self, credentials: Any, service: str, region: str, signed: list[str]) -> None:
        super().__init__(credentials, service, region)
        self._signed = signed

    def headers_to_sign(self, request: Any) -> Any:
        headers = HTTPHeaders()
        for name in self._signed:
            headers[name] = request.headers[name]
        return headers


def _check_sigv4(
    environ: dict[str, Any], body: bytes, authorization: str, credentials: Credentials
) -> None:
    m = _SIGV4.match(authorization)
    if m is None:
        raise AuthFailure("the Authorization header is not a valid AWS4-HMAC-SHA256 signature")
    if m["key"] != credentials.access_key_id:
        raise AuthFailure("AWS was not able to validate the provided access credentials")
    stamp = _header(environ, "x-amz-date") or ""
    try:
        when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise AuthFailure("the request has no valid X-Amz-Date") from None
    _check_time(when)
    # the region of the scope chooses the records the request sees (the caller: ._api)
    if not stamp.startswith(m["date"]) or m["service"] not in SERVICES:
        raise AuthFailure(f"the credential scope {m['date']}/{m['region']}/{m['service']} is wrong")
    claimed = _header(environ, "x-amz-content-sha256")
    if claimed is not None and claimed != hashlib.sha256(body).hexdigest():
        raise AuthFailure("X-Amz-Content-SHA256 does not match the body")
    signed = m["headers"].split(";")
    headers: dict[str, str] = {}
    for name in signed:
        value = _header(environ, name)
        if value is None:
            raise AuthFailure(f"the signed header {name!r} is missing")
        headers[name] = value
    if "host" not in signed:
        raise AuthFailure("the Host header must be signed")
    request = AWSRequest(
        method=environ["REQUEST_METHOD"], url=_url(environ), headers=headers, data=body
    )
    request.context["timestamp"] = stamp
    verifier = _Verifier(
        BotoCredentials(*credentials.as_kwargs().values()), m["service"], m["region"], signed
    )
    expected = verifier.signature(
        verifier.string_to_sign(request, verifier.canonical_request(request)), request
    )
    if not hmac.compare_digest(expected, m["signature"]):
        raise AuthFailure(
            "AWS was not able to validate the provided access credentials "
            "(the request signature does not match)"
        )


def _check_sigv2(environ: dict[str, Any], params: dict[str, str], credentials: Credentials) -> None:
    if params.get("SignatureVersion") != "2":
        raise AuthFailure(f"SignatureVersion {params.get('SignatureVersion')!r} is not supported")
    if params["AWSAccessKeyId"] != credentials.access_key_id:
        raise AuthFailure("AWS was not able to validate the provided access credentials")
    if "Expires" in params:
        expires = _iso_time(params["Expires"])
        if expires < datetime.now(UTC):
            raise AuthFailure(
                f"Request has expired (Expires {params['Expires']})", "RequestExpired"
            )
    elif "Timestamp" in params:
        _check_time(_iso_time(params["Timestamp"]))
    else:
        raise AuthFailure("a SigV2 request needs a Timestamp or an Expires parameter")
    request = AWSRequest(method=environ["REQUEST_METHOD"], url=_url(environ).split("?")[0])
    unsigned = {k: v for k, v in params.items() if k != "Signature"}
    method = params.get("SignatureMethod")
    if method == "HmacSHA256":
        _, expected = SigV2Auth(BotoCredentials(*credentials.as_kwargs().values())).calc_signature(
            request, unsigned
        )
    elif method == "HmacSHA1":  # older clients; botocore signs SHA256 only: same string
        split = urlsplit(request.url)
        qs = "&".join(
            f"{quote(k, safe='')}={quote(str(unsigned[k]), safe='-_~')}" for k in sorted(unsigned)
        )
        text = f"{request.method}\n{split.netloc}\n{split.path or '/'}\n{qs}"
        digest = hmac.new(credentials.secret_access_key.encode(), text.encode(), "sha1").digest()
        expected = base64.b64encode(digest).decode()
    else:
        raise AuthFailure(f"SignatureMethod {method!r} is not supported")
    if not hmac.compare_digest(expected, params["Signature"]):
        raise AuthFailure(
            "AWS was not able to validate the provided access credentials "
            "(the request signature does not match)"
        )


def _iso_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise AuthFailure(f"{text!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _check_time(when: datetime) -> None:
    if abs(datetime.now(UTC) - when) > MAX_SKEW:
        raise AuthFailure(
            f"Request timestamp {when:%Y-%m-%dT%H:%M:%SZ} is more than 15 minutes from now",
            "RequestExpired",
            400,
        )
