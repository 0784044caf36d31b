"""HTTP plumbing the agent's and the adapter's servers share: a server whose cost is bounded by
what it is asked to compute, not by how many clients hold a connection or how slowly they talk; a
handler that answers with a body of known length; and serving until SIGTERM or SIGINT.

Why not a thread per connection (``ThreadingHTTPServer``): a client that drips one header byte
every few seconds then holds a thread for as long as it likes, and 2000 of them held 2000 threads
and 40-75 MB. Here one thread, the loop, owns every socket. It accepts, does TLS handshakes without
blocking, reads until a whole request (head and body) has arrived, and writes responses out. Only
a complete request goes to one of a few worker threads, which runs the ``Handler`` on bytes in
memory and hands the response back as bytes. So a connection costs a thread only while its request
is being computed, never while its client is slow to send or to read. Around that:

- at most ``max_connections`` are open: beyond it, the connection that has waited longest without
  a complete request is closed to admit the new one; then the one whose answer has not drained
  for longest, if it has taken nothing for a second; then the longest idle; then the slowest
  reader. So neither a flood of slow senders nor clients that never read their answers can lock
  out a scraper that sends its request at once, or push out its idle keep-alive connection;
- a connection's next request is read only once its answer has gone out, so a client pipelining
  requests holds at most one answer (and 48 KiB of requests not yet read) at a time;
- the TLS handshake and the whole first request must arrive within ``request_timeout`` of the
  accept, a later request within ``request_timeout`` of its first byte; an idle keep-alive
  connection is closed after ``idle_timeout``, a response not taken within ``write_timeout``;
- a request head is at most 32 KiB and a body at most 16 KiB (neither server takes bodies);
  chunked request bodies are refused;
- over TLS, a connection gets its TLS object (~48 KB of OpenSSL buffers mid-handshake) only once
  its whole ClientHello has arrived, so clients that stall a handshake cost ~1 KB each.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import io
import logging
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 32 * 1024
MAX_BODY_BYTES = 16 * 1024
_LINGER_S = 1.0  # how long a connection closed after an error answer may still send (then RST is harmless)
_SEND_BYTES = 256 * 1024
_STALLED_S = 1.0  # an answer that took no bytes for this long is not draining: evicted before idle keep-alives
_BARE_CR = re.compile(rb"\r(?!\n)")
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Handler(BaseHTTPRequestHandler):
    """What a route sees: ``BaseHTTPRequestHandler``'s attributes (``path``, ``headers``,
    ``connection`` — an ``ssl.SSLSocket`` over TLS, for ``getpeercert()``) plus ``send``.

    Also works under the standard library's servers (the tests' stand-ins use it so)."""

    protocol_version = "HTTP/1.1"
    # Under a standard-library server, headers and body go out in two writes: without TCP_NODELAY,
    # Nagle's algorithm holds the body until the client's delayed ACK (~40 ms) on every keep-alive
    # request. ``Server`` sets it on every connection itself.
    disable_nagle_algorithm = True
    timeout: ClassVar[float | None] = 10  # under a standard-library server only: ``Server`` applies its own deadlines
    server: Server  # type: ignore[assignment]  # ours, not a socketserver

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
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(map(len, parts))))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            for part in parts:
                self.wfile.write(part)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (http.server's signature)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.address_string(), format % args)


class _Response:
    """The handler's ``wfile``: keeps what it writes (a rendered body is kept, not copied)."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.chunks.append(data if type(data) is bytes else bytes(data))
        return len(data)

    def flush(self) -> None:
        pass


class _RefusedError(Exception):
    """A request the loop answers itself, closing the connection after."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


_HELLO, _HANDSHAKE, _READ, _BUSY, _WRITE, _LINGER = range(6)
_TLS_HANDSHAKE_RECORD = 0x16
_TLS_CLIENT_HELLO = 0x01
_TLS_RECORD_HEADER = 5
_TLS_MAX_PLAINTEXT = 2**14  # RFC 8446 5.1: a record's plaintext, and a hello comes in plaintext
_TLS_MAX_HELLO = 32 * 1024  # records of a ClientHello; browsers' largest (post-quantum key shares) are ~2 KB


class _Connection:
    __slots__ = (
        "address",
        "awaited",
        "buffer",
        "closed",
        "deadline",
        "eof",
        "events",
        "group",
        "keep_alive",
        "pending",
        "progressed",
        "scanned",
        "sock",
        "state",
        "tls",
    )

    def __init__(self, sock: socket.socket, address: Any, state: int, tls: ssl.SSLContext | None) -> None:
        self.sock = sock
        self.tls = tls  # the context to wrap the connection with, once its ClientHello is in
        self.awaited = _TLS_RECORD_HEADER  # bytes of it that make the socket readable (SO_RCVLOWAT)
        self.address = address
        self.state = state
        self.buffer = bytearray()
        self.scanned = 0  # bytes of ``buffer`` already searched for the end of the head
        self.eof = False  # the client will send nothing more
        self.keep_alive = False
        self.pending: collections.deque[memoryview] = collections.deque()
        self.progressed = 0.0  # when its answer last took bytes (or began), while writing
        self.group: dict[_Connection, None] | None = None
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
        max_connections: int = 512,
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
        # Open connections by what they are doing, each in the order they started doing it; the
        # first of the first non-empty group is the one closed to admit a new connection.
        self._opening: dict[_Connection, None] = {}  # handshake, partial request, lingering close
        self._idle: dict[_Connection, None] = {}  # keep-alive, waiting for the next request
        self._writing: dict[_Connection, None] = {}  # in the order their answers last took bytes
        self._at_limit = False
        self._refusing_peers = False
        self._next_sweep = 0.0
        self._done: collections.deque[tuple[_Connection, list[bytes], bool]] = collections.deque()
        self._jobs: collections.deque[tuple[_Connection, bytes] | None] = collections.deque()
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
            self._jobs.extend([None] * len(self._workers))
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
            conn, chunks, keep_alive = self._done.popleft()
            if not conn.closed:
                conn.keep_alive = keep_alive
                self._guarded(self._respond, conn, chunks)
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
                    self._note_limit(f"cannot accept: {error.strerror}")
                    if not self._evict():
                        self._pause_accepting()
                    return
                continue  # the client gave up before we accepted (ECONNABORTED and kin)
            if len(self._connections) >= self.max_connections:
                self._note_limit(f"{len(self._connections)} connections open, the most allowed")
                if not self._evict():
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
            conn = _Connection(sock, address, _HELLO if self.tls is not None else _READ, self.tls)
            self._connections.add(conn)
            self._enter(conn, self._opening, self.request_timeout)
            self._watch(conn, selectors.EVENT_READ)

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
            allowed = self.peer_check(sock.getpeercert() or {})
            if allowed == self._refusing_peers:  # a change: log it once
                self._refusing_peers = not allowed
                if allowed:
                    log.info("a client certificate was allowed again (from %s)", conn.address[0])
                else:
                    log.warning("refused the client certificate of %s: not allowed by the web config", conn.address[0])
            if not allowed:
                self._close(conn)
                return
        conn.state = _READ
        self._watch(conn, selectors.EVENT_READ)
        self._read(conn)  # the first request may have come with the handshake's last flight

    def _read(self, conn: _Connection) -> None:
        sock, buffer = conn.sock, conn.buffer
        limit = MAX_HEAD_BYTES + MAX_BODY_BYTES
        while len(buffer) <= limit:
            try:
                data = sock.recv(min(65536, limit + 1 - len(buffer)))
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError:
                self._close(conn)
                return
            if not data:
                conn.eof = True
                break
            if not buffer and conn.group is self._idle:  # the first byte of a later request
                self._enter(conn, self._opening, self.request_timeout)
            buffer += data
        self._next_request(conn)

    def _next_request(self, conn: _Connection) -> None:
        """Hands the buffered request to a worker once it is complete; refuses it when it cannot be."""
        buffer = conn.buffer
        blank = len(buffer) - len(buffer.lstrip(b"\r\n")) if buffer[:1] in (b"\r", b"\n") else 0  # type: ignore[comparison-overlap]
        if blank:  # empty lines before a request are ignored
            del buffer[:blank]
            conn.scanned = max(0, conn.scanned - blank)
        end = _head_end(buffer, conn.scanned)
        if end < 0:
            conn.scanned = max(0, len(buffer) - 2)
            if len(buffer) > MAX_HEAD_BYTES:
                self._refuse(conn, _head_too_large(buffer))
            elif conn.eof:
                self._close(conn)
            return
        try:
            if end > MAX_HEAD_BYTES:
                raise _head_too_large(buffer)
            head = bytes(buffer[:end])
            if _BARE_CR.search(head):
                # The handler's header parser ends a line at a bare CR, _body_length does not: a
                # header hidden behind one (Transfer-Encoding) would frame the request two ways.
                raise _RefusedError(400, "bare CR in the request head")
            total = end + _body_length(head)
        except _RefusedError as refusal:
            self._refuse(conn, refusal)
            return
        if len(buffer) < total:
            if conn.eof:
                self._close(conn)
            return
        request = bytes(buffer[:total])
        del buffer[:total]
        conn.scanned = 0
        conn.state = _BUSY
        self._enter(conn, None, 0.0)
        self._watch(conn, 0)
        if self.answers_inline(_request_path(request)):
            # Answered here, sent from the turn's queue of answers (not at once: a connection
            # pipelining probes would otherwise recurse once per request).
            self._done.append((conn, *self._answer(conn, request)))
        else:
            self._submit(conn, request)

    def in_loop(self) -> bool:
        """True on the loop's own thread: a handler answering there must not block."""
        return threading.current_thread() is self._thread

    def answers_inline(self, path: str) -> bool:
        """Whether the loop answers a request for ``path`` itself: only for handlers that are cheap
        and never block (the probes, and what a subclass knows to be so right now)."""
        return path in self.probe_paths

    def _refuse(self, conn: _Connection, refusal: _RefusedError) -> None:
        conn.buffer.clear()
        conn.keep_alive = False
        self._respond(conn, [_closing_answer(refusal.code, refusal.reason)])

    def _respond(self, conn: _Connection, chunks: list[bytes]) -> None:
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
        conn.state = _READ
        if conn.buffer:  # pipelined, or the next request already begun
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
        self._enter(conn, self._opening, _LINGER_S)
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
        conn.deadline = time.monotonic() + timeout_s

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
        self._enter(conn, None, 0.0)
        self._connections.discard(conn)
        conn.sock.close()

    def _evict(self) -> bool:
        """Closes one connection to admit another, the least useful first (see the module's doc)."""
        stalled = next(iter(self._writing), None)
        if stalled is not None and time.monotonic() - stalled.progressed < _STALLED_S:
            stalled = None
        for group in (self._opening, {stalled: None} if stalled else {}, self._idle, self._writing):
            if group:
                self._close(next(iter(group)))
                return True
        return False

    def _sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 0.1
        for group in (self._opening, self._idle, self._writing):
            for conn in [c for c in group if c.deadline <= now]:
                log.debug("closing %s: past its deadline", conn.address)
                self._close(conn)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._accept_paused_until = None
            self._selector.register(self.socket, selectors.EVENT_READ, "accept")
        if self._at_limit and len(self._connections) < self.max_connections // 2:
            self._at_limit = False
            log.info("connections back under the limit: %d open", len(self._connections))

    def _note_limit(self, why: str) -> None:
        if not self._at_limit:
            self._at_limit = True
            log.warning("%s: closing the oldest unfinished connections to admit new ones", why)

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

    def _submit(self, conn: _Connection, request: bytes) -> None:
        with self._job_ready:
            self._jobs.append((conn, request))
            if self._idle_workers == 0 and len(self._workers) < self.max_workers:
                worker = threading.Thread(target=self._work, name=f"http-worker-{len(self._workers)}", daemon=True)
                self._workers.append(worker)
                worker.start()
            self._job_ready.notify()

    def _work(self) -> None:
        while True:
            with self._job_ready:
                self._idle_workers += 1
                while not self._jobs:
                    self._job_ready.wait()
                self._idle_workers -= 1
                job = self._jobs.popleft()
            if job is None:
                return
            conn, request = job
            self._done.append((conn, *self._answer(conn, request)))
            self._wake()

    def _answer(self, conn: _Connection, request: bytes) -> tuple[list[bytes], bool]:
        try:
            return self._handle(conn, request)
        except Exception:  # the thread lives on; the client hears of it
            self.handle_error(conn.sock, conn.address)
            return [_closing_answer(500, "Internal Server Error")], False

    def _handle(self, conn: _Connection, request: bytes) -> tuple[list[bytes], bool]:
        """Runs the handler on one complete request; returns what it wrote and whether the
        connection stays open."""
        handler = self.handler_class.__new__(self.handler_class)
        handler.server = self
        handler.request = handler.connection = conn.sock
        handler.client_address = conn.address
        handler.rfile = io.BytesIO(request)
        response = _Response()
        handler.wfile = response  # type: ignore[assignment]
        handler.close_connection = True
        handler.handle_one_request()
        return response.chunks, not handler.close_connection


def _closing_answer(code: int, reason: str) -> bytes:
    body = f"{reason}\n".encode()
    head = (
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _client_hello_bytes(peeked: bytes) -> int | None:
    """How many bytes, records included, the whole ClientHello at the start of ``peeked`` takes
    (more than ``len(peeked)`` while it is still arriving); None when the bytes are no ClientHello."""
    position, message = 0, b""
    while True:
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


def _request_path(request: bytes) -> str:
    """The path of a request's target, without its query, as the handler's routes read it."""
    line = request.split(b"\n", 1)[0].split(b" ")
    return line[1].split(b"?", 1)[0].decode("latin-1") if len(line) == 3 else ""


def _head_too_large(buffer: bytearray) -> _RefusedError:
    """414 when the request line alone is over the limit (as http.server answers), else 431."""
    line_end = buffer.find(b"\n", 0, MAX_HEAD_BYTES)
    if line_end < 0:
        return _RefusedError(414, "request line too long")
    return _RefusedError(431, "request head too large")


def _head_end(buffer: bytearray, start: int) -> int:
    """Where the head ends (just past its empty line), searching from ``start``; -1 if not yet."""
    ends = [i + 3 for i in (buffer.find(b"\n\r\n", start),) if i >= 0]
    ends += [i + 2 for i in (buffer.find(b"\n\n", start),) if i >= 0]
    return min(ends, default=-1)


def _body_length(head: bytes) -> int:
    """The Content-Length the head declares (0 without one), as the handler will read it."""
    length: bytes | None = None
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        name = name.strip().lower()
        if name == b"transfer-encoding":
            raise _RefusedError(501, "Transfer-Encoding is not supported")
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit() or (length is not None and value != length):
                raise _RefusedError(400, "bad Content-Length")
            length = value
    if length is None:
        return 0
    if len(length) > 9 or int(length) > MAX_BODY_BYTES:
        raise _RefusedError(413, "request body too large")
    return int(length)
