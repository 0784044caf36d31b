"""The shared HTTP server under clients that are slow, silent, numerous or rude, over real sockets
(plain and TLS): real requests keep being answered, threads stay bounded, deadlines close what
never completes. The agent is also tried as a process, as a slowloris attack would find it."""

from __future__ import annotations

import contextlib
import http.client
import logging
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from exporter.exposition.httpserver import Handler, Server, client_key
from sim.certs import Pki, make_pki
from sim.scenario import Gpu, Scenario, gpu_uuid

WORKERS = 4
BIG = b"x" * 16_000_000  # more than loopback's socket buffers hold


class Echo(Handler):
    """Answers with what a route can see of its request; ``/big`` is 16 MB, ``/boom`` raises,
    ``/block`` waits for the test."""

    release = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/boom":
            raise RuntimeError("a bug in a route")
        if self.path == "/block":
            self.release.wait(30)
        if self.path == "/big":
            self.send(200, BIG, "text/plain")
            return
        peer: dict[str, Any] = (
            self.connection.getpeercert() if isinstance(self.connection, ssl.SSLSocket) else None
        ) or {}
        names = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
        body = f"{self.path} port={self.client_address[1]} cn={''.join(names)}"
        self.send(200, body.encode(), "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send(200, b"got " + body, "text/plain")


def serve(tls: ssl.SSLContext | None = None, **limits: Any) -> Server:
    server = Server(("127.0.0.1", 0), Echo, tls, workers=WORKERS, **limits)
    server.start()
    return server


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    Echo.release.set()
    for server in started:
        server.stop()
    Echo.release.clear()


def get(server: Server, path: str = "/", context: ssl.SSLContext | None = None) -> tuple[int, str]:
    host, port = server.server_address
    connection = (
        http.client.HTTPSConnection(host, port, context=context, timeout=10)
        if context
        else http.client.HTTPConnection(host, port, timeout=10)
    )
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(server.server_address, timeout=10)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes ``sock`` within ``within_s`` (reading and discarding meanwhile)."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def drip(sockets: list[socket.socket], stop: threading.Event, every_s: float = 0.1) -> None:
    """One more header byte to every socket every ``every_s``, never the end of the head."""
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100_000
    position = 0
    while not stop.wait(every_s):
        for sock in sockets:
            with contextlib.suppress(OSError):  # closed by the server: its deadline or its limit
                sock.send(head[position : position + 1])
        position += 1


def test_slow_clients_hold_no_threads_while_requests_are_answered(servers: list[Server]) -> None:
    threads_before = threading.active_count()
    servers.append(server := serve(request_timeout=60))
    slow = [connect(server) for _ in range(300)]
    stop = threading.Event()
    dripper = threading.Thread(target=drip, args=(slow, stop), daemon=True)
    dripper.start()
    try:
        time.sleep(0.5)
        answers = [get(server, f"/{n}") for n in range(20)]
        assert all(status == 200 for status, _ in answers)
        # The loop, the workers, the dripper: not a thread per connection.
        assert threading.active_count() <= threads_before + 1 + WORKERS + 1
        assert not any(closed_by_server(sock, 0.01) for sock in slow[-10:])  # still open, still dripping
    finally:
        stop.set()
        dripper.join()
        for sock in slow:
            sock.close()


def test_a_request_that_never_completes_is_closed_after_the_deadline(servers: list[Server]) -> None:
    servers.append(server := serve(request_timeout=1))
    dripping, body_missing = connect(server), connect(server)
    stop = threading.Event()
    dripper = threading.Thread(target=drip, args=([dripping], stop, 0.2), daemon=True)
    dripper.start()
    body_missing.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten b")
    try:
        # A byte every 0.2 s would keep a per-read timeout waiting for ever; the deadline does not.
        assert closed_by_server(dripping, 10)
        assert closed_by_server(body_missing, 10)
    finally:
        stop.set()
        dripper.join()
    assert get(server, "/after")[0] == 200


def test_over_the_limit_the_oldest_unfinished_connection_makes_room(servers: list[Server]) -> None:
    servers.append(server := serve(max_connections=20, request_timeout=60))
    held = []
    for _ in range(20):
        sock = connect(server)
        sock.sendall(b"GET / HT")
        held.append(sock)
        time.sleep(0.01)  # so the server sees them in this order
    status, body = get(server, "/newcomer")
    assert (status, body.split()[0]) == (200, "/newcomer")
    assert closed_by_server(held[0], 5)
    assert not closed_by_server(held[-1], 0.2)
    # A request completed on a connection that was held is still answered.
    held[-1].sendall(b"TP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert held[-1].recv(65536).startswith(b"HTTP/1.1 200")
    for sock in held:
        sock.close()


def test_at_the_limit_a_connection_whose_request_is_on_its_way_outlives_idle_ones(servers: list[Server]) -> None:
    """The newest connection, its request not yet in (a probe over a slow link), was the one closed
    to admit the next while keep-alive connections sat idle."""
    servers.append(server := serve(max_connections=10, idle_timeout=60))
    idle = []
    for n in range(9):
        connection = http.client.HTTPConnection(*server.server_address, timeout=10)
        connection.request("GET", f"/idle-{n}")
        assert connection.getresponse().read().startswith(b"/idle-")
        idle.append(connection)
    on_its_way = connect(server)
    time.sleep(0.1)  # the server has accepted it
    assert get(server, "/newcomer")[0] == 200
    on_its_way.sendall(b"GET /on-its-way HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert on_its_way.recv(65536).startswith(b"HTTP/1.1 200")
    assert idle[0].sock is not None and closed_by_server(idle[0].sock, 5)  # the longest idle made room
    for connection in idle:
        connection.close()
    on_its_way.close()


def from_address(host: str) -> socket.socket:
    """A socket whose connection comes from ``host`` (any of 127.0.0.0/8 is loopback): another client."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.settimeout(5)
    return sock


def test_a_client_churning_connections_harms_neither_probes_nor_a_kept_alive_scraper(servers: list[Server]) -> None:
    """One client opening ~100 connections a second, each sending one request then idling, filled the
    table: the newest connection still waiting (a probe's) was closed to admit the next, and the
    scraper's kept-alive connection went as the longest idle. Now that client may hold only so many,
    and its own connections make room for its next."""
    servers.append(server := serve(max_connections=48, max_connections_per_client=16, probe_paths={"/probe"}))
    stop = threading.Event()
    churned: list[socket.socket] = []

    def churn() -> None:
        while not stop.wait(0.01) and len(churned) < 1000:
            sock = from_address("127.0.0.2")
            churned.append(sock)
            with contextlib.suppress(OSError):  # closed by the server to admit the churner's next
                sock.connect(server.server_address)
                sock.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.recv(65536)

    def probe() -> bool:
        with from_address("127.0.0.3") as sock:
            try:
                sock.connect(server.server_address)
                time.sleep(0.02)  # the round trips of a TLS handshake, or a slow link
                sock.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return sock.recv(65536).startswith(b"HTTP/1.1 200")
            except OSError:
                return False

    scraper = http.client.HTTPConnection(*server.server_address, timeout=5, source_address=("127.0.0.4", 0))
    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    scrapes: list[bytes | str] = []
    probes: list[bool] = []
    try:
        for second in range(5):
            try:
                scraper.request("GET", f"/scrape-{second}")
                scrapes.append(scraper.getresponse().read().split()[1])  # port=...: which connection
            except OSError as error:
                scrapes.append(repr(error))
                scraper.close()
            started = time.monotonic()
            while time.monotonic() - started < 1:
                probes.append(probe())
    finally:
        stop.set()
        churner.join()
        scraper.close()
        for sock in churned:
            sock.close()
    assert len(churned) > 300  # the churn went on throughout
    assert probes.count(False) == 0 and len(probes) > 50
    assert len(set(scrapes)) == 1, scrapes  # every scrape on the one kept-alive connection


def test_over_the_limit_clients_that_never_read_go_before_an_idle_scraper(servers: list[Server]) -> None:
    """Clients that pipeline requests for a large answer and never read it once were evicted last:
    filling the limit with them pushed out a scraper's idle keep-alive connection."""
    servers.append(server := serve(max_connections=20, write_timeout=60, idle_timeout=60))
    scraper = http.client.HTTPConnection(*server.server_address, timeout=10)
    scraper.request("GET", "/first")
    assert scraper.getresponse().read().startswith(b"/first")

    def hog() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(server.server_address)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 5)  # never read
        return sock

    hogs = [hog() for _ in range(19)]
    time.sleep(1.5)  # their answers have stopped draining
    for n in range(5):
        hogs.append(hog())  # the next ones keep coming
        status, body = get(server, f"/newcomer-{n}")
        assert (status, body.split()[0]) == (200, f"/newcomer-{n}")
    scraper.request("GET", "/again")
    assert scraper.getresponse().read().startswith(b"/again")
    assert closed_by_server(hogs[0], 5)
    scraper.close()
    for sock in hogs:
        sock.close()


def test_keep_alive_pipelining_bodies_and_the_idle_deadline(servers: list[Server]) -> None:
    servers.append(server := serve(idle_timeout=1))
    connection = http.client.HTTPConnection(*server.server_address, timeout=10)
    ports = set()
    for n in range(3):
        connection.request("GET", f"/{n}")
        response = connection.getresponse()
        assert response.status == 200
        ports.add(response.read().split()[1])
    assert len(ports) == 1  # one connection served all three
    connection.close()

    sock = connect(server)
    sock.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\npayloadGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    while b"cn=" not in received:
        received += sock.recv(65536)
    assert re.findall(rb"\r\n\r\n(got [a-z]+|/[a-z])", received) == [b"got payload", b"/b"]
    # Idle past idle_timeout (1 s): closed by the server well before a generous 5 s.
    assert closed_by_server(sock, 5)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", b"431"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"501"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", b"413"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", b"400"),
        # The handler's parser ends a header line at a bare CR: chunked framing hidden behind one.
        (b"POST / HTTP/1.1\r\nHost: x\r\nX-A: 1\rTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"400"),
    ],
    ids=["head-too-large", "chunked-body", "body-too-large", "two-lengths", "bare-cr"],
)
def test_requests_beyond_the_bounds_are_answered_and_closed(
    servers: list[Server], request_bytes: bytes, status: bytes
) -> None:
    servers.append(server := serve())
    sock = connect(server)
    sock.sendall(request_bytes)
    answer = sock.recv(65536)
    assert answer.split()[1] == status and b"Connection: close" in answer
    assert closed_by_server(sock, 5)


def test_a_route_that_raises_answers_500_and_the_server_carries_on(servers: list[Server]) -> None:
    servers.append(server := serve())
    assert get(server, "/boom")[0] == 500
    assert get(server, "/fine")[0] == 200


def test_clients_that_do_not_read_hold_no_threads(servers: list[Server]) -> None:
    threads_before = threading.active_count()
    servers.append(server := serve(write_timeout=60))
    readers = []
    for _ in range(10):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, before connecting
        sock.connect(server.server_address)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        readers.append(sock)
    time.sleep(0.5)
    assert get(server, "/meanwhile")[0] == 200
    assert threading.active_count() <= threads_before + 1 + WORKERS
    # Each still gets its answer in full once it reads.
    readers[0].settimeout(10)
    received = 0
    while received < len(BIG):
        received += len(readers[0].recv(1 << 20))
    for sock in readers:
        sock.close()


def test_probe_paths_are_answered_while_every_worker_is_busy(servers: list[Server]) -> None:
    servers.append(server := serve(probe_paths={"/probe"}))
    blocked = [connect(server) for _ in range(WORKERS + 2)]
    for sock in blocked:
        sock.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    assert get(server, "/probe?verbose")[0] == 200  # a worker would be needed, and none is free
    sock = connect(server)
    sock.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\n\r\n" * 300)  # pipelined: answered in turn, in order
    received = b""
    while received.count(b"/probe port=") < 300:
        received += sock.recv(65536)
    sock.close()
    Echo.release.set()
    for sock in blocked:
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()


def test_stop_is_prompt_with_a_request_in_a_handler(servers: list[Server]) -> None:
    server = serve()
    port = server.server_address[1]
    blocked = connect(server)
    blocked.sendall(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3
    assert closed_by_server(blocked, 5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    Echo.release.set()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def tls_server_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    context.load_verify_locations(pki.ca)
    context.verify_mode = ssl.CERT_OPTIONAL  # as the adapter asks kube-apiserver's front proxy
    return context


def test_tls_slow_handshakes_block_no_one_and_the_client_certificate_reaches_the_route(
    servers: list[Server], pki: Pki
) -> None:
    threads_before = threading.active_count()
    servers.append(server := serve(tls_server_context(pki), request_timeout=60))
    stalled = []
    for n in range(100):
        sock = connect(server)
        if n % 2:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # the first bytes of a ClientHello, then nothing
        stalled.append(sock)
    client = ssl.create_default_context(cafile=str(pki.ca))
    status, body = get(server, "/anonymous", client)
    assert (status, body.split()[-1]) == (200, "cn=")
    client.load_cert_chain(pki.client_cert, pki.client_key)
    status, body = get(server, "/with-cert", client)
    assert (status, body.split()[-1]) == (200, "cn=prometheus")
    assert request_with_a_dripped_client_hello(server, pki.ca).startswith(b"HTTP/1.1 200")
    assert threading.active_count() <= threads_before + 1 + WORKERS
    # Plain HTTP on the TLS port is closed, not answered in the clear.
    plain = connect(server)
    plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert closed_by_server(plain, 5)
    for sock in stalled:
        sock.close()


def client_hello(ca: Path) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """A client's TLS object, its two buffers, and the ClientHello it sends first."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context(cafile=str(ca)).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return tls, incoming, outgoing, outgoing.read()


def in_records(hello: bytes, size: int) -> bytes:
    """The ClientHello's one record re-cut into records of ``size`` bytes, as TLS allows."""
    message = hello[5:]
    return b"".join(
        hello[:3] + len(part).to_bytes(2, "big") + part for part in re.findall(b".{1,%d}" % size, message, re.S)
    )


def request_with_a_dripped_client_hello(server: Server, ca: Path, record_size: int | None = None) -> bytes:
    """A TLS request whose ClientHello arrives 40 bytes at a time (a slow link, or a slow client),
    in records of ``record_size`` bytes when given."""
    tls, incoming, outgoing, hello = client_hello(ca)
    if record_size is not None:
        hello = in_records(hello, record_size)
    sock = connect(server)
    for start in range(0, len(hello), 40):
        sock.sendall(hello[start : start + 40])
        time.sleep(0.02)
    while True:
        incoming.write(sock.recv(65536))
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
    tls.write(b"GET /dripped HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    sock.sendall(outgoing.read())
    answer = b""
    while b"cn=" not in answer:
        incoming.write(sock.recv(65536))
        with contextlib.suppress(ssl.SSLWantReadError):
            answer += tls.read(65536)
    sock.close()
    return answer


def test_a_stalled_tls_handshake_is_closed_after_the_deadline(servers: list[Server], pki: Pki) -> None:
    servers.append(server := serve(tls_server_context(pki), request_timeout=1))
    sock = connect(server)
    sock.sendall(b"\x16\x03\x01\x02\x00\x01")
    assert closed_by_server(sock, 10)


def test_a_client_gone_mid_hello_is_closed_at_once_and_costs_no_cpu(servers: list[Server], pki: Pki) -> None:
    servers.append(server := serve(tls_server_context(pki), request_timeout=60))
    halves = []
    for partial in (b"\x16\x03", b"\x16\x03\x01\x02\x00\x01"):  # within the record header, within the record
        sock = connect(server)
        sock.sendall(partial)
        sock.shutdown(socket.SHUT_WR)
        halves.append(sock)
    assert all(closed_by_server(sock, 5) for sock in halves)  # not at the 60 s deadline
    cpu = time.process_time()
    time.sleep(1)
    assert time.process_time() - cpu < 0.5  # nothing left spinning on a closed connection


def rss_bytes() -> int:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024  # type: ignore[union-attr]


def test_a_client_hello_in_small_records_gets_no_tls_object_until_whole(servers: list[Server], pki: Pki) -> None:
    """A ClientHello may be cut into a few records; one stalled after a small first record once got
    its ~48 KB TLS object at once. It is still served when its records are all in."""
    servers.append(server := serve(tls_server_context(pki), request_timeout=60))
    assert get(server, "/warm-up", ssl.create_default_context(cafile=str(pki.ca)))[0] == 200
    before = rss_bytes()
    stalled = []
    for _ in range(400):
        sock = connect(server)
        sock.sendall(b"\x16\x03\x01\x00\x04" + b"\x01\x00\x01\x00")  # a whole record: a hello's first 4 bytes
        stalled.append(sock)
    time.sleep(1)
    assert rss_bytes() - before < 6_000_000  # 400 TLS objects mid-handshake are ~19 MB
    assert request_with_a_dripped_client_hello(server, pki.ca, record_size=200).startswith(b"HTTP/1.1 200")
    for sock in stalled:
        sock.close()


def test_clients_resetting_after_their_hello_are_closed_quietly(
    servers: list[Server], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A ClientHello then a reset is anyone's to send, unauthenticated: one ERROR and traceback
    each would fill the log (and the disk) at the attacker's pace."""
    servers.append(server := serve(tls_server_context(pki), request_timeout=60))
    hello = client_hello(pki.ca)[3]
    for _ in range(300):
        sock = connect(server)
        sock.sendall(hello)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert get(server, "/after", ssl.create_default_context(cafile=str(pki.ca)))[0] == 200
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def process_threads(pid: int) -> int:
    return int(re.search(r"Threads:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))  # type: ignore[union-attr]


def test_the_agent_under_a_slowloris_attack(tmp_path: Path, start_agent) -> None:  # type: ignore[no-untyped-def]
    """More slow connections than the agent admits: scrapes are answered, threads do not grow with
    connections."""
    scenario = tmp_path / "scenario.txt"
    Scenario(gpus=[Gpu(gpu_uuid(0), util=33)]).write(scenario)
    agent = start_agent(["--no-kubernetes", "--pod-resources-socket", str(tmp_path / "none.sock")], scenario)
    assert requests.get(agent.url + "/metrics", timeout=5).status_code == 200
    threads_before = process_threads(agent.process.pid)
    slow = []
    for _ in range(600):
        try:
            slow.append(socket.create_connection(("127.0.0.1", agent.port), timeout=5))
        except OSError:
            break
    stop = threading.Event()
    dripper = threading.Thread(target=drip, args=(slow, stop, 0.5), daemon=True)
    dripper.start()
    try:
        time.sleep(1)
        for _ in range(20):
            scrape = requests.get(agent.url + "/metrics", timeout=5)
            assert scrape.status_code == 200 and "gpu_exporter_nvml_up" in scrape.text
        assert process_threads(agent.process.pid) <= threads_before + 16
    finally:
        stop.set()
        dripper.join()
        for sock in slow:
            sock.close()


def test_connections_kept_busy_by_pipelining_cannot_lock_out_a_probe(servers: list[Server]) -> None:
    """Clients from several addresses filled the limit with connections each pipelining cheap
    requests: a connection whose request was with a worker could not be closed to make room, and
    its next request went to a worker as soon as its answer was out, so every new connection, a
    probe's included, was closed at accept."""
    servers.append(server := serve(max_connections=48, max_connections_per_client=16, probe_paths={"/probe"}))
    requests_ = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n" * 200
    pipelining = []
    for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        for _ in range(16):
            sock = from_address(host)
            sock.connect(server.server_address)
            sock.setblocking(False)
            pipelining.append(sock)
    stop = threading.Event()

    def pump() -> None:
        """Keeps every pipeline full, reading the answers as they come."""
        while not stop.is_set():
            for sock in pipelining:
                with contextlib.suppress(OSError):  # full, or closed by the server to make room
                    while sock.recv(65536):
                        pass
                with contextlib.suppress(OSError):
                    sock.send(requests_)
            time.sleep(0.001)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    probes = []
    try:
        time.sleep(0.5)  # every pipeline is flowing
        for _ in range(10):
            with from_address("127.0.0.9") as sock:
                try:
                    sock.connect(server.server_address)
                    sock.sendall(b"GET /probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    probes.append(sock.recv(65536)[:12])
                except OSError as error:
                    probes.append(repr(error).encode())
            time.sleep(0.05)
    finally:
        stop.set()
        pumper.join()
        for sock in pipelining:
            sock.close()
    assert probes == [b"HTTP/1.1 200"] * 10, probes


def test_a_client_hello_in_many_tiny_records_is_refused_at_once(servers: list[Server], pki: Pki) -> None:
    """Each record of a hello cut into 1-byte records woke the loop to parse every record again from
    the start: a few dozen such clients slowed every answer. Real clients send one or two records."""
    servers.append(server := serve(tls_server_context(pki), request_timeout=60))
    hello = in_records(client_hello(pki.ca)[3], 1)
    sock = connect(server)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for start in range(0, len(hello), 6):  # one record at a time
        with contextlib.suppress(OSError):  # closed by the server meanwhile
            sock.send(hello[start : start + 6])
    assert closed_by_server(sock, 5)  # not at the 60 s deadline
    sock.close()
    assert get(server, "/after", ssl.create_default_context(cafile=str(pki.ca)))[0] == 200


@pytest.mark.parametrize(
    ("host", "client"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),  # an IPv4 client on a dual-stack socket is that IPv4 client
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),  # one site's /64 is one client: its hosts choose freely in it
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_a_client_is_an_ipv4_address_or_an_ipv6_64(host: str, client: str) -> None:
    """The per-client bound counted exact addresses: a host owning a /64 was as many clients as it liked."""
    assert client_key(host) == client
