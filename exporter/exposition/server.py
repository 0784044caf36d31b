"""The agent's HTTP routes: /metrics sends the bytes the render thread made (and the small part
measured at scrape time), /healthz and /readyz answer from the server's loop, never queued.

A scrape never waits on NVML, the kubelet or the API, so its latency does not depend on how slow a
device is.
"""

from __future__ import annotations

from collections.abc import Callable

from exporter.exposition.httpserver import Handler, Server
from exporter.exposition.render import CONTENT_TYPE, Exposition
from exporter.exposition.webconfig import WebConfig

_UNAUTHENTICATED = ("/healthz", "/readyz")  # also answered by the server's loop itself: never queued


class _Handler(Handler):
    server: MetricsServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        auth = self.server.web.auth
        # Probes stay open, as on Kubernetes' own servers: they reveal nothing but liveness.
        if auth is not None and path not in _UNAUTHENTICATED and not auth.allows(self.headers.get("Authorization")):
            self.send(
                401,
                b"unauthorized\n",
                "text/plain; charset=utf-8",
                send_body,
                {"WWW-Authenticate": 'Basic realm="gpu-pod-exporter"'},
            )
        elif path == "/metrics":
            gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
            self.send(
                200,
                # In the loop (a current rendering was seen) never wait: a poll finishing just now
                # must not hold every connection up for a render.
                self.server.exposition.latest_parts(gzipped, wait=not self.server.in_loop()),
                CONTENT_TYPE,
                send_body,
                {"Content-Encoding": "gzip"} if gzipped else {},
            )
        elif path == "/healthz":
            self.send(200, b"ok\n", "text/plain; charset=utf-8", send_body)
        elif path == "/readyz":
            ready, reason = self.server.readiness()
            self.send(200 if ready else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8", send_body)
        elif path == "/":
            page = b"GPU pod exporter: /metrics /healthz /readyz\n"
            self.send(200, page, "text/plain; charset=utf-8", send_body)
        else:
            self.send(404, b"not found\n", "text/plain; charset=utf-8", send_body)


class MetricsServer(Server):
    def __init__(
        self,
        address: tuple[str, int],
        exposition: Exposition,
        readiness: Callable[[], tuple[bool, str]],
        web: WebConfig | None = None,
        max_connections_per_client: int | None = None,
    ) -> None:
        self.exposition = exposition
        self.readiness = readiness
        self.web = web or WebConfig(tls=None, auth=None)
        super().__init__(
            address,
            _Handler,
            self.web.tls,
            peer_check=self.web.allows_peer,
            probe_paths=_UNAUTHENTICATED,
            max_connections_per_client=max_connections_per_client,
        )

    def answers_inline(self, path: str) -> bool:
        """The probes, and a scrape while the rendering is current and no password is to be checked:
        it then only copies bytes, so the loop sends them without a hand-off to a worker thread
        (which cost most of a scrape's latency). A scrape that must wait for a render, or for
        bcrypt, goes to a worker."""
        if path == "/metrics":
            return self.web.auth is None and self.exposition.current()
        return super().answers_inline(path)
