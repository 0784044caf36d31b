"""The KEDA external scaler's gRPC server: TLS with verified client certificates, or plain text only
when asked for by name; bounded in threads, calls in progress, streams and message size."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from exporter.adapter.keda import externalscaler_pb2_grpc as pb_grpc
from exporter.adapter.keda.scaler import GpuScaler

log = logging.getLogger(__name__)

WORKERS = 16  # calls answered at once; the others wait in line
MAX_CALLS = 64  # calls in progress or waiting; beyond, RESOURCE_EXHAUSTED at once
MAX_STREAMS = WORKERS // 2  # each StreamIsActive holds a worker: the rest stay for the polls
MAX_MESSAGE_BYTES = 64 * 1024  # a ScaledObjectRef is a few short strings
STOP_GRACE_S = 5.0


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials:
    """The serving pair, and the CA every client certificate must chain to (a client without one is
    refused in the handshake). Raises OSError if a file cannot be read."""
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(client_ca).read_bytes(),
        require_client_auth=True,
    )


class ScalerServer:
    """Listens on ``address`` (host, port): with ``credentials``, over TLS; without, in plain text."""

    def __init__(self, address: tuple[str, int], scaler: GpuScaler, credentials: grpc.ServerCredentials | None) -> None:
        self._scaler = scaler
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
                self._server.add_secure_port(target, credentials)
                if credentials is not None
                else self._server.add_insecure_port(target)
            )
        except RuntimeError as error:  # newer grpcio raise where older ones return 0
            raise OSError(f"cannot listen on {target}: {error}") from error
        if bound == 0:
            raise OSError(f"cannot listen on {target}")
        self.port = bound

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        """Ends the streams, lets calls in progress finish for a moment, then cancels them."""
        self._scaler.stopping.set()
        self._server.stop(STOP_GRACE_S).wait()
