"""HTTP plumbing the agent's and the adapter's servers share: a threaded server that can wrap TLS
without letting one client's handshake block the others, a handler that answers with a body of
known length, and serving until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm holds the body
    # until the client's delayed ACK (~40 ms) on every keep-alive request.
    disable_nagle_algorithm = True
    timeout = 10  # a client that stalls mid-request loses its thread after this many seconds

    def send(
        self, code: int, body: bytes, content_type: str, send_body: bool = True, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[Handler], tls: ssl.SSLContext | None) -> None:
        super().__init__(address, handler)
        if tls is not None:
            # The handshake happens on the connection's own thread, at its first read, so a client
            # that never completes one cannot hold up the accept loop.
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up, times out or fails the TLS handshake is its problem, not ours."""
        log.debug("connection from %s failed", client_address, exc_info=True)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="http", daemon=True)
        thread.start()
        return thread


def wait_for_signal(logger: logging.Logger) -> None:
    """Blocks until SIGTERM or SIGINT, logging which arrived."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
