"""EC2's wire format: what the local cloud's responses look like on the wire.

moto renders EC2's XML from botocore's model; EC2 itself differs in a few places that
clients other than botocore depend on, fixed here on the way out:

- the namespace is ``http://ec2.amazonaws.com/doc/<Version>/`` with its trailing slash,
  ``<Version>`` being the API version the client sent (EC2 answers each client in the
  version it speaks; botocore sends ``2016-11-15``);
- actions that EC2 documents as returning a boolean (every action without an output
  shape in the model, and those with a ``Return`` member) carry ``<return>true</return>``;
- errors are ``<Response><Errors><Error><Code/><Message/></Error></Errors><RequestID/>
  </Response>`` without a namespace, and every response has a fresh request id.
"""

from __future__ import annotations

import functools
import re
import uuid
from xml.sax.saxutils import escape

API_VERSION = "2016-11-15"
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_XMLNS = re.compile(rb'xmlns="http://ec2\.amazonaws\.com/doc/[^"]*"')
_ERROR_ROOT = re.compile(rb"<Response\s+xmlns=\"[^\"]*\">")


def namespace(version: str | None) -> str:
    """The namespace EC2 answers a request of API ``version`` in."""
    if not version or not _VERSION.match(version):
        version = API_VERSION
    return f"http://ec2.amazonaws.com/doc/{version}/"


@functools.cache
def boolean_actions() -> frozenset[str]:
    """Actions whose response EC2 documents as ``<return>true</return>``."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("ec2")
    found = set()
    for name in model.operation_names:
        output = model.operation_model(name).output_shape
        if output is None or "Return" in output.members:
            found.add(name)
    return frozenset(found)


def fix_response(action: str, version: str | None, ok: bool, body: bytes) -> bytes:
    """moto's response as EC2 sends it (see the module's docstring)."""
    request_id = str(uuid.uuid4()).encode()
    if not ok:
        body = _ERROR_ROOT.sub(b"<Response>", body, count=1)
        return re.sub(
            rb"<RequestID>[^<]*</RequestID>", b"<RequestID>" + request_id + b"</RequestID>", body
        )
    body = _XMLNS.sub(f'xmlns="{namespace(version)}"'.encode(), body, count=1)
    body = re.sub(
        rb"<requestId>request-id</requestId>", b"<requestId>" + request_id + b"</requestId>", body
    )
    if action in boolean_actions() and b"<return>" not in body:
        closing = f"</{action}Response>".encode()
        body = body.replace(closing, b"<return>true</return>" + closing, 1)
    return body


def error_xml(code: str, message: str) -> bytes:
    """EC2's error document."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code>"
        f"<Message>{escape(message)}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()
