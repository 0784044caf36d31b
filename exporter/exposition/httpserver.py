"""HTTP plumbing the agent's and the adapter's servers share: a server whose cost is bounded by
what it is asked to compute, not by how many clients hold a connection or how slowly they talk; a
handler that answers with a body of known length.

Why not a thread per connection (``ThreadingHTTPServer``): a client that drips one header byte
every few seconds then holds a thread for as long as it likes, and 2000 of them held 2000 threads
and 40-75 MB. Here one thread, the loop, owns every socket. It accepts, does TLS handshakes without
blocking, reads until a whole request (head and body) has arrived, and writes responses out. Only
a complete request goes to one of a few worker threads, which runs the ``Handler`` on bytes in
memory and hands the response back. So a connection costs a thread only while its request is
being computed, never while its client is slow to send or to read.

HTTP itself, reading requests and writing responses, is h11's: one sans-I/O parser that never
touches a socket, so the loop keeps every socket to itself. h11 refuses conflicting
Content-Lengths, a bare CR in a head, a missing Host and a head still incomplete after 32 KiB;
it unfolds obs-fold and accepts bare LF line ends, as RFC 9112 allows a recipient to. Around it:

- at most ``max_connections`` are open, and at most ``max_connections_per_client`` from one client
  address. Beyond either, one connection is closed to admit the new one (for the per-client
  bound, one of that client's own), the least useful first: one closing after its answer; one that
  has waited a second (``_GRACE_S``: time for a request head to arrive) without a whole request;
  a writer whose answer has taken nothing for a second; the longest idle keep-alive one; one
  still within its second of waiting; an answer that is draining; last, one whose request is
  with a worker (its answer is dropped). So a flood of slow senders, clients that never read their
  answers, clients keeping every connection busy by pipelining, or one client churning
  connections cannot lock out a probe whose request is on its way, nor a scraper that polls on a
  kept-alive connection. A client address is an IPv4 address or an IPv6 /64 (``client_key``);
- a connection's next request is read only once its answer has gone out, so a client pipelining
  requests holds at most one answer (and a read of requests not yet parsed) at a time;
- the TLS handshake and the whole first request must arrive within ``request_timeout`` of the
  accept, a later request within ``request_timeout`` of its first byte; an idle keep-alive
  connection is closed after ``idle_timeout``, a response not taken within ``write_timeout``;
- a request head is at most 32 KiB (h11's bound on an incomplete event, checked after each read of
  4 KiB) with at most 100 fields, and a body at most 16 KiB (neither server takes bodies);
  Transfer-Encoding is refused, so a body is only ever framed by its Content-Length;
- over TLS, a connection gets its TLS object (~48 KB of OpenSSL buffers mid-handshake) only once
  its whole ClientHello has arrived, so clients that stall a handshake cost ~1 KB each; a hello
  in more than a few records is refused.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import http.client
import io
import ipaddress
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import h11

from exporter.supervise import StateLog

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 512
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 64
MAX_HEAD_BYTES = 32 * 1024
MAX_HEADERS = 100  # as http.client and http.server allow
MAX_BODY_BYTES = 16 * 1024
_READ_BYTES = 4096  # h11 checks its bound on a head between reads: a whole head may pass it by one read
_GRACE_S = 1.0  # a connection waiting for its request this long is evicted before idle keep-alives
_LINGER_S = 1.0  # how long a connection closed after an error answer may still send (then RST is harmless)
_SEND_BYTES = 256 * 1024
_STALLED_S = 1.0  # an answer that took no bytes for this long is not draining: evicted before idle keep-alives
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_EVICTING = "closing the least useful connection to admit each new one"


@dataclass
class _Answer:
    code: int
    headers: list[tuple[str, str]]
    body: tuple[bytes, ...] = ()
    close: bool = False  # the connection closes after it


def _plain(code: int, reason: str = "", close: bool = True) -> _Answer:
    body = f"{reason or HTTPStatus(code).phrase}\n".encode()
    fields = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    return _Answer(code, fields, (body,), close)


class Handler:
    """What a route sees of one request: ``command`` (the method), ``path`` (the request target),
    ``headers`` (an ``http.client.HTTPMessage``), ``rfile`` (the body), ``connection`` (the socket:
    an ``ssl.SSLSocket`` over TLS, for ``getpeercert()``), ``client_address`` and ``server``.

    A route is a method ``do_<METHOD>`` that answers by calling ``send`` once, or ``drop``."""

    server: Server

    def __init__(
        self, server: Server, connection: socket.socket, address: Any, request: h11.Request, body: bytes
    ) -> None:
        self.server = server
        self.connection = connection
        self.client_address = address
        self.command = request.method.decode("ascii")
        self.path = request.target.decode("latin-1")
        self.headers = http.client.HTTPMessage()
        for name, value in request.headers.raw_items():
            self.headers[name.decode("latin-1")] = value.decode("latin-1")
        self.rfile = io.BytesIO(body)
        self.answer: _Answer | None = None
        self.dropped = False

    def send(
        self,
        code: int,
        body: bytes | tuple[bytes, ...],
        content_type: str,
        send_body: bool = True,
        headers: dict[str, str] | None = None,
    ) -> None:
        """``body`` may come in parts, sent one after the other: a large part shared by many
        answers (a rendering) is then sent as it is, not copied into each answer."""
        parts = (body,) if isinstance(body, bytes) else body
        fields = [("Content-Type", content_type), ("Content-Length", str(sum(map(len, parts))))]
        self.answer = _Answer(code, fields + list((headers or {}).items()), parts if send_body else ())

    def drop(self) -> None:
        """Closes the connection without an answer (the client sees EOF), whatever was sent."""
        self.dropped = True


_HELLO, _HANDSHAKE, _READ, _BUSY, _WRITE, _LINGER = range(6)
_TLS_HANDSHAKE_RECORD = 0x16
_TLS_CLIENT_HELLO = 0x01
_TLS_RECORD_HEADER = 5
_TLS_MAX_PLAINTEXT = 2**14  # RFC 8446 5.1: a record's plaintext, and a hello comes in plaintext
_TLS_MAX_HELLO = 32 * 1024  # records of a ClientHello; browsers' largest (post-quantum key shares) are ~2 KB
# Clients send a hello in one record, rarely two. The hello is parsed again from its start each
# time another record is in: a bound on the records bounds that work, which a hello dripped in
# 1-byte records would make quadratic, on the loop thread.
_TLS_MAX_HELLO_RECORDS = 4


class _Connection:
    __slots__ = (
        "address",
        "awaited",
        "body",
        "client",
        "closed",
        "deadline",
        "eof",
        "events",
        "group",
        "keep_alive",
        "parser",
        "pending",
        "progressed",
        "request",
        "since",
        "sock",
        "state",
        "tls",
    )

    def __init__(self, sock: socket.socket, address: Any, tls: ssl.SSLContext | None) -> None:
        self.sock = sock
        self.tls = tls  # the context to wrap the connection with, once its ClientHello is in
        self.awaited = _TLS_RECORD_HEADER  # bytes of it that make the socket readable (SO_RCVLOWAT)
        self.address = address
        self.client = client_key(address[0])
        self.state = _HELLO
        self.parser: h11.Connection | None = None  # made once the connection reads HTTP
        self.request: h11.Request | None = None  # while its body arrives and it is answered
        self.body = bytearray()
        self.eof = False  # the client will send nothing more
        self.keep_alive = False
        self.pending: collections.deque[memoryview] = collections.deque()
        self.progressed = 0.0  # when its answer last took bytes (or began), while writing
        self.group: dict[_Connection, None] | None = None
        self.since = 0.0  # when it entered its group
        self.deadline = 0.0
        self.events = 0
        self.closed = False


class Server:
    """Serves ``handler`` on ``address``, over TLS when ``tls`` is given.

    ``peer_check`` sees each client certificate (``getpeercert()``) after the handshake; a ``False``
    closes the connection before any request is read. ``workers`` bounds the threads computing
    answers; they start as needed. A request for one of ``probe_paths`` (the path alone, before any
    query) is answered by the loop thread itself, never queued behind the workers: a liveness probe
    must not wait behind work that slow or hostile clients brought (bcrypt checks, say), or the
    kubelet restarts a healthy process. Their handler must therefore be cheap and never block.
    ``start()`` serves from a thread, ``stop()`` stops serving, closes every connection and the
    listening socket, and returns within about a second.
    """

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[Handler],
        tls: ssl.SSLContext | None,
        *,
        peer_check: Callable[[Mapping[str, Any]], bool] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_client: int | None = None,
        workers: int = 16,
        request_timeout: float = 10.0,
        idle_timeout: float = 120.0,
        write_timeout: float = 30.0,
        probe_paths: Collection[str] = (),
    ) -> None:
        self.handler_class = handler
        self.probe_paths = frozenset(probe_paths)
        self.tls = tls
        self.peer_check = peer_check
        self.max_connections = max_connections
        self.max_connections_per_client = max_connections_per_client or max_connections
        self.max_workers = workers
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.write_timeout = write_timeout
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(128)
            self.socket.setblocking(False)
        except OSError:
            self.socket.close()
            raise
        self.server_address: tuple[str, int] = self.socket.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._selector.register(self._wake_in, selectors.EVENT_READ, "wake")
        self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        self._accept_paused_until: float | None = None
        self._connections: set[_Connection] = set()
        self._clients: dict[str, set[_Connection]] = {}  # open connections by client (client_key)
        # Open connections by what they are doing, each in the order they started doing it; the
        # first of each is the candidate from its group to close to admit a new connection.
        self._lingering: dict[_Connection, None] = {}  # answered, closing
        self._opening: dict[_Connection, None] = {}  # handshake, partial request
        self._idle: dict[_Connection, None] = {}  # keep-alive, waiting for the next request
        self._writing: dict[_Connection, None] = {}  # in the order their answers last took bytes
        self._busy: dict[_Connection, None] = {}  # a request with the workers (queued or computed)
        self._at_limit = StateLog(log, "admitting connections")
        self._client_at_limit = StateLog(log, "admitting a client's connections")
        self._peers = StateLog(log, "client certificates")
        self._next_sweep = 0.0
        self._done: collections.deque[tuple[_Connection, _Answer | None]] = collections.deque()
        # Requests waiting for a worker, oldest first; a connection closed meanwhile takes its own out.
        self._jobs: dict[_Connection, tuple[h11.Request, bytes]] = {}
        self._job_ready = threading.Condition()
        self._workers: list[threading.Thread] = []
        self._idle_workers = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle, called from the owner's thread --------------------------------------------

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._thread.start()
        return self._thread

    def shutdown(self) -> None:
        """Stops serving: the loop closes every connection; workers finish their request or are
        left behind (daemon threads) after a short wait."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._job_ready:
            self._job_ready.notify_all()
        deadline = time.monotonic() + 0.5
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))

    def server_close(self) -> None:
        """Closes the listening socket (and every connection, if the loop never ran)."""
        for conn in list(self._connections):
            self._close(conn)
        self._selector.close()
        self.socket.close()
        self._wake_in.close()
        self._wake_out.close()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A handler raised: the client gets a 500 and the connection is closed; serving goes on."""
        log.exception("request from %s failed", client_address)

    # -- the loop ------------------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._stopping.is_set():
                self._turn()
        finally:
            for conn in list(self._connections):
                self._close(conn)

    def _turn(self) -> None:
        """One wait for events and the work they bring; any fault in one connection closes that
        connection only."""
        if self._done:  # answers made in the loop last turn (probes): send them now
            timeout: float | None = 0.0
        elif self._accept_paused_until is not None:
            timeout = 0.1
        elif self._connections:
            timeout = 0.25
        else:
            timeout = None
        try:
            events = self._selector.select(timeout)
        except (OSError, ValueError):  # closed under us by server_close
            self._stopping.set()
            return
        for key, _mask in events:
            if key.data == "accept":
                self._accept()
            elif key.data == "wake":
                self._drain_wake()
            else:
                self._guarded(self._ready, key.data)
        for _ in range(len(self._done)):  # those made meanwhile wait for the next turn: no connection hogs the loop
            conn, answer = self._done.popleft()
            if conn.closed:  # closed to make room while its answer was computed
                continue
            if answer is None:
                self._close(conn)
            else:
                self._guarded(self._respond, conn, answer)
        self._sweep()

    def _guarded(self, step: Callable[..., None], conn: _Connection, *args: Any) -> None:
        try:
            step(conn, *args)
        except Exception:
            log.exception("connection from %s failed", conn.address)
            self._close(conn)

    def _ready(self, conn: _Connection) -> None:
        if conn.closed:  # closed earlier in this turn, to admit another
            return
        if conn.state == _HELLO:
            self._hello(conn)
        elif conn.state == _HANDSHAKE:
            self._handshake(conn)
        elif conn.state == _READ:
            self._read(conn)
        elif conn.state == _WRITE:
            self._write(conn)
        elif conn.state == _LINGER:
            self._linger(conn)

    def _accept(self) -> None:
        for _ in range(64):  # then let the connections already open have a turn
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno in _OUT_OF_FDS:
                    self._at_limit.failed(f"cannot accept: {error.strerror}", _EVICTING)
                    if not self._evict(self._candidates()):
                        self._pause_accepting()
                    return
                continue  # the client gave up before we accepted (ECONNABORTED and kin)
            if not self._make_room(client_key(address[0])):
                sock.close()
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.tls is not None:  # readable once a TLS record header is in
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _TLS_RECORD_HEADER)
            except OSError:
                sock.close()
                continue
            conn = _Connection(sock, address, self.tls)
            self._connections.add(conn)
            self._clients.setdefault(conn.client, set()).add(conn)
            self._enter(conn, self._opening, self.request_timeout)
            if self.tls is None:
                self._speak_http(conn)
            else:
                self._watch(conn, selectors.EVENT_READ)

    def _make_room(self, client: str) -> bool:
        """Whether a new connection from ``client`` may be admitted, closing another if needed."""
        own = self._clients.get(client, set())
        if len(own) >= self.max_connections_per_client:
            self._client_at_limit.failed(
                f"a client holds {len(own)} connections, the most one client may", f"closing its own first ({client})"
            )
            return self._evict(own)
        if len(self._connections) >= self.max_connections:
            self._at_limit.failed(f"{len(self._connections)} connections open, the most allowed", _EVICTING)
            return self._evict(self._candidates())
        return True

    def _hello(self, conn: _Connection) -> None:
        """Waits for the client's whole ClientHello, in the kernel's buffer, before giving the
        connection a TLS object: OpenSSL holds ~48 KB of buffers for a handshake in progress, so a
        client dripping one costs that once wrapped and ~1 KB before. The hello may come in several
        records (a tiny first one, say), so the handshake message's own length is what is awaited.
        The socket is readable only once the bytes awaited are in (SO_RCVLOWAT), so waiting does
        not spin."""
        sock = conn.sock
        try:
            peeked = sock.recv(_TLS_MAX_HELLO, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        need = _client_hello_bytes(peeked)
        # Readable with fewer bytes than awaited: the client closed. Not a ClientHello, or a larger
        # one than any client sends: plain HTTP, say.
        if len(peeked) < conn.awaited or need is None or need > _TLS_MAX_HELLO:
            self._close(conn)
            return
        if len(peeked) < need:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
            conn.awaited = need
            return
        assert conn.tls is not None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            conn.sock = conn.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as error:  # ssl.SSLError included: the client reset the connection after its hello
            log.debug("TLS with %s failed before the handshake: %s", conn.address, error)
            self._close(conn)
            return
        conn.state = _HANDSHAKE
        self._handshake(conn)

    def _handshake(self, conn: _Connection) -> None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        except OSError as error:  # ssl.SSLError included: a bad certificate, plain HTTP, a reset
            log.debug("TLS handshake with %s failed: %s", conn.address, error)
            self._close(conn)
            return
        if self.peer_check is not None:
            if not self.peer_check(sock.getpeercert() or {}):
                self._peers.failed(
                    "refused the client certificate: not allowed by the web config",
                    f"closing such connections before any request (first from {conn.client})",
                )
                self._close(conn)
                return
            self._peers.recovered(f"one allowed from {conn.client}")
        self._speak_http(conn)
        self._read(conn)  # the first request may have come with the handshake's last flight

    def _speak_http(self, conn: _Connection) -> None:
        conn.parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        conn.state = _READ
        self._watch(conn, selectors.EVENT_READ)

    def _read(self, conn: _Connection) -> None:
        assert conn.parser is not None
        while True:
            try:
                data = conn.sock.recv(_READ_BYTES)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:
                self._close(conn)
                return
            if not data:
                conn.eof = True  # not given to h11: a request cut short is closed, not answered
                self._next_request(conn)
                return
            if conn.group is self._idle:  # the first byte of a later request
                self._enter(conn, self._opening, self.request_timeout)
            conn.parser.receive_data(data)
            if not self._next_request(conn):
                return

    def _next_request(self, conn: _Connection) -> bool:
        """Parses what has arrived: hands a whole request on, refuses one h11 or the bounds refuse.
        True while the request is still arriving."""
        parser = conn.parser
        assert parser is not None
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as error:
                self._refuse(conn, _refusal(parser, error))
                return False
            if event is h11.NEED_DATA:
                if conn.eof:
                    self._close(conn)
                return not conn.eof
            if isinstance(event, h11.Request):
                conn.request = event
                refusal = _beyond_bounds(event)
                if refusal is not None:
                    self._refuse(conn, refusal)
                    return False
            elif isinstance(event, h11.Data):
                conn.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch(conn)
                return False
            else:  # ConnectionClosed or PAUSED: never while reading a request, as h11 is used here
                self._close(conn)
                return False

    def _dispatch(self, conn: _Connection) -> None:
        request, body = conn.request, bytes(conn.body)
        assert request is not None
        conn.body.clear()
        conn.state = _BUSY
        self._enter(conn, self._busy, 0.0)
        self._watch(conn, 0)
        if self.answers_inline(request.target.split(b"?", 1)[0].decode("latin-1")):
            # Answered here, sent from the turn's queue of answers (not at once: a connection
            # pipelining probes would otherwise recurse once per request).
            self._done.append((conn, self._answer(conn, request, body)))
        else:
            self._submit(conn, request, body)

    def in_loop(self) -> bool:
        """True on the loop's own thread: a handler answering there must not block."""
        return threading.current_thread() is self._thread

    def answers_inline(self, path: str) -> bool:
        """Whether the loop answers a request for ``path`` itself: only for handlers that are cheap
        and never block (the probes, and what a subclass knows to be so right now)."""
        return path in self.probe_paths

    def _refuse(self, conn: _Connection, refusal: _Answer) -> None:
        conn.body.clear()
        self._respond(conn, refusal)

    def _respond(self, conn: _Connection, answer: _Answer) -> None:
        parser = conn.parser
        assert parser is not None
        fields = [*answer.headers, ("Date", formatdate(usegmt=True))]
        if answer.close:
            fields.append(("Connection", "close"))
        chunks = [parser.send(h11.Response(status_code=answer.code, headers=fields, reason=_reason(answer.code)))]
        if conn.request is None or conn.request.method != b"HEAD":
            for part in answer.body:
                chunks.append(parser.send(h11.Data(data=part)))  # the part itself, not a copy
        parser.send(h11.EndOfMessage())
        conn.keep_alive = parser.our_state is h11.DONE and parser.their_state is h11.DONE
        chunks = [chunk for chunk in chunks if chunk]
        if len(chunks) > 1 and sum(map(len, chunks)) <= 65536:
            chunks = [b"".join(chunks)]  # one segment for a small answer
        conn.pending = collections.deque(memoryview(chunk) for chunk in chunks)
        conn.state = _WRITE
        conn.progressed = time.monotonic()
        self._enter(conn, self._writing, self.write_timeout)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        pending = conn.pending
        progressed = False
        while pending:
            try:
                sent = conn.sock.send(pending[0][:_SEND_BYTES])
            except (BlockingIOError, ssl.SSLWantWriteError):
                if progressed:  # to the back of the line for eviction
                    conn.progressed = time.monotonic()
                    del self._writing[conn]
                    self._writing[conn] = None
                self._watch(conn, selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                self._watch(conn, selectors.EVENT_READ)
                return
            except OSError:
                self._close(conn)
                return
            progressed = True
            if sent == len(pending[0]):
                pending.popleft()
            else:
                pending[0] = pending[0][sent:]
        if conn.keep_alive:
            self._await_request(conn)
        elif conn.eof:
            self._close(conn)
        else:
            self._close_after_linger(conn)

    def _await_request(self, conn: _Connection) -> None:
        parser = conn.parser
        assert parser is not None
        parser.start_next_cycle()
        conn.request = None
        conn.state = _READ
        if parser.trailing_data[0]:  # pipelined, or the next request already begun
            self._enter(conn, self._opening, self.request_timeout)
        else:
            self._enter(conn, self._idle, self.idle_timeout)
        self._watch(conn, selectors.EVENT_READ)
        if isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
            self._read(conn)
        else:
            self._next_request(conn)

    def _close_after_linger(self, conn: _Connection) -> None:
        """Closing with unread bytes from the client makes the kernel send a reset, which can make
        the client drop the answer just sent: stop sending, then read and discard for a moment."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)  # an SSLSocket drops its TLS layer here
        except OSError:
            self._close(conn)
            return
        conn.state = _LINGER
        self._enter(conn, self._lingering, _LINGER_S)
        self._watch(conn, selectors.EVENT_READ)

    def _linger(self, conn: _Connection) -> None:
        try:
            while conn.sock.recv(65536):
                pass
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except OSError:
            pass
        self._close(conn)

    # -- bookkeeping ----------------------------------------------------------------------------

    def _enter(self, conn: _Connection, group: dict[_Connection, None] | None, timeout_s: float) -> None:
        if conn.group is not None:
            del conn.group[conn]
        conn.group = group
        if group is not None:
            group[conn] = None
        conn.since = time.monotonic()
        conn.deadline = conn.since + timeout_s

    def _watch(self, conn: _Connection, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
            conn.events = 0
        if conn.state == _BUSY:
            with self._job_ready:
                self._jobs.pop(conn, None)
        self._enter(conn, None, 0.0)
        self._connections.discard(conn)
        own = self._clients.get(conn.client)
        if own is not None:
            own.discard(conn)
            if not own:
                del self._clients[conn.client]
        conn.sock.close()

    def _candidates(self) -> list[_Connection]:
        """The first of each group: within a group, no later one is less useful."""
        groups = (self._lingering, self._opening, self._idle, self._writing, self._busy)
        return [next(iter(group)) for group in groups if group]

    def _evict(self, candidates: Iterable[_Connection]) -> bool:
        """Closes the least useful of ``candidates`` (see the module's doc); False if there are none."""
        now = time.monotonic()
        ranked = [(self._usefulness(conn, now), conn) for conn in candidates]
        if not ranked:
            return False
        self._close(min(ranked, key=lambda ranked_conn: ranked_conn[0])[1])
        return True

    def _usefulness(self, conn: _Connection, now: float) -> tuple[int, float]:
        """Lower is closed first to admit another.

        A connection whose request is with a worker goes last, but it does go: a client pipelining
        cheap requests keeps its connections busy nearly all the time (the next request is handed on
        as soon as an answer is out), so were they exempt, such clients at the limit would leave no
        room for anyone, a probe included. Its answer, when computed, is dropped."""
        group = conn.group
        if group is self._lingering:
            return 0, conn.since
        if group is self._opening:
            return (1 if now - conn.since >= _GRACE_S else 4), conn.since
        if group is self._writing:
            return (2 if now - conn.progressed >= _STALLED_S else 5), conn.progressed
        if group is self._idle:
            return 3, conn.since
        return 6, conn.since

    def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 0.1
        for group in (self._lingering, self._opening, self._idle, self._writing):
            for conn in [c for c in group if c.deadline <= now]:
                log.debug("closing %s: past its deadline", conn.address)
                self._close(conn)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        if self._at_limit.failing and len(self._connections) < self.max_connections // 2:
            self._at_limit.recovered(f"{len(self._connections)} open")
        if self._client_at_limit.failing and all(
            len(own) < self.max_connections_per_client for own in self._clients.values()
        ):
            self._client_at_limit.recovered()

    def _pause_accepting(self) -> None:
        self._selector.unregister(self.socket)
        self._accept_paused_until = time.monotonic() + 0.1

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_out.send(b"\0")

    def _drain_wake(self) -> None:
        try:
            while self._wake_in.recv(4096):
                pass
        except OSError:
            pass

    # -- workers --------------------------------------------------------------------------------

    def _submit(self, conn: _Connection, request: h11.Request, body: bytes) -> None:
        with self._job_ready:
            self._jobs[conn] = (request, body)
            if self._idle_workers == 0 and len(self._workers) < self.max_workers:
                worker = threading.Thread(target=self._work, name=f"http-worker-{len(self._workers)}", daemon=True)
                self._workers.append(worker)
                worker.start()
            self._job_ready.notify()

    def _work(self) -> None:
        while True:
            with self._job_ready:
                self._idle_workers += 1
                while not self._jobs and not self._stopping.is_set():
                    self._job_ready.wait()
                self._idle_workers -= 1
                if self._stopping.is_set():
                    return
                conn = next(iter(self._jobs))
                request, body = self._jobs.pop(conn)
            self._done.append((conn, self._answer(conn, request, body)))
            self._wake()

    def _answer(self, conn: _Connection, request: h11.Request, body: bytes) -> _Answer | None:
        """Runs the handler's route for one complete request; None to close the connection unanswered."""
        try:
            handler = self.handler_class(self, conn.sock, conn.address, request, body)
            route = getattr(handler, f"do_{handler.command}", None)
            if route is None:
                return _plain(501, "unsupported method", close=False)
            route()
            if handler.dropped:
                return None
            if handler.answer is None:
                raise RuntimeError(f"{type(handler).__name__}.do_{handler.command} sent no answer")
            return handler.answer
        except Exception:  # the thread lives on; the client hears of it
            if conn.closed:  # closed to make room meanwhile: its socket failed the route, no bug
                return None
            self.handle_error(conn.sock, conn.address)
            return _plain(500)


def _reason(code: int) -> bytes:
    try:
        return HTTPStatus(code).phrase.encode()
    except ValueError:
        return b""


def _refusal(parser: h11.Connection, error: h11.RemoteProtocolError) -> _Answer:
    """h11's answer to a request it refused; 414 when the request line alone is over the head's
    bound (as http.server answers)."""
    code = error.error_status_hint
    if code == 431 and b"\n" not in parser.trailing_data[0]:
        code = 414
    return _plain(code)


def _beyond_bounds(request: h11.Request) -> _Answer | None:
    """A refusal for a request h11 frames but this server does not take."""
    if len(request.headers) > MAX_HEADERS:
        return _plain(431, "too many header fields")
    length = 0
    for name, value in request.headers:
        if name == b"transfer-encoding":
            return _plain(501, "Transfer-Encoding is not supported")
        if name == b"content-length":
            length = int(value)
    if length > MAX_BODY_BYTES:
        return _plain(413)
    return None


def _client_hello_bytes(peeked: bytes) -> int | None:
    """How many bytes, records included, the whole ClientHello at the start of ``peeked`` takes
    (more than ``len(peeked)`` while it is still arriving); None when the bytes are no ClientHello, or
    one in more records than clients send."""
    position, message = 0, b""
    for _ in range(_TLS_MAX_HELLO_RECORDS):
        if len(peeked) < position + _TLS_RECORD_HEADER:
            return position + _TLS_RECORD_HEADER
        if peeked[position] != _TLS_HANDSHAKE_RECORD:
            return None
        length = int.from_bytes(peeked[position + 3 : position + 5], "big")
        if not 0 < length <= _TLS_MAX_PLAINTEXT:
            return None
        end = position + _TLS_RECORD_HEADER + length
        if len(peeked) < end:
            return end
        message += peeked[position + _TLS_RECORD_HEADER : end]
        position = end
        if len(message) >= 4:
            if message[0] != _TLS_CLIENT_HELLO:
                return None
            if len(message) >= 4 + int.from_bytes(message[1:4], "big"):
                return position
    return None  # in more records than any client sends


def client_key(host: str) -> str:
    """The client a connection from ``host`` counts against: an IPv6 host's whole /64, which one
    site is commonly given (so is free to use every address of), and an IPv4-mapped IPv6 address as
    the IPv4 address it is."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # not an IP address: a Unix socket's path, say
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
