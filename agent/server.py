"""Running the agent: the Unix socket (and optional TLS listener), signals, shutdown."""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import signal
import socket
import stat
import threading
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health_pb2_grpc

from lookout_edge import shm
from lookout_edge.protocol import GRPC_MESSAGE_OPTIONS

from .backends.selector import BackendSelector
from .config import Account, AgentConfig, metrics_endpoint, resolve_account
from .health import AgentHealth
from .malloc import tune_malloc
from .metrics import AgentMetrics, MetricsServer
from .models import ModelRegistry
from .service import EdgeAgentServicer, add_to_server

log = logging.getLogger(__name__)

# A 4096x4096 RGB888 bitmap is 48 MiB; requests and responses (a mask as bytes) carry one.


class SocketInUse(RuntimeError):
    """The socket path cannot be served (another agent serves it, something else is there, or
    others could replace the socket); the message says why and what to do."""


def claim_socket_path(path: Path, agent_uid: int | None = None) -> None:
    """Make `path` free for a new socket: remove a stale socket, refuse a live one or a non-socket.

    `agent_uid` is the user the agent serves as (default: this process's). A live socket owned
    by another user (not root) is no agent of ours: in a shared directory such as /tmp, anyone
    can create a socket at the agent's well-known path before it starts, and its clients would
    then talk to that process. The directory is checked too: where every user may write and
    the sticky bit is off, anyone could replace the socket after the agent created it.
    """
    agent_uid = os.geteuid() if agent_uid is None else agent_uid
    path.parent.mkdir(parents=True, exist_ok=True)
    directory = path.parent.stat()
    if directory.st_mode & stat.S_IWOTH and not directory.st_mode & stat.S_ISVTX:
        raise SocketInUse(
            f"the socket's directory {path.parent} is writable by every user and not sticky "
            f"(mode {stat.S_IMODE(directory.st_mode):04o}): anyone could replace the agent's socket "
            "with their own. Serve from a directory only the agent's user can write, or set its "
            f"sticky bit (chmod +t {path.parent})"
        )
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; remove it or choose another socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        log.warning("removing stale socket %s left by an agent that did not shut down", path)
        try:
            path.unlink()
        except PermissionError:
            raise SocketInUse(
                f"{path} is a stale socket of {_user(info.st_uid)} that this agent's user may not "
                "remove; remove it as that user or root, or choose another socket"
            ) from None
        return
    except OSError as exc:
        if exc.errno in (errno.ENOENT,):
            return
        raise SocketInUse(f"cannot check socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    if info.st_uid not in (agent_uid, 0):
        raise SocketInUse(
            f"POSSIBLE IMPOSTOR: {path} is served by a process of {_user(info.st_uid)}, not by "
            f"this agent's user ({_user(agent_uid)}) or root: it may be an impostor posing as the "
            "Edge Agent, and clients connecting to it talk to that process. Find it "
            f"(ss -xlp | grep {path}), stop it and remove the socket, and serve from a directory only "
            "the agent's user can write"
        )
    raise SocketInUse(f"another agent is already serving on {path}; stop it first or choose another socket")


def _user(uid: int) -> str:
    """`uid` as "user NAME (uid N)" for messages, or "uid N" without a name."""
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def become(account: Account, socket_path: Path) -> None:
    """Give the socket to `account` (so that it can remove it, even in a sticky /tmp), then switch
    the whole process to its user, group and supplementary groups."""
    if os.geteuid() == account.uid:
        return
    os.chown(socket_path, account.uid, -1)
    os.setgroups(os.getgrouplist(account.name, account.gid))
    os.setgid(account.gid)
    os.setuid(account.uid)
    log.info("serving as %s (gid %d); root privileges dropped", _user(account.uid), account.gid)


class AgentServer:
    """The gRPC server and the model registry it serves, its health service and metrics, with
    their lifetime."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        memory_limit = None if config.memory_limit_mb is None else config.memory_limit_mb << 20
        selector = BackendSelector(config.accelerator, config.engine_cache_dir, config.tensorrt_precision)
        self._account = None if config.user is None else resolve_account(config.user)
        self.health = AgentHealth()
        self.registry = ModelRegistry(
            config.models_dir,
            config.queue_size,
            memory_limit,
            selector,
            config.max_concurrent_runs,
            self.health.model_changed,
        )
        self.metrics = AgentMetrics(self.registry)
        self.servicer = EdgeAgentServicer(self.registry, self.metrics)
        self._server: grpc.Server | None = None
        self.metrics_server: MetricsServer | None = None
        self._socket_inode: int | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        config = self.config
        path = config.socket_path()
        claim_socket_path(path, None if self._account is None else self._account.uid)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
            options=GRPC_MESSAGE_OPTIONS,
            maximum_concurrent_rpcs=config.workers * 4,
        )
        add_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_insecure_port(f"unix:{path}")
        if config.tcp_address:
            server.add_secure_port(config.tcp_address, self._tls_credentials())
        # The socket is created by start(); keep it private until its mode is set.
        previous_umask = os.umask(0o177)
        try:
            server.start()
        finally:
            os.umask(previous_umask)
        self._server = server
        self._secure_socket(path)
        if config.metrics_address:
            self._serve_metrics(config.metrics_address)
        if self._account is not None:
            become(self._account, path)
        self.servicer.shm_access = shm.SegmentAccess.for_socket(path.stat())
        self.registry.refresh()
        for name in config.start_models:
            try:
                self.registry.start(name)
            except Exception as exc:
                log.error("could not start model %s at start-up: %s", name, exc)
        threading.Thread(target=self._rescan_loop, name="rescan", daemon=True).start()
        log.info("Edge Agent serving on unix:%s, models from %s", path, config.models_dir)

    def _serve_metrics(self, address: str) -> None:
        """Serve the metrics; before the agent drops root, so that it may use a low port."""
        host, port = metrics_endpoint(address)
        try:
            self.metrics_server = MetricsServer(self.metrics.registry, host, port)
        except OSError as exc:
            raise RuntimeError(f"metrics_address {address}: {exc.strerror or exc}") from None
        log.info("metrics at http://%s:%d/metrics", host, self.metrics_server.port)

    def _tls_credentials(self) -> grpc.ServerCredentials:
        config = self.config
        assert config.tls_cert and config.tls_key
        pair = (config.tls_key.read_bytes(), config.tls_cert.read_bytes())
        root = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [pair], root_certificates=root, require_client_auth=root is not None
        )

    def _secure_socket(self, path: Path) -> None:
        if self.config.socket_group:
            try:
                gid = grp.getgrnam(self.config.socket_group).gr_gid
            except KeyError:
                raise SocketInUse(f"socket_group '{self.config.socket_group}' does not exist") from None
            os.chown(path, -1, gid)
        os.chmod(path, self.config.socket_mode)
        self._socket_inode = path.stat().st_ino

    def _rescan_loop(self) -> None:
        while not self._stopped.wait(self.config.rescan_interval):
            try:
                self.registry.refresh()
            except Exception:
                log.exception("rescanning %s failed", self.config.models_dir)

    def stop(self) -> None:
        """Stop accepting calls, let in-flight calls finish, remove the socket."""
        self._stopped.set()
        stopped = None if self._server is None else self._server.stop(self.config.shutdown_grace)
        self._server = None
        self.health.shut_down()
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None
        if stopped is not None:
            stopped.wait()
        path = self.config.socket_path()
        try:
            if self._socket_inode is not None and path.stat().st_ino == self._socket_inode:
                path.unlink()
        except FileNotFoundError:
            pass
        log.info("Edge Agent stopped")


def serve(config: AgentConfig) -> int:
    """Run the agent until SIGTERM or SIGINT; returns the process exit status."""
    tune_malloc()
    agent = AgentServer(config)
    try:
        agent.start()
    except SocketInUse as exc:
        log.error("%s", exc)
        agent.stop()
        return 1
    except RuntimeError as exc:  # grpc cannot bind the address
        log.error("cannot listen: %s", exc)
        agent.stop()
        return 1
    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop_requested.wait(0.5):  # a timed wait keeps signal handlers responsive
        pass
    agent.stop()
    return 0
