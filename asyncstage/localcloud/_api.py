"""The local cloud's EC2 endpoint: moto's EC2 app behind the cloud's own middleware.

:class:`LocalApi` owns the backend (:mod:`._moto`) and the HTTP server. Its middleware,
in the order a request meets it: the ``Host`` must be the endpoint's, the signature must
be the cloud's (:mod:`._auth`); then it counts the Action, pins the account and region,
throttles (:mod:`._throttle`), answers ``...NotFound`` for ids too new to be seen
(:mod:`._consistency`), answers GetConsoleOutput from the hosts' consoles, and hands the
rest to moto, whose response it brings to EC2's wire format (:mod:`._wire`). To the engine it is the
:class:`~._hooks.ApiHooks` it needs: the records of instances and snapshots.
"""

from __future__ import annotations

import base64
import io
import re
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode
from xml.sax.saxutils import escape

from asyncstage.localcloud import _iam, _kms
from asyncstage.localcloud._auth import AuthFailure, check_host, check_request, signer
from asyncstage.localcloud._consistency import Consistency, created_ids
from asyncstage.localcloud._devices import ROOT_DEVICE_NAME, is_nitro
from asyncstage.localcloud._firewall import Policy
from asyncstage.localcloud._hooks import EngineHooks
from asyncstage.localcloud._pages import PageRefused, page_asked, with_token
from asyncstage.localcloud._query import filter_values_refused, renumber
from asyncstage.localcloud._throttle import (
    THROTTLED_CODE,
    THROTTLED_MESSAGE,
    THROTTLED_STATUS,
    Throttle,
)
from asyncstage.localcloud._wire import error_xml, fix_response, namespace
from asyncstage.localcloud.errors import LocalCloudError

try:
    from moto.ec2.exceptions import EC2ClientError
    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from werkzeug.serving import BaseWSGIServer, make_server

    from asyncstage.localcloud._groups import instance_policies
    from asyncstage.localcloud._moto import (
        LAUNCH_REQUEST,
        LocalBackend,
        ec2_regions,
        find_record,
        make_backend,
        release_public_address,
    )
    from asyncstage.localcloud._records import (
        copy_done,
        install_backend,
        set_reason,
        set_state,
        uninstall_backend,
    )
except ImportError as e:  # pragma: no cover - the [local] extra is not installed
    raise LocalCloudError("the local cloud needs moto: pip install 'asyncstage[local]'") from e

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
_CREDENTIAL = re.compile(r"Credential=[^/]*/\d+/([^/]+)/([^/]+)/")
IMAGE_DESCRIPTION = "Debian 12: this machine's system tree, copy-on-write (asyncstage)"


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args: Any) -> None:
        pass


class LocalApi:
    """The API server of one cloud, started at once; :meth:`close` stops it."""

    def __init__(self, engine: EngineHooks) -> None:
        self._engine = engine
        self.backends: dict[str, LocalBackend] = {}
        self._terminated: dict[str, float] = {}  # instance id -> when (monotonic)
        with engine.lock:
            self.backend = self.region(engine.region)
            self.image_id: str = self.backend.image_id

        class _Handler(_QuietHandler):
            def date_time_string(self, timestamp: float | None = None) -> str:
                """The ``Date`` header on the cloud's clock (``realism.clock_offset``)."""
                now = time.time() if timestamp is None else timestamp
                return str(super().date_time_string(now + engine.realism.clock_offset))

        self._server: BaseWSGIServer = make_server(
            "127.0.0.1",
            engine.port,
            make_app(engine, self._serving),
            threaded=True,
            request_handler=_Handler,
        )
        self.port: int = self._server.server_address[1]
        engine.port = self.port  # the Host header must name it
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="localcloud-api",
            daemon=True,
        )
        self._thread.start()

    def region(self, name: str) -> LocalBackend:
        """The backend of region ``name``, made at its first use (under ``engine.lock``).

        Each region has its own records (zones, key pairs, groups, volumes, snapshots)
        and its own AMI id for the one image, as EC2's regions do.
        """
        backend = self.backends.get(name)
        if backend is not None:
            return backend
        if name not in ec2_regions():
            raise AuthFailure(
                f"Credential should be scoped to a valid region, not '{name}'",
                code="AuthFailure",
            )
        engine = self._engine
        backend = make_backend(name, engine.account)
        image = backend.register_image(name=engine.image_name, description=IMAGE_DESCRIPTION)
        image.architecture = "x86_64"
        image.virtualization_type = "hvm"
        image.hypervisor = "xen"
        image.root_device_type = "ebs"
        image.root_device_name = ROOT_DEVICE_NAME
        backend.image_id = image.id
        backend.engine = engine
        backend.peers = self.region
        self.backends[name] = backend
        return backend

    def _serving(self, name: str) -> LocalBackend:
        """The backend that serves a request for region ``name`` (under ``engine.lock``),
        once the instances terminated too long ago are dropped."""
        if self._terminated:
            self._forget_terminated()
        return self.region(name)

    def image_in(self, region: str) -> str:
        """The AMI id of the local image in ``region``."""
        with self._engine.lock:
            return self.region(region).image_id

    def set_start_time(self, snapshot_id: str, when: datetime) -> None:
        """Set a snapshot's StartTime (not EC2: for tests of retention)."""
        with self._engine.lock:
            snapshot = find_record(self.backends.values(), "get_snapshot", snapshot_id)
            snapshot.start_time = when.astimezone(UTC).replace(tzinfo=None)

    def _instance(self, instance_id: str) -> Any:
        return find_record(self.backends.values(), "get_instance", instance_id)

    # -- ApiHooks (called by the engine under its lock) --------------------------------

    def instance_state(self, instance_id: str) -> str:
        return str(self._instance(instance_id).state)

    def set_running(self, instance_id: str) -> None:
        instance = self._instance(instance_id)
        if instance.state == "pending":
            set_state(instance, "running")

    def boot_failed(self, instance_id: str, reason: str) -> None:
        instance = self._instance(instance_id)
        if instance.state == "pending":
            instance.stop()
            instance._reason = f"Server.InternalError: {reason}"

    def launch_failed(self, instance_id: str, message: str) -> None:
        """A terminated launch's StateReason as EC2 gives it (``Server.InternalError``)."""
        set_reason(self._instance(instance_id), "Server.InternalError", message)

    def halted(self, instance_id: str, *, terminated: bool) -> None:
        instance = self._instance(instance_id)
        if terminated:
            instance.terminate()  # moto detaches the volumes (through volume_detaching)
            self._terminated[instance_id] = time.monotonic()
        elif instance.state == "stopping":
            instance.stop()
            release_public_address(self._engine, instance)

    def _forget_terminated(self) -> None:
        """Drop the instances terminated longer ago than ``realism.terminated_visible``.

        EC2 lists a terminated instance for about an hour; a cloud that kept every one
        would answer each DescribeInstances slower the longer it runs (moto walks them all).
        """
        visible = self._engine.realism.terminated_visible
        if visible is None:
            return
        now = time.monotonic()
        gone = {i for i, when in self._terminated.items() if now - when >= visible}
        if not gone:
            return
        for backend in self.backends.values():
            for key, reservation in list(backend.reservations.items()):
                reservation.instances = [i for i in reservation.instances if i.id not in gone]
                if not reservation.instances:
                    del backend.reservations[key]
            for instance_id in gone:
                backend.tags.pop(instance_id, None)
        for instance_id in gone:
            del self._terminated[instance_id]

    def copy_done(self, resource_id: str, error: str | None) -> None:
        """A snapshot is ``completed`` (once its pending time is over too) or ``error``; a
        volume from a snapshot ``available`` or ``error``, as EC2 reports them."""
        for backend in self.backends.values():
            record = backend.snapshots.get(resource_id) or backend.volumes.get(resource_id)
            if record is not None:
                copy_done(record, error)

    def attachment_done(self, volume_id: str) -> None:
        """An ``attaching`` attachment is ``attached`` now (its device node is there)."""
        for backend in self.backends.values():
            volume = backend.volumes.get(volume_id)
            attachment = None if volume is None else volume.attachment
            if attachment is not None and attachment.status == "attaching":
                attachment.status = "attached"

    def root_volume(self, instance_id: str) -> str | None:
        instance = self._instance(instance_id)
        mapping = instance.block_device_mapping.get(ROOT_DEVICE_NAME)
        return None if mapping is None else str(mapping.volume_id)

    def security_policies(self, instance_ids: Iterable[str]) -> dict[str, Policy]:
        by_backend: dict[int, tuple[Any, list[Any]]] = {}
        for instance_id in instance_ids:
            try:
                instance = self._instance(instance_id)
            except (EC2ClientError, LocalCloudError):
                continue  # gone meanwhile: the caller sees it missing
            backend = instance.ec2_backend
            by_backend.setdefault(id(backend), (backend, []))[1].append(instance)
        policies: dict[str, Policy] = {}
        for backend, instances in by_backend.values():
            policies.update(instance_policies(backend, instances))
        return policies

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        with self._engine.lock:
            for backend in self.backends.values():
                backend.engine = None
                uninstall_backend(backend)


# -- the WSGI app -----------------------------------------------------------------------


def make_app(engine: EngineHooks, region_backend: Callable[[str], Any]) -> WSGIApp:
    """moto's EC2 app behind the local cloud's middleware; ``region_backend`` gives the
    backend of the region a request is signed for (SigV4's credential scope; SigV2,
    which names none, is the cloud's own region)."""
    moto_app: WSGIApp = create_backend_app("ec2")
    kms_app = _kms.make_kms_app()
    throttle = Throttle(engine.realism.api_rate, counter=engine.throttled)
    consistency = Consistency()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        body, params = _read_request(environ)
        pair = signer(environ, params, (engine.credentials, engine.read_only_credentials))
        try:
            check_host(environ, engine.port)
            check_request(environ, body, params, pair)
        except AuthFailure as e:
            return _error_response(start_response, e.code, str(e), e.status)
        action = params.get("Action", "")
        version = params.get("Version")
        m = _CREDENTIAL.search(environ.get("HTTP_AUTHORIZATION", ""))
        if not (m and m.group(2) == "kms"):
            with engine.lock:
                engine.api_calls[action] += 1
        region = m.group(1) if m and m.group(2) in ("ec2", "kms") else engine.region
        try:
            with engine.lock:
                backend = region_backend(region)
        except AuthFailure as e:
            return _error_response(start_response, e.code, str(e), e.status)
        if m and m.group(2) == "kms":
            read_only = pair is engine.read_only_credentials
            return _kms_call(engine, kms_app, environ, body, region, read_only, start_response)
        # moto takes the region from the User-Agent before the signature: pin it
        environ["HTTP_USER_AGENT"] = f"asyncstage-localcloud region/{region}"
        read_only = pair is engine.read_only_credentials
        if (denied := _iam.refusal(action, params, read_only=read_only)) is not None:
            return _error_response(start_response, *denied)
        if not throttle.admit(action, params):
            return _error_response(
                start_response, THROTTLED_CODE, THROTTLED_MESSAGE, THROTTLED_STATUS
            )
        hidden = consistency.hidden()
        refused = filter_values_refused(params) or consistency.refusal(params, hidden)
        if refused is not None:
            return _error_response(start_response, *refused)
        # moto launches MinCount: it gets MaxCount, the backend MinCount aside (what fits)
        rewrite = action == "RunInstances" and _more(params.get("MaxCount"), params.get("MinCount"))
        if action == "RunInstances":  # every time: a kept-alive thread serves several requests
            LAUNCH_REQUEST.min_count = params.get("MinCount") or "1"
        if rewrite:
            params["MinCount"] = params["MaxCount"]
        numbered = renumber(params)  # lists from any index, as EC2 reads them (._query)
        if numbered != params:
            params, rewrite = numbered, True
        try:  # pages of instances, where moto's count reservations (._pages)
            page = page_asked(action, params)
        except PageRefused as e:
            return _error_response(start_response, "InvalidParameterValue", str(e))
        rewrite = rewrite or page is not None
        if rewrite:  # after the signature check, which covered what the client sent
            body = urlencode(params).encode()
            environ["QUERY_STRING"] = ""
        if action == "GetConsoleOutput":
            console = _console_call(engine, backend, params, version, start_response)
            if console is not None:
                return console
        environ["HTTP_X_MOTO_ACCOUNT_ID"] = engine.account
        with engine.lock:
            install_backend(backend)  # moto's resets (mock_aws elsewhere) clear it
            backend.request = params  # what moto does not pass on (DetachVolume's Force)
            backend.page = page
            code, headers, data = _call(moto_app, environ, body)
            token, backend.page, backend.next_token = backend.next_token, None, None
            ok = code.startswith("2")
            made = created_ids(action, data) if ok else []
            if made:  # recorded before any other request can learn the ids
                draw = engine.realism.consistency_window
                consistency.created(made, [draw(engine.random.random) for _ in made])
        if ok and hidden:
            data = consistency.leave_out(action, data, hidden)
        if ok:
            data = with_token(data, token)
        data = fix_response(action, version, ok, data)
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(code, [*headers, ("Content-Length", str(len(data)))])
        return [data]

    return app


def _read_request(environ: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The request's body and its parameters (query string and form body together)."""
    try:
        size = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        size = 0
    body = environ["wsgi.input"].read(size) if size else b""
    params = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
    params.update(parse_qsl(body.decode(errors="replace"), keep_blank_values=True))
    return body, params


def _kms_call(
    engine: EngineHooks,
    app: WSGIApp,
    environ: dict[str, Any],
    body: bytes,
    region: str,
    read_only: bool,
    start_response: StartResponse,
) -> Iterable[bytes]:
    """A KMS request, answered by moto's KMS of ``region`` (:mod:`._kms`)."""
    action = _kms.action_of(environ)
    if read_only and not action.startswith(_kms.READ_ONLY_PREFIXES):
        data = b'{"__type": "AccessDeniedException", "message": "not authorized"}'
        start_response("400 Bad Request", [("Content-Type", "application/x-amz-json-1.1")])
        return [data]
    environ["HTTP_USER_AGENT"] = f"asyncstage-localcloud region/{region}"
    environ["HTTP_X_MOTO_ACCOUNT_ID"] = engine.account
    with engine.lock:
        engine.api_calls[f"kms:{action}"] += 1
        code, headers, data = _call(app, environ, body)
    headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    start_response(code, [*headers, ("Content-Length", str(len(data)))])
    return [data]


def _console_call(
    engine: EngineHooks,
    backend: Any,
    params: dict[str, str],
    version: str | None,
    start_response: StartResponse,
) -> list[bytes] | None:
    """The cloud's own answer to GetConsoleOutput (None: moto's, for an unknown instance)."""
    latest = params.get("Latest", "").lower() == "true"
    instance_id = params.get("InstanceId", "")
    with engine.lock:
        no_latest = _latest_refusal(backend, instance_id) if latest else None
        text = None if no_latest else engine.console(instance_id, latest)
    if no_latest is not None:
        return _error_response(start_response, "UnsupportedOperation", no_latest)
    if text is not None:
        return _console_response(start_response, params["InstanceId"], text, version)
    return None


def _latest_refusal(backend: Any, instance_id: str) -> str | None:
    """EC2's refusal of ``Latest=true`` on a Xen instance type (Nitro types only)."""
    try:
        instance_type = str(backend.get_instance(instance_id).instance_type)
    except Exception:  # unknown: moto answers InvalidInstanceID.NotFound
        return None
    if is_nitro(instance_type):
        return None
    return (
        f"The instance type {instance_type} does not support retrieving the latest console "
        "output (Latest): it is supported on instance types built on the Nitro System."
    )


def _call(app: WSGIApp, environ: dict[str, Any], body: bytes) -> tuple[str, list[Any], bytes]:
    """Status, headers and body of ``app``'s answer to the request with this body."""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    status: list[Any] = []

    def capture(code: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
        status[:] = [code, headers]
        return lambda data: None

    result = app(environ, capture)
    try:
        data = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return status[0], status[1], data


def _more(maximum: str | None, minimum: str | None) -> bool:
    try:
        return maximum is not None and int(maximum) > int(minimum or 1)
    except ValueError:
        return False


def _xml_response(start_response: StartResponse, status: str, data: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", "text/xml"), ("Content-Length", str(len(data)))])
    return [data]


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    412: "Precondition Failed",
    503: "Service Unavailable",
}


def _error_response(
    start_response: StartResponse, code: str, message: str, status: int = 400
) -> list[bytes]:
    return _xml_response(start_response, f"{status} {_REASONS[status]}", error_xml(code, message))


def _console_response(
    start_response: StartResponse, instance_id: str, text: str, version: str | None
) -> list[bytes]:
    output = base64.b64encode(text.encode()).decode()
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<GetConsoleOutputResponse xmlns="{namespace(version)}">'
        "<requestId>request-id</requestId>"
        f"<instanceId>{escape(instance_id)}</instanceId>"
        f"<timestamp>{stamp}</timestamp>"
        + (f"<output>{output}</output>" if output else "")  # EC2: none until it has some
        + "</GetConsoleOutputResponse>"
    )
    data = fix_response("GetConsoleOutput", version, True, xml.encode())
    return _xml_response(start_response, "200 OK", data)
