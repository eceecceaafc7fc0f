"""The OPC UA server (asyncua): per camera the results and the handshake, in our own namespace.

    Objects/LookoutEdge/Cameras/<camera>/
        IsAnomalous Confidence AnomalyScore Threshold FrameId Timestamp Model Areas/<label>
        Inspected Anomalous
        Ready Trigger Busy ResultReady ResultOK ResultNG Ack Error ErrorCode ErrorMessage ConfigIndex
        StartInspection() Acknowledge()

The server runs its own asyncio loop in a thread. The handshakes push each new state to a
queue this loop drains, writing the variables in a fixed order: the result first, the
handshake flags last, so that whoever sees ResultReady reads the result that goes with it. A
state is applied whole between two requests, so a Read never sees half of one. A PLC's write
(Trigger, Ack, ConfigIndex) or method call goes to the handshake at once; the state it causes
is applied before the write is answered, so the PLC's next read already sees it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import functools
import logging
from typing import Any, cast

from asyncua import Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from asyncua.common.node import Node
from asyncua.crypto import uacrypto
from asyncua.server.address_space import NodeData
from asyncua.server.user_managers import CertificateUserManager
from cryptography import x509

from .handshake import Handshake, Refused, State
from .serving import AsyncServerThread
from .settings import OpcUaOutput

log = logging.getLogger(__name__)

NAMESPACE_URI = "urn:lookout-edge:factory-io"
START_TIMEOUT_S = 30.0
NEVER = datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc)  # OPC UA's DateTime minimum
POLICIES = {
    "none": ua.SecurityPolicyType.NoSecurity,
    "basic256sha256_sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "basic256sha256_sign_and_encrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}
V = ua.VariantType
# Written in this order: the result, the counters, then the handshake with ResultReady and Error
# after ResultOK/ResultNG and ErrorCode, and Ready last.
VARIABLES: tuple[tuple[str, ua.VariantType, Any], ...] = (
    ("IsAnomalous", V.Boolean, False),
    ("Confidence", V.Double, 0.0),
    ("AnomalyScore", V.Double, 0.0),
    ("Threshold", V.Double, 0.0),
    ("FrameId", V.UInt32, 0),
    ("Timestamp", V.DateTime, NEVER),
    ("Model", V.String, ""),
    ("Inspected", V.UInt32, 0),
    ("Anomalous", V.UInt32, 0),
    ("ErrorCode", V.UInt16, 0),
    ("ErrorMessage", V.String, ""),
    ("ResultOK", V.Boolean, False),
    ("ResultNG", V.Boolean, False),
    ("Busy", V.Boolean, False),
    ("ResultReady", V.Boolean, False),
    ("Error", V.Boolean, False),
    ("Ready", V.Boolean, False),
)
# What the PLC writes; writable only on a camera triggered over OPC UA.
PLC_VARIABLES: tuple[tuple[str, ua.VariantType, Any], ...] = (
    ("Trigger", V.Boolean, False),
    ("Ack", V.Boolean, False),
    ("ConfigIndex", V.UInt16, 0),
)
SOURCE = "opcua"


def values_of(state: State) -> dict[str, Any]:
    """The camera's variables for `state`, in VARIABLES' order."""
    result = state.result
    values: dict[str, Any] = {}
    if result is not None:
        values.update(
            IsAnomalous=result.is_anomalous,
            Confidence=result.confidence,
            AnomalyScore=result.anomaly_score,
            Threshold=result.threshold,
            FrameId=result.frame_id % (1 << 32),
            Timestamp=result.timestamp,
            Model=result.model,
        )
    values.update(
        Inspected=state.inspected % (1 << 32),
        Anomalous=state.anomalous % (1 << 32),
        ErrorCode=int(state.error_code),
        ErrorMessage=state.error_message,
        ResultOK=state.result_ok,
        ResultNG=state.result_ng,
        Busy=state.busy,
        ResultReady=state.result_ready,
        Error=state.error,
        Ready=state.ready,
    )
    return values


def _node_id(identifier: str, namespace: int) -> ua.NodeId:
    """A string NodeId in our namespace: `ns=<index>;s=LookoutEdge.Cameras.<camera>.<name>`."""
    return ua.NodeId(ua.String(identifier), ua.Int16(namespace))


def _data(value: Any, kind: ua.VariantType, now: datetime.datetime) -> ua.DataValue:
    stamp = cast(ua.DateTime, now)
    return ua.DataValue(ua.Variant(value, kind), SourceTimestamp=stamp, ServerTimestamp=stamp)


def _der(certificate: x509.Certificate) -> bytes:
    return uacrypto.der_from_x509(certificate)


class _Camera:
    """One camera's nodes and what was last written to them."""

    def __init__(self, handshake: Handshake, obj: Node, areas: Node) -> None:
        self.handshake = handshake
        self.obj = obj
        self.areas = areas
        self.nodes: dict[str, ua.NodeId] = {}
        self.types = {name: kind for name, kind, _ in VARIABLES}
        self.written: dict[str, Any] = {}
        self.area_nodes: dict[str, ua.NodeId] = {}


class OpcUaServer(AsyncServerThread):
    def __init__(self, config: OpcUaOutput, handshakes: list[Handshake]) -> None:
        super().__init__(f"opcua:{config.endpoint}", config.endpoint, "factory-io-opcua", START_TIMEOUT_S)
        self.config = config
        self._handshakes = handshakes
        self._cameras: list[_Camera] = []
        # (camera, state) from any thread; drained by the server's loop. Bounded: each entry is a
        # whole state, so should the loop fall behind, dropping the oldest loses nothing current.
        self._pending: collections.deque[tuple[_Camera, State]] = collections.deque(maxlen=4096)
        self._kick: asyncio.Event | None = None
        self._trusted: set[bytes] = set()
        self._server: Server | None = None

    # -- serving -------------------------------------------------------------------------------
    async def _serve(self) -> None:
        # asyncua logs every request at INFO (a PLC polling every 10 ms: 100 lines a second) and
        # every node of its address space at start; its warnings and errors still show.
        logging.getLogger("asyncua").setLevel(logging.WARNING)
        self._kick = asyncio.Event()
        server = await self._build()
        await server.start()
        try:
            drain = asyncio.create_task(self._drain_forever())
            for camera in self._cameras:  # from now on, every state change reaches the loop
                camera.handshake.subscribe(functools.partial(self._push, camera))
            await self._drain()
            await self._serving()
            drain.cancel()
        finally:
            await server.stop()

    # -- the address space ---------------------------------------------------------------------
    async def _build(self) -> Server:
        config = self.config
        user_manager: Any = None
        if not config.anonymous:  # the trusted client certificates are the users
            user_manager = CertificateUserManager()
            for index, path in enumerate(config.trusted_certificates):
                await user_manager.add_user(path, name=f"trusted-{index}")
        server = self._server = Server(user_manager=user_manager)
        await server.init()
        server.set_endpoint(config.endpoint)
        server.set_server_name("lookout-edge camera daemon")
        await server.set_application_uri(config.application_uri)
        server.allow_remote_admin(False)
        server.set_security_policy([POLICIES[policy] for policy in config.security])
        if config.certificate is not None and config.private_key is not None:
            await server.load_certificate(str(config.certificate))
            await server.load_private_key(str(config.private_key))
        if config.trusted_certificates:
            for path in config.trusted_certificates:
                self._trusted.add(_der(await uacrypto.load_certificate(str(path))))
            server.set_certificate_validator(self._validate)
        if not config.anonymous:
            server.set_identity_tokens([ua.X509IdentityToken])
        namespace = await server.register_namespace(NAMESPACE_URI)
        root = await server.nodes.objects.add_object(
            _node_id("LookoutEdge", namespace), ua.QualifiedName("LookoutEdge", namespace)
        )
        cameras = await root.add_folder(
            _node_id("LookoutEdge.Cameras", namespace), ua.QualifiedName("Cameras", namespace)
        )
        for handshake in self._handshakes:
            self._cameras.append(await self._add_camera(server, cameras, namespace, handshake))
        server.subscribe_server_callback(CallbackType.PostWrite, self._after_write)
        return server

    async def _add_camera(
        self, server: Server, parent: Node, namespace: int, handshake: Handshake
    ) -> _Camera:
        prefix = f"LookoutEdge.Cameras.{handshake.camera}"
        obj = await parent.add_object(
            _node_id(prefix, namespace), ua.QualifiedName(handshake.camera, namespace)
        )
        areas = await obj.add_object(
            _node_id(f"{prefix}.Areas", namespace), ua.QualifiedName("Areas", namespace)
        )
        camera = _Camera(handshake, obj, areas)
        for name, kind, initial in VARIABLES:
            node = await obj.add_variable(
                _node_id(f"{prefix}.{name}", namespace), ua.QualifiedName(name, namespace), initial, kind
            )
            camera.nodes[name] = node.nodeid
        owner = handshake.trigger_type == SOURCE
        for name, kind, initial in PLC_VARIABLES:
            node = await obj.add_variable(
                _node_id(f"{prefix}.{name}", namespace), ua.QualifiedName(name, namespace), initial, kind
            )
            if owner:
                await node.set_writable()
                server.set_attribute_value_setter(node.nodeid, self._setter(camera, name))
        if owner:
            await obj.add_method(
                _node_id(f"{prefix}.StartInspection", namespace),
                ua.QualifiedName("StartInspection", namespace),
                self._method(camera, "start"),
            )
            await obj.add_method(
                _node_id(f"{prefix}.Acknowledge", namespace),
                ua.QualifiedName("Acknowledge", namespace),
                self._method(camera, "acknowledge"),
            )
        return camera

    async def _validate(self, certificate: x509.Certificate, _application: ua.ApplicationDescription) -> None:
        """Only the clients whose certificates are in trusted_certificates get a channel."""
        if _der(certificate) not in self._trusted:
            log.warning("%s: refused an untrusted client certificate (%s)", self.name, certificate.subject)
            raise ua.UaStatusCodeError(ua.StatusCodes.BadCertificateUntrusted)

    # -- the PLC's side --------------------------------------------------------------------------
    def _setter(self, camera: _Camera, name: str) -> Any:
        """Trigger, Ack and ConfigIndex: the handshake decides, a refusal is the write's error."""

        def setter(node: NodeData, attr: ua.AttributeIds, value: ua.DataValue) -> None:
            written = value.Value.Value if value.Value is not None else None
            try:
                if name == "ConfigIndex":
                    camera.handshake.set_config_index(int(written or 0), SOURCE)
                else:
                    camera.handshake.set_level(name.lower(), bool(written), SOURCE)
            except Refused as exc:
                code = (
                    ua.StatusCodes.BadOutOfRange if name == "ConfigIndex" else ua.StatusCodes.BadInvalidState
                )
                raise ua.UaStatusCodeError(code) from exc
            node.attributes[attr].value = value
            node.attributes[attr].value_callback = None

        return setter

    def _method(self, camera: _Camera, action: str) -> Any:
        async def call(_parent: ua.NodeId) -> list[ua.Variant] | ua.StatusCode:
            try:
                if action == "start":
                    camera.handshake.start(SOURCE)
                else:
                    camera.handshake.acknowledge(SOURCE)
            except Refused:
                return ua.StatusCode(ua.UInt32(ua.StatusCodes.BadInvalidState))
            await self._drain()
            return []

        return call

    async def _after_write(self, _event: ServerItemCallback, _dispatcher: Any) -> None:
        await self._drain()

    # -- applying states ------------------------------------------------------------------------
    def _push(self, camera: _Camera, state: State) -> None:
        """From any thread, never blocking."""
        self._pending.append((camera, state))
        loop, kick = self._loop, self._kick
        if loop is not None and kick is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the server stops
                loop.call_soon_threadsafe(kick.set)

    async def _drain_forever(self) -> None:
        assert self._kick is not None
        while True:
            await self._kick.wait()
            self._kick.clear()
            await self._drain()

    async def _drain(self) -> None:
        """Apply every queued state, each whole; no await in here suspends, so no request runs
        between the writes of one state."""
        while self._pending:
            camera, state = self._pending.popleft()
            try:
                await self._apply(camera, state)
            except Exception:
                log.exception("%s: cannot show camera %s's state", self.name, camera.handshake.camera)

    async def _apply(self, camera: _Camera, state: State) -> None:
        server_time = datetime.datetime.now(datetime.timezone.utc)
        if state.result is not None:
            await self._write_areas(camera, state.result.areas, server_time)
        for name, value in values_of(state).items():
            if name in camera.written and camera.written[name] == value:
                continue
            await self._write(camera.nodes[name], _data(value, camera.types[name], server_time))
            camera.written[name] = value

    async def _write_areas(
        self, camera: _Camera, areas: tuple[tuple[str, float], ...], now: datetime.datetime
    ) -> None:
        """`Areas/<label>`: a variable per label, made when the label is first seen."""
        for label, area in areas:
            key = f"area:{label}"
            if label not in camera.area_nodes:
                namespace = camera.areas.nodeid.NamespaceIndex
                node = await camera.areas.add_variable(
                    _node_id(f"{camera.areas.nodeid.Identifier!s}.{label}", namespace),
                    ua.QualifiedName(label, namespace),
                    0.0,
                    V.Double,
                )
                camera.area_nodes[label] = node.nodeid
            if camera.written.get(key) != area:
                await self._write(camera.area_nodes[label], _data(area, V.Double, now))
                camera.written[key] = area

    async def _write(self, node: ua.NodeId, data: ua.DataValue) -> None:
        assert self._server is not None
        await self._server.write_attribute_value(node, data)
