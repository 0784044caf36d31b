"""The HTTP edge: serves the exposition rendered once per poll, and the health endpoints.

A scrape only copies bytes rendered earlier from the latest snapshot: it never waits on NVML,
the kubelet or the renderer, so its latency does not depend on how slow a device is.
"""

from __future__ import annotations

import gzip
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.utils import floatToGoString

from exporter.webconfig import WebConfig

log = logging.getLogger(__name__)

# Every name we export is a classic one, so the text format 0.0.4 that every Prometheus reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render_text(registry: CollectorRegistry) -> bytes:
    """The text format 0.0.4 of a registry of gauges and counters, byte for byte what
    ``prometheus_client.generate_latest`` writes for them, about five times faster.

    generate_latest re-validates and re-escapes every label name on every sample (about 12 us
    each): with hundreds of pods that was most of the agent's CPU. Our names are fixed and valid,
    so only label values are escaped here. Other metric types are refused rather than mis-rendered.
    """
    out: list[str] = []
    for family in registry.collect():
        if family.type not in ("gauge", "counter"):
            raise ValueError(f"render_text handles gauges and counters, not {family.type} ({family.name})")
        name = family.name + "_total" if family.type == "counter" else family.name
        help_text = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {family.type}\n")
        for sample in family.samples:
            if sample.labels:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
                out.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}\n")
            else:
                out.append(f"{sample.name} {floatToGoString(sample.value)}\n")
    return "".join(out).encode()


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class Exposition:
    """The latest rendering of a registry, plain and gzip, swapped in as one tuple."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._rendered: tuple[bytes, bytes] = (b"", gzip.compress(b""))

    def render(self) -> None:
        body = render_text(self._registry)
        self._rendered = (body, gzip.compress(body, compresslevel=1))

    def latest(self) -> tuple[bytes, bytes]:
        return self._rendered


_UNAUTHENTICATED = ("/healthz", "/readyz")


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    timeout = 10  # a client that stalls mid-request loses its thread after this many seconds
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm holds the body
    # until the client's delayed ACK (~40 ms) on every keep-alive scrape.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        auth = self.server.web.auth
        # Probes stay open, as on Kubernetes' own servers: they reveal nothing but liveness.
        if auth is not None and path not in _UNAUTHENTICATED and not auth.allows(self.headers.get("Authorization")):
            self._send(
                401,
                b"unauthorized\n",
                "text/plain; charset=utf-8",
                send_body,
                {"WWW-Authenticate": 'Basic realm="gpu-pod-exporter"'},
            )
        elif path == "/metrics":
            plain, compressed = self.server.exposition.latest()
            gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
            self._send(
                200,
                compressed if gzipped else plain,
                CONTENT_TYPE,
                send_body,
                {"Content-Encoding": "gzip"} if gzipped else {},
            )
        elif path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8", send_body)
        elif path == "/readyz":
            ready, reason = self.server.readiness()
            self._send(200 if ready else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8", send_body)
        elif path == "/":
            page = b"GPU pod exporter: /metrics /healthz /readyz\n"
            self._send(200, page, "text/plain; charset=utf-8", send_body)
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8", send_body)

    def _send(
        self, code: int, body: bytes, content_type: str, send_body: bool, headers: dict[str, str] | None = None
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


class MetricsServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        exposition: Exposition,
        readiness: Callable[[], tuple[bool, str]],
        web: WebConfig | None = None,
    ) -> None:
        self.exposition = exposition
        self.readiness = readiness
        self.web = web or WebConfig(tls=None, auth=None)
        super().__init__(address, _Handler)
        if self.web.tls is not None:
            # The handshake happens on the connection's own thread, at its first read, so a client
            # that never completes one cannot hold up the accept loop.
            self.socket = self.web.tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up, times out or fails the TLS handshake is its problem, not ours."""
        log.debug("connection from %s failed", client_address, exc_info=True)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="http", daemon=True)
        thread.start()
        return thread
