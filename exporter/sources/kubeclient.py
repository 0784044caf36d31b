"""The Kubernetes API over HTTP/1.1, framed by h11: where the API is, who we are, and GET requests
whose every wait and size is bounded.

Why not the ``kubernetes`` package: on every node it costs ~30 MB to import and ~20 MB more of model
objects, while the agent needs two shapes of GET (a JSON list page, a stream of JSON lines). The
adapter, one per cluster, keeps that client for its reviews.

Why h11 on a socket and not ``http.client``: a watch is proven healthy by a quiet second after its
response head, which needs a read that can time out and be tried again; ``http.client``'s buffered
reader is unusable after one timeout, while h11 (sans-I/O) only parses what it was given and keeps
the rest for the next read. h11 alone parses the status line, headers and chunked framing, so a
malformed response is refused in one place. Each request is one connection (``Connection:
close``): lists are rare and a watch holds its connection for minutes, so pooling would buy nothing.

Credentials, as client-go reads them: in a pod, the service account's token (re-read whenever the
kubelet rotates the file), its CA and ``KUBERNETES_SERVICE_HOST``/``_PORT``; for development, the
current context of a kubeconfig, in the subset ``server``, ``certificate-authority(-data)``,
``insecure-skip-tls-verify``, ``tls-server-name``, ``client-certificate/key(-data)``, ``token``,
``tokenFile``, ``username``/``password`` (anything else, such as ``exec`` plugins, is refused by name).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import h11

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CONNECT_TIMEOUT_S = 10.0
MAX_HEAD_BYTES = 64 * 1024
MAX_LINE_BYTES = 16 * 1024 * 1024  # one watch event; etcd refuses objects over 1.5 MiB
MAX_BODY_BYTES = 64 * 1024 * 1024  # one list page (500 pods are a few MB)
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_TOKEN_BYTES = 64 * 1024
_RECV_BYTES = 64 * 1024


class ConfigError(Exception):
    """Credentials cannot be loaded (missing file, unsupported kubeconfig field, not in a pod)."""


class ApiError(Exception):
    """The API answered with an error status (its ``Status`` object's reason and message when given)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}" if message else f"HTTP {status} {reason}")
        self.status = status
        self.reason = reason
        self.message = message


class ProtocolError(Exception):
    """The server's bytes are not the HTTP or JSON we can read (or exceed our bounds)."""


class StreamTimeout(Exception):  # noqa: N818 (not an error: the caller decides what a quiet stream means)
    """Nothing arrived before the deadline; the connection is intact and can be read again."""


class TokenFile:
    """A bearer token file, re-read when the kubelet rotates it (a new inode, mtime or size)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._token = ""

    def read(self) -> str:
        try:
            stat = os.stat(self.path)
            seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if seen != self._seen:
                with open(self.path, "rb") as file:
                    self._token = file.read(MAX_TOKEN_BYTES).decode("utf-8", "replace").strip()
                self._seen = seen
        except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
            raise ConfigError(
                f"cannot read token file {self.path}: {getattr(error, 'strerror', None) or error}"
            ) from error
        return self._token


def basic_authorization(username: str, password: str) -> str:
    """An ``Authorization`` header's value for HTTP basic auth (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


@dataclass(frozen=True)
class Credentials:
    """Where the API is and how we prove who we are to it."""

    scheme: str
    host: str
    port: int
    base_path: str  # a prefix some proxies put before /api, "" for kube-apiserver itself
    tls: ssl.SSLContext | None
    server_hostname: str
    token: Callable[[], str] | None  # called per request, so a rotated token is used at once
    basic_auth: tuple[str, str] | None = None  # (username, password), when there is no token

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"


def load_credentials(kubeconfig: str | None) -> Credentials:
    """From a kubeconfig file, or the pod's service account when None."""
    return kubeconfig_credentials(Path(kubeconfig)) if kubeconfig else in_cluster_credentials()


def in_cluster_credentials(
    environ: Mapping[str, str] | None = None, directory: Path = SERVICE_ACCOUNT_DIR
) -> Credentials:
    environ = os.environ if environ is None else environ
    host, port = environ.get("KUBERNETES_SERVICE_HOST", ""), environ.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise ConfigError("not in a pod (KUBERNETES_SERVICE_HOST/PORT unset) and no --kubeconfig given")
    if not port.isdigit():
        raise ConfigError(f"KUBERNETES_SERVICE_PORT is not a port number: {port!r}")
    token = TokenFile(directory / "token")
    token.read()  # fail now, by name, if there is none
    return Credentials(
        scheme="https",
        host=host,
        port=int(port),
        base_path="",
        tls=client_tls_context(ca_file=directory / "ca.crt"),
        server_hostname=host,
        token=token.read,
    )


def kubeconfig_credentials(path: Path, server: str | None = None) -> Credentials:
    """``server`` replaces the cluster's (which may then be absent): a kubeconfig's TLS and identity
    used for another server, as prometheus-adapter's ``--prometheus-auth-config`` is."""
    import yaml  # only for development runs: in a pod the agent never reads YAML

    try:
        config = yaml.safe_load(path.read_bytes())
    except yaml.MarkedYAMLError as error:  # its text quotes the file, credentials and all: never shown
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"cannot read kubeconfig {path}: not YAML ({error.problem}{where})") from error
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as error:  # ValueError: a NUL byte in the path
        raise ConfigError(f"cannot read kubeconfig {path}: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"kubeconfig {path} is not a mapping")
    context_name = config.get("current-context")
    context = _named(config, "contexts", "context", context_name, path)
    cluster = _named(config, "clusters", "cluster", context.get("cluster"), path)
    user = _named(config, "users", "user", context.get("user"), path) if context.get("user") else {}
    unsupported = sorted(set(user) - _USER_KEYS - _DATA_KEYS)
    if unsupported:
        raise ConfigError(f"kubeconfig {path}: user field(s) {', '.join(unsupported)} not supported by this agent")
    base = path.parent
    address = server or cluster.get("server")
    try:
        url = urlsplit(str(address or ""))
        port = url.port  # raises on a port that is no number, or out of range
    except ValueError:
        url, port = urlsplit(""), None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"kubeconfig {path}: cluster server {address!r} is not an http(s) URL")
    tls = None
    if url.scheme == "https":
        tls = client_tls_context(
            ca_file=_path(cluster.get("certificate-authority"), base),
            ca_data=_b64(cluster.get("certificate-authority-data"), "certificate-authority-data", path),
            cert_file=_path(user.get("client-certificate"), base),
            cert_data=_b64(user.get("client-certificate-data"), "client-certificate-data", path),
            key_file=_path(user.get("client-key"), base),
            key_data=_b64(user.get("client-key-data"), "client-key-data", path),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
        )
    token: Callable[[], str] | None = None
    if user.get("token"):
        static = str(user["token"])
        token = lambda: static  # noqa: E731
    elif user.get("tokenFile"):
        token_file = TokenFile(_path(user["tokenFile"], base) or Path())
        token_file.read()  # fail now, by name, if there is none
        token = token_file.read
    basic_auth = (str(user.get("username") or ""), str(user.get("password") or ""))
    if token is not None and any(basic_auth):
        raise ConfigError(f"kubeconfig {path}: a user with a token and a username/password, choose one")
    return Credentials(
        scheme=url.scheme,
        host=url.hostname,
        port=port or (443 if url.scheme == "https" else 80),
        base_path=url.path.rstrip("/"),
        tls=tls,
        server_hostname=str(cluster.get("tls-server-name") or url.hostname),
        token=token,
        basic_auth=basic_auth if any(basic_auth) else None,
    )


_USER_KEYS = {"token", "tokenFile", "client-certificate", "client-key", "username", "password"}
_DATA_KEYS = {"client-certificate-data", "client-key-data"}


def _named(config: dict[str, Any], section: str, key: str, name: object, path: Path) -> dict[str, Any]:
    entries = config.get(section)
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and entry.get("name") == name and isinstance(entry.get(key), dict):
            found: dict[str, Any] = entry[key]
            return found
    raise ConfigError(f"kubeconfig {path}: no {key} named {name!r} in {section}")


def _path(value: object, base: Path) -> Path | None:
    return (base / str(value)) if value else None


def _b64(value: object, field: str, path: Path) -> bytes | None:
    if not value:
        return None
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError as error:
        raise ConfigError(f"kubeconfig {path}: {field} is not base64") from error


def client_tls_context(
    ca_file: Path | None = None,
    ca_data: bytes | None = None,
    cert_file: Path | None = None,
    cert_data: bytes | None = None,
    key_file: Path | None = None,
    key_data: bytes | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(
            cafile=str(ca_file) if ca_file else None, cadata=ca_data.decode() if ca_data else None
        )
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cert_file or cert_data:
            if cert_data or key_data:
                # ssl loads a certificate and key only from files: a private, short-lived copy.
                with tempfile.TemporaryDirectory(prefix="kubeclient-") as private:
                    cert = Path(private, "client.crt")
                    key = Path(private, "client.key")
                    cert.write_bytes(cert_data or (cert_file.read_bytes() if cert_file else b""))
                    key.write_bytes(key_data or (key_file.read_bytes() if key_file else b""))
                    context.load_cert_chain(cert, key)
            else:
                context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    except (OSError, ssl.SSLError, ValueError) as error:
        raise ConfigError(f"cannot set up TLS: {error}") from error
    return context


class Connection:
    """One request's connection: the response head, then its body by lines or whole.

    h11 does all the HTTP framing (status line, headers, chunked or sized or until-close bodies);
    this class only moves bytes between the socket and it. Every read takes an absolute
    ``time.monotonic()`` deadline and raises ``StreamTimeout`` when it passes: h11 keeps what part
    of an event has arrived, so the connection stays readable, and anything h11 refuses is a
    ``ProtocolError`` after which the connection is only closed.
    """

    def __init__(
        self, sock: socket.socket, http: h11.Connection, on_close: Callable[[socket.socket], None] | None = None
    ) -> None:
        self.sock = sock
        self._http = http
        self._on_close = on_close
        self._body = bytearray()  # decoded body bytes not yet returned
        self._done = False

    def _next_event(self, deadline: float) -> object:
        """h11's next response event, reading the socket until there is one."""
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as error:
                raise ProtocolError(f"unreadable HTTP response: {error}") from error
            if event is not h11.NEED_DATA:
                return event
            self._receive(deadline)

    def _receive(self, deadline: float) -> None:
        pending = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0
        if not pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StreamTimeout()
            self.sock.settimeout(left)
        try:
            data = self.sock.recv(_RECV_BYTES)
        except TimeoutError as error:
            raise StreamTimeout() from error
        except ssl.SSLZeroReturnError:
            data = b""
        self._http.receive_data(data)  # b"": the peer closed; h11 decides whether the message was whole

    def read_head(self, deadline: float) -> int:
        """The response's status code (interim 1xx responses skipped)."""
        while True:
            event = self._next_event(deadline)
            if isinstance(event, h11.Response):
                return event.status_code
            if not isinstance(event, h11.InformationalResponse):
                raise ProtocolError(f"a {type(event).__name__} before the response head")

    def _read_more(self, deadline: float) -> None:
        """Moves the next piece of the body into ``_body``, or marks the body done."""
        event = self._next_event(deadline)
        if isinstance(event, h11.Data):
            self._body += event.data
        elif isinstance(event, h11.EndOfMessage):
            self._done = True
        else:
            raise ProtocolError(f"a {type(event).__name__} inside the response body")

    def read_line(self, deadline: float, limit: int = MAX_LINE_BYTES) -> bytes | None:
        """The next newline-terminated line of the body (without it), or None at its end."""
        searched = 0
        while True:
            end = self._body.find(b"\n", searched)
            if end >= 0:
                line = bytes(self._body[:end])
                del self._body[: end + 1]
                return line
            searched = len(self._body)
            if searched > limit:
                raise ProtocolError(f"a line of the response exceeds {limit} bytes")
            if self._done:
                if self._body:
                    line = bytes(self._body)
                    self._body.clear()
                    return line
                return None
            self._read_more(deadline)

    def read_body(self, deadline: float, limit: int = MAX_BODY_BYTES) -> bytes:
        while not self._done:
            if len(self._body) > limit:
                raise ProtocolError(f"response body exceeds {limit} bytes")
            self._read_more(deadline)
        body = bytes(self._body)
        self._body.clear()
        return body

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close(self.sock)
        with contextlib.suppress(OSError):
            self.sock.close()


def decode_json(data: bytes) -> Any:
    """JSON that is not valid UTF-8 is read with replacement characters, never refused; what is not
    JSON, or nests deeper than the parser can follow, is a ``ProtocolError``."""
    try:
        return json.loads(data.decode("utf-8", "replace"))
    except json.JSONDecodeError as error:
        raise ProtocolError(f"response is not JSON ({error.msg})") from error
    except (ValueError, RecursionError) as error:  # ValueError: an integer too long to convert
        raise ProtocolError(f"response is not JSON this client can read ({type(error).__name__})") from error


def api_error(status: int, body: bytes) -> ApiError:
    """An ``ApiError`` from an error response's ``Status`` body (or its absence)."""
    reason, message = "", ""
    try:
        parsed = decode_json(body)
        if isinstance(parsed, dict):
            reason, message = str(parsed.get("reason") or ""), str(parsed.get("message") or "")
    except ProtocolError:
        message = body[:200].decode("utf-8", "replace")
    return ApiError(status, reason, message)


class KubeClient:
    """GET requests to one API server. ``close()`` ends every request in flight, from any thread."""

    def __init__(self, credentials: Credentials, user_agent: str = "gpu-pod-exporter") -> None:
        self.credentials = credentials
        self.user_agent = user_agent
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def open(self, path: str, params: Mapping[str, str], accept: str, deadline: float) -> Connection:
        """Connects and sends ``GET path?params``; the caller reads the response and closes it."""
        creds = self.credentials
        query = urlencode(params, quote_via=quote)
        host = f"[{creds.host}]" if ":" in creds.host else creds.host
        headers = [
            ("Host", f"{host}:{creds.port}"),
            ("User-Agent", self.user_agent),
            ("Accept", accept),
            ("Connection", "close"),
        ]
        if creds.token is not None:
            headers.append(("Authorization", f"Bearer {creds.token()}"))
        elif creds.basic_auth is not None:
            headers.append(("Authorization", basic_authorization(*creds.basic_auth)))
        http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            target = creds.base_path + path + (f"?{query}" if query else "")
            request = http.send(h11.Request(method="GET", target=target, headers=headers))
        except h11.LocalProtocolError as error:  # a token or path that cannot go in a request head
            raise ProtocolError(f"cannot send the request: {error}") from error
        timeout = max(0.001, min(CONNECT_TIMEOUT_S, deadline - time.monotonic()))
        sock = socket.create_connection((creds.host, creds.port), timeout=timeout)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_KEEPIDLE"):  # a dead peer is noticed in about a minute, not hours
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            if creds.tls is not None:
                sock = creds.tls.wrap_socket(sock, server_hostname=creds.server_hostname)
            with self._lock:
                if self._closed:
                    raise ConnectionAbortedError("client closed")
                self._open.add(sock)
            sock.sendall(request)
            http.send(h11.EndOfMessage())  # a GET has no body: nothing more to send
        except BaseException:
            self._forget(sock)
            sock.close()
            raise
        return Connection(sock, http, self._forget)

    def get_json(self, path: str, params: Mapping[str, str], accept: str, timeout_s: float) -> Any:
        """A whole JSON response; an error status raises ``ApiError``."""
        deadline = time.monotonic() + timeout_s
        connection = self.open(path, params, accept, deadline)
        try:
            status = connection.read_head(deadline)
            if status >= 400:
                raise api_error(status, connection.read_body(deadline, MAX_ERROR_BODY_BYTES))
            if status != 200:
                raise ApiError(status, "Unexpected", "")
            return decode_json(connection.read_body(deadline))
        finally:
            connection.close()

    def _forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)

    def close(self) -> None:
        """Ends all requests in flight: their reads return at once with an error."""
        with self._lock:
            self._closed = True
            open_sockets = list(self._open)
        for sock in open_sockets:
            # The plain socket's shutdown, also for TLS: wakes the reader without touching the
            # TLS state another thread is using.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
