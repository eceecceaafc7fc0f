"""The OPC UA output and trigger: the camera daemon as a process with a real agent and model,
its asyncua server on loopback, and asyncua's own client playing the PLC."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import Client, Node, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lookout_edge.client.camera.factory_io.opcua import NAMESPACE_URI
from lookout_edge.client.edge_client import EdgeAgentClient
from tests.camera.conftest import free_port, read_events, save_image
from tests.conftest import HEIGHT, make_image

# The browse names the issue names, in the server's own namespace.
BROWSE_NAMES = [
    "IsAnomalous",
    "Confidence",
    "AnomalyScore",
    "Threshold",
    "FrameId",
    "Timestamp",
    "Inspected",
    "Anomalous",
    "Ready",
    "Trigger",
    "Busy",
    "ResultReady",
    "ResultOK",
    "ResultNG",
    "Ack",
    "Error",
    "ErrorCode",
]
SERVER_URI = "urn:lookout-edge:camera"
CLIENT_URI = "urn:lookout-edge:test-plc"


def agent_and_folder(agent_process: Any, tmp_path: Path) -> tuple[Any, Path]:
    """The agent process, not waited for: it starts while the daemon's OPC UA server does (the
    daemon retries the agent), which takes the longest."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    return agent_process(), folder


def daemon_config(agent: Any, folder: Path, tmp_path: Path, output: dict[str, Any]) -> dict[str, Any]:
    return {
        "agent": {"socket": agent.address},
        "cameras": [
            {
                "name": "line1",
                "source": str(folder),
                "model": "seg",
                "poll_interval": 0.05,
                "trigger": {"type": "opcua", "timeout": 2, "models": ["cls"]},
            }
        ],
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "events.jsonl")}],
        "outputs": [{"type": "opcua", **output}],
    }


class Plc:
    """The camera's nodes as a PLC's OPC UA client sees them."""

    def __init__(self, client: Client, namespace: int) -> None:
        self.client = client
        self.ns = namespace

    @classmethod
    async def of(cls, client: Client) -> Plc:
        """For a connected client; the namespace index is looked up, never assumed."""
        return cls(client, await client.get_namespace_index(NAMESPACE_URI))

    def node(self, name: str) -> Node:
        return self.client.get_node(f"ns={self.ns};s=LookoutEdge.Cameras.line1.{name}")

    async def read(self, *names: str) -> dict[str, Any]:
        values = await self.client.read_values([self.node(name) for name in names])
        return dict(zip(names, values, strict=True))

    async def write(self, name: str, value: Any, kind: ua.VariantType = ua.VariantType.Boolean) -> None:
        await self.node(name).write_value(ua.DataValue(ua.Variant(value, kind)))

    async def call(self, method: str) -> None:
        await self.client.get_node(f"ns={self.ns};s=LookoutEdge.Cameras.line1").call_method(
            f"{self.ns}:{method}"
        )

    async def wait(self, name: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not (await self.read(name))[name]:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not rise in {timeout} s: {await self.read(*BROWSE_NAMES)}")
            await asyncio.sleep(0.02)


async def wait_for_server(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with Client(url, timeout=2) as client:
                await client.get_namespace_index(NAMESPACE_URI)
                return
        except (OSError, asyncio.TimeoutError, ua.UaError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_the_handshake_for_good_and_bad_parts_a_reconnect_mid_handshake_and_the_error_codes(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent, folder = agent_and_folder(agent_process, tmp_path)
    url = f"opc.tcp://127.0.0.1:{free_port()}/lookout-edge/"
    daemon = camera_daemon(daemon_config(agent, folder, tmp_path, {"endpoint": url}))

    async def scenario() -> None:
        await wait_for_server(url)
        # Two clients that misbehave all along: one stops half-way through its Hello and never
        # reads, one sends garbage. The PLC below must not notice them.
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stuck = socket.create_connection(("127.0.0.1", port))
        stuck.sendall(b"HELF\x38\x00\x00\x00\x00\x00")
        garbage = socket.create_connection(("127.0.0.1", port))
        garbage.sendall(bytes(range(256)) * 4)
        async with Client(url, timeout=4) as client:
            plc = await Plc.of(client)
            camera = await client.nodes.objects.get_child(
                [f"{plc.ns}:LookoutEdge", f"{plc.ns}:Cameras", f"{plc.ns}:line1"]
            )
            names = {(await child.read_browse_name()).to_string() for child in await camera.get_children()}
            assert {f"{plc.ns}:{name}" for name in BROWSE_NAMES} <= names, names
            await plc.wait("Ready")

            # A normal part: Trigger held high until Busy, then lowered, as a PLC does.
            save_image(folder, "0-normal.png", make_image())
            before = datetime.datetime.now(datetime.timezone.utc)
            await plc.write("Trigger", True)
            assert (await plc.read("Ready", "Busy", "ResultReady")) == {
                "Ready": False,
                "Busy": True,
                "ResultReady": False,
            }  # applied before the write was answered
            await plc.write("Trigger", False)
            await plc.wait("ResultReady")
            normal = await plc.read(*BROWSE_NAMES, "Model")
            assert normal["ResultOK"] and not normal["ResultNG"] and not normal["IsAnomalous"]
            assert not normal["Busy"] and not normal["Ready"] and not normal["Error"]
            assert normal["ErrorCode"] == 0 and normal["Inspected"] == 1 and normal["Anomalous"] == 0
            assert normal["AnomalyScore"] < normal["Threshold"] and normal["FrameId"] == 1
            assert normal["Model"] == "seg"
            stamp = normal["Timestamp"].replace(tzinfo=datetime.timezone.utc)
            assert (
                before - datetime.timedelta(seconds=1)
                <= stamp
                <= datetime.datetime.now(datetime.timezone.utc)
            )

            # A Trigger now (not Ready) is refused and changes nothing; so is a write to a result.
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidState"):
                await plc.write("Trigger", True)
            with pytest.raises(ua.UaStatusCodeError, match="BadUserAccessDenied"):
                await plc.write("IsAnomalous", True)
            with pytest.raises(ua.UaStatusCodeError, match="BadTypeMismatch"):
                await plc.write("Trigger", "yes", ua.VariantType.String)
            with pytest.raises(ua.UaStatusCodeError, match="BadOutOfRange"):
                await plc.write("ConfigIndex", 7, ua.VariantType.UInt16)
            assert (await plc.read("ResultReady", "ResultOK"))["ResultOK"]

            await plc.write("Ack", True)
            cleared = await plc.read("Ready", "ResultReady", "ResultOK", "ResultNG", "IsAnomalous")
            assert cleared == {
                "Ready": True,
                "ResultReady": False,
                "ResultOK": False,
                "ResultNG": False,
                "IsAnomalous": False,  # the last result's figures stay
            }
            await plc.write("Ack", False)

            # An anomalous part, started by the method; the PLC drops off before the result.
            save_image(folder, "1-anomalous.png", make_image(red=HEIGHT // 2))
            await plc.call("StartInspection")

        async with Client(url, timeout=4) as client:  # a new connection, as after a PLC restart
            plc = await Plc.of(client)
            await plc.wait("ResultReady")
            anomalous = await plc.read(*BROWSE_NAMES)
            assert anomalous["ResultNG"] and not anomalous["ResultOK"] and anomalous["IsAnomalous"]
            assert anomalous["AnomalyScore"] >= anomalous["Threshold"] and anomalous["Inspected"] == 2
            assert anomalous["Anomalous"] == 1 and anomalous["FrameId"] == 2
            area = await client.get_node(
                f"ns={plc.ns};s=LookoutEdge.Cameras.line1.Areas.red-paint"
            ).read_value()
            assert 0.4 < area < 0.6
            await plc.call("Acknowledge")
            assert (await plc.read("Ready", "ResultNG"))["Ready"]
            with pytest.raises(ua.UaStatusCodeError, match="BadInvalidState"):
                await plc.call("Acknowledge")  # nothing to acknowledge

            # ConfigIndex 1 selects the second model of the table.
            await plc.write("ConfigIndex", 1, ua.VariantType.UInt16)
            save_image(folder, "2-other-model.png", make_image())
            await plc.write("Trigger", True)
            await plc.wait("ResultReady")
            assert (await plc.read("Model", "ResultOK")) == {"Model": "cls", "ResultOK": True}
            await plc.write("Trigger", False)
            await plc.write("Ack", True)
            assert (await plc.read("Ready"))["Ready"]
            await plc.write("ConfigIndex", 0, ua.VariantType.UInt16)

            # The model stopped by an operator: MODEL_NOT_RUNNING, never a silent OK.
            with EdgeAgentClient(agent.address) as operator:
                operator.stop_model("seg")
            save_image(folder, "3-model-stopped.png", make_image())
            await plc.call("StartInspection")
            await plc.wait("Error")
            failed = await plc.read(
                "Error", "ErrorCode", "ErrorMessage", "ResultReady", "ResultOK", "ResultNG"
            )
            assert failed["ErrorCode"] == 2 and "seg" in failed["ErrorMessage"], failed
            assert not (failed["ResultReady"] or failed["ResultOK"] or failed["ResultNG"])
            await plc.call("Acknowledge")
            assert (await plc.read("Ready", "Error", "ErrorCode")) == {
                "Ready": True,
                "Error": False,
                "ErrorCode": 0,
            }

            # No image in the folder: CAMERA, after most of trigger.timeout.
            started = time.monotonic()
            await plc.call("StartInspection")
            await plc.wait("Error")
            assert (await plc.read("ErrorCode"))["ErrorCode"] == 1
            assert 1.5 < time.monotonic() - started < 3.5
            await plc.call("Acknowledge")

            # The daemon asked the agent to start the model again: the next part goes through.
            agent_client = EdgeAgentClient(agent.address)
            deadline = time.monotonic() + 10
            while agent_client.describe_model("seg").status != "RUNNING" and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            agent_client.close()
            save_image(folder, "4-model-back.png", make_image())
            await plc.call("StartInspection")
            await plc.wait("ResultReady")
            assert (await plc.read("ResultOK", "Error"))["ResultOK"]
        stuck.close()
        garbage.close()

    asyncio.run(scenario())
    assert "inspection 4 failed (MODEL_NOT_RUNNING)" in daemon.log()
    events = read_events(tmp_path / "events.jsonl")
    assert [(Path(e["source_file"]).name, e["is_anomalous"], e["model"]) for e in events] == [
        ("0-normal.png", False, "seg"),
        ("1-anomalous.png", True, "seg"),
        ("2-other-model.png", False, "cls"),
        ("4-model-back.png", False, "seg"),
    ]
    assert daemon.stop() == 0


def _certificate(directory: Path, name: str, uri: str, server: bool) -> tuple[Path, Path]:
    """A self-signed certificate (DER) and its key (PEM), as OPC UA applications carry them."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost")]
    if server:
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.der", directory / f"{name}.key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def _secure_client(url: str, cert: Path, key: Path, server_cert: Path, identity: bool) -> Client:
    client = Client(url, timeout=4)
    client.application_uri = CLIENT_URI
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        certificate=str(cert),
        private_key=str(key),
        server_certificate=str(server_cert),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    if identity:  # the same certificate as the user's X509 identity
        await client.load_client_certificate(str(cert))
        await client.load_private_key(str(key))
    return client


def test_basic256sha256_sign_and_encrypt_with_certificates_and_anonymous_access_off(
    tmp_path: Path, agent_process, camera_daemon, models_dir: Path
) -> None:
    agent, folder = agent_and_folder(agent_process, tmp_path)
    pki = tmp_path / "pki"
    pki.mkdir()
    server_cert, server_key = _certificate(pki, "server", SERVER_URI, server=True)
    plc_cert, plc_key = _certificate(pki, "plc", CLIENT_URI, server=False)
    stranger_cert, stranger_key = _certificate(pki, "stranger", CLIENT_URI, server=False)
    url = f"opc.tcp://127.0.0.1:{free_port()}/lookout-edge/"
    output = {
        "endpoint": url,
        "security": ["basic256sha256_sign_and_encrypt"],
        "certificate": str(server_cert),
        "private_key": str(server_key),
        "trusted_certificates": [str(plc_cert)],
        "anonymous": False,
        "application_uri": SERVER_URI,
    }
    daemon = camera_daemon(daemon_config(agent, folder, tmp_path, output))

    async def refused(client: Client) -> None:
        with pytest.raises((ua.UaError, OSError, asyncio.TimeoutError)):
            await client.connect()
            try:  # a session that somehow opened must not read anything
                await client.get_node(ua.ObjectIds.Server_ServerStatus).read_value()
            finally:
                await client.disconnect()

    async def scenario() -> None:
        deadline = time.monotonic() + 30
        while True:  # the endpoints, over the unsecured discovery channel every server keeps
            try:
                endpoints = await Client(url, timeout=2).connect_and_get_server_endpoints()
                break
            except (OSError, asyncio.TimeoutError, ua.UaError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        assert {(e.SecurityPolicyUri.rsplit("#", 1)[1], e.SecurityMode) for e in endpoints} == {
            ("Basic256Sha256", ua.MessageSecurityMode.SignAndEncrypt)
        }
        tokens = {token.TokenType for e in endpoints for token in e.UserIdentityTokens}
        assert tokens == {ua.UserTokenType.Certificate}

        await refused(Client(url, timeout=4))  # no security at all
        await refused(await _secure_client(url, plc_cert, plc_key, server_cert, identity=False))  # anonymous
        await refused(await _secure_client(url, stranger_cert, stranger_key, server_cert, identity=True))

        client = await _secure_client(url, plc_cert, plc_key, server_cert, identity=True)
        async with client:
            plc = await Plc.of(client)
            await plc.wait("Ready")
            save_image(folder, "0.png", make_image(red=HEIGHT // 2))
            await plc.write("Trigger", True)
            await plc.wait("ResultReady")
            assert (await plc.read("ResultNG", "IsAnomalous")) == {"ResultNG": True, "IsAnomalous": True}
            await plc.write("Ack", True)

    asyncio.run(scenario())
    assert "refused an untrusted client certificate" in daemon.log()
    assert daemon.stop() == 0
