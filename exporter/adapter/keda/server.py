"""The KEDA external scaler's gRPC server: TLS with verified client certificates, or plain text only
when asked for by name; bounded in threads, calls in progress, streams and message size."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc

from exporter.adapter.keda import externalscaler_pb2_grpc as pb_grpc
from exporter.adapter.keda.scaler import GpuScaler
from exporter.adapter.servingcert import REFRESH_S, WatchedFiles, check_certificates, check_pair
from exporter.backoff import Backoff

log = logging.getLogger(__name__)

WORKERS = 16  # calls answered at once; the others wait in line
MAX_CALLS = 64  # calls in progress or waiting; beyond, RESOURCE_EXHAUSTED at once
MAX_STREAMS = WORKERS // 2  # each StreamIsActive holds a worker: the rest stay for the polls
MAX_MESSAGE_BYTES = 64 * 1024  # a ScaledObjectRef is a few short strings
STOP_GRACE_S = 5.0


class ScalerTls:
    """The serving pair, and the CA every client certificate must chain to (a client without one is
    refused in the handshake), reloaded when their files change: ``files`` checks a new set and leaves
    it for gRPC, which asks for it before each new connection's handshake (open ones keep theirs).
    Raises OSError if a file cannot be read, ValueError if the files do not load, at start."""

    def __init__(
        self, cert: str, key: str, client_ca: str, refresh_s: float = REFRESH_S, backoff: Backoff | None = None
    ) -> None:
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.files = WatchedFiles(
            "keda-scaler-tls",
            "KEDA scaler's certificate and client CA",
            (cert, key, client_ca),
            self._stage,
            refresh_s,
            backoff,
        )
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _configuration(self.files.contents),
            self._fetch,  # type: ignore[arg-type]  # grpc documents None as "no change"; its stubs omit it
            require_client_authentication=True,
        )

    def _stage(self, contents: tuple[bytes, ...]) -> None:
        configuration = _configuration(contents)
        with self._lock:
            self._pending = configuration

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The set staged since the last call, once; None keeps the one in service."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


def _configuration(contents: tuple[bytes, ...]) -> grpc.ServerCertificateConfiguration:
    """Raises ValueError unless the pair matches and the CA holds a certificate: gRPC would only log a
    set that does not load, and keep the one before without a word to the reloader."""
    cert, key, client_ca = contents
    check_pair(cert, key)
    check_certificates(client_ca)
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)


class ScalerServer:
    """Listens on ``address`` (host, port): with ``tls``, over TLS reloaded as its files change;
    without, in plain text."""

    def __init__(self, address: tuple[str, int], scaler: GpuScaler, tls: ScalerTls | None) -> None:
        self._scaler = scaler
        self._tls = tls
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="keda-scaler"),
            maximum_concurrent_rpcs=MAX_CALLS,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),  # a port already taken is an error, not a shared listener
            ],
        )
        pb_grpc.add_ExternalScalerServicer_to_server(scaler, self._server)
        host, port = address
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = (
                self._server.add_secure_port(target, tls.credentials)
                if tls is not None
                else self._server.add_insecure_port(target)
            )
        except RuntimeError as error:  # newer grpcio raise where older ones return 0
            raise OSError(f"cannot listen on {target}: {error}") from error
        if bound == 0:
            raise OSError(f"cannot listen on {target}")
        self.port = bound

    def start(self) -> None:
        self._server.start()
        if self._tls is not None:
            self._tls.files.start()

    def stop(self) -> None:
        """Ends the streams, lets calls in progress finish for a moment, then cancels them."""
        self._scaler.stopping.set()
        self._server.stop(STOP_GRACE_S).wait()
        if self._tls is not None:
            self._tls.files.stop()
