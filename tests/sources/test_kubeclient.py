"""The Kubernetes client's HTTP and JSON edge against a server sending exact bytes over a real socket:
what it refuses, and that a read timing out in the middle of a chunk loses nothing."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from exporter.sources.kubeclient import Credentials, KubeClient, ProtocolError, StreamTimeout


class RawServer:
    """Accepts one connection, reads the request head, then sends ``parts`` (a float: pause that long)."""

    def __init__(self, parts: Sequence[bytes | float]) -> None:
        self.parts = parts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            head = b""
            while b"\r\n\r\n" not in head:
                head += connection.recv(4096)
            for part in self.parts:
                if isinstance(part, float):
                    time.sleep(part)
                else:
                    connection.sendall(part)

    def client(self) -> KubeClient:
        return KubeClient(Credentials("http", "127.0.0.1", self.port, "", None, "127.0.0.1", None))

    def close(self) -> None:
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[type[RawServer]]:
    servers: list[RawServer] = []

    class Tracked(RawServer):
        def __init__(self, parts: Sequence[bytes | float]) -> None:
            super().__init__(parts)
            servers.append(self)

    yield Tracked
    for server in servers:
        server.close()


CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "response",
    [
        CHUNKED + b"0x2\r\n{}\r\n0\r\n\r\n",  # int(x, 16) accepted a 0x prefix
        CHUNKED + b'1_0\r\n{"a":"bbbbbbbb"}\r\n0\r\n\r\n',  # ... and underscores
        CHUNKED + b"-1\r\n{}\r\n0\r\n\r\n",  # ... and a sign
        CHUNKED + b"2\r\n{}XX\r\n0\r\n\r\n",  # the CRLF after the chunk's data is missing
        b"HTTP/1.1 20\xb2 OK\r\nContent-Length: 2\r\n\r\n{}",  # a superscript two: isdigit(), not int()
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}",  # closed inside the body
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000 + b"\r\n\r\n",  # a head over the bound
        b"",  # closed before any response
    ],
    ids=["0x-size", "underscore-size", "negative-size", "no-crlf", "unicode-status", "short", "huge-head", "eof"],
)
def test_malformed_http_is_a_protocol_error(serve: type[RawServer], response: bytes) -> None:
    server = serve([response])
    with pytest.raises(ProtocolError):
        server.client().get_json("/api/v1/pods", {}, "application/json", 5)


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000 + b"]" * 100_000, b"not json", b'{"n": ' + b"9" * 5000 + b"}"],
    ids=["nested-too-deep", "not-json", "huge-integer"],
)
def test_unreadable_json_is_a_protocol_error(serve: type[RawServer], body: bytes) -> None:
    server = serve([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body])
    with pytest.raises(ProtocolError, match="not JSON"):
        server.client().get_json("/api/v1/pods", {}, "application/json", 5)


def test_a_read_timing_out_inside_a_chunk_loses_nothing(serve: type[RawServer]) -> None:
    """What ruled out http.client: after a timed-out read the same connection reads on."""
    line = b'{"type": "ADDED"}\n'
    server = serve([CHUNKED + b"%x\r\n" % len(line) + line[:7], 0.5, line[7:] + b"\r\n0\r\n\r\n"])
    connection = server.client().open("/api/v1/pods", {"watch": "true"}, "application/json", time.monotonic() + 5)
    try:
        assert connection.read_head(time.monotonic() + 5) == 200
        with pytest.raises(StreamTimeout):
            connection.read_line(time.monotonic() + 0.1)
        assert connection.read_line(time.monotonic() + 5) == line.rstrip(b"\n")
        assert connection.read_line(time.monotonic() + 5) is None
    finally:
        connection.close()
