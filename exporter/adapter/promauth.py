"""How the adapter proves who it is to a Prometheus that asks: prometheus-adapter's flags turned into a
``requests.Session``. TLS with the Prometheus's own CA and a client certificate, a bearer token from a
file (re-read when it changes: projected service-account tokens rotate), fixed headers such as
Mimir's ``X-Scope-OrgID``, or a kubeconfig's TLS and credentials (``--prometheus-auth-config``) or
the pod's service account (``--prometheus-auth-incluster``), read by the loader the adapter's own
Kubernetes credentials use.

Credentials go into each request through an auth hook, never into a URL (a user and password written
in ``--prometheus-url`` become basic auth, and ``redacted`` drops them wherever the URL is shown), so no
exception text or log line carries them; redirects are refused, so no header travels to another host.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter

from exporter.adapter.auth import HEADER_NAME
from exporter.sources.kubeclient import (
    SERVICE_ACCOUNT_DIR,
    ConfigError,
    Credentials,
    TokenFile,
    basic_authorization,
    client_tls_context,
    in_cluster_credentials,
    kubeconfig_credentials,
)

VERBS = ("GET", "POST")
_TLS_FLAGS = "--prometheus-client-tls-cert-file/--prometheus-client-tls-key-file"


class SettingError(ValueError):
    """A flag's value cannot be used; the text names the flag and never quotes a credential."""


class CredentialsError(requests.RequestException):
    """The credentials could not be read for a request (a token file gone or unusable)."""


@dataclass(frozen=True)
class PrometheusAccess:
    """The flags, as given: file paths, ``Name=Value`` headers."""

    url: str
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    token_file: str | None = None
    headers: tuple[str, ...] = ()
    auth_config: str | None = None
    auth_in_cluster: bool = False
    allow_insecure_credentials: bool = False
    service_account_dir: Path = SERVICE_ACCOUNT_DIR  # where --prometheus-auth-incluster reads the pod's token and CA


_URL_WANTED = (
    "--prometheus-url: want an http:// or https:// URL with a host and, if any, a port from 1 to 65535 "
    "(the value is not shown: it may hold a password)"
)


def redacted(url: str) -> str:
    """``url`` without its user and password, for logs and errors: everything up to the last ``@``
    after the scheme goes, since a password may hold ``/``, ``?`` or ``#`` (an accepted URL has an
    ``@`` only there: see ``checked_url``)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    _, at, host = rest.rpartition("@")
    return f"{scheme}{separator}{host}" if at else url


def checked_url(url: str) -> SplitResult:
    """``--prometheus-url`` parsed, or SettingError in words that never quote it. An ``@`` outside
    the user part is refused: ``https://user:12/34@prom`` is host ``user``, port 12 to the parser, and
    would send the password's owner's requests to ``user``."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is no number, or out of range)
    except ValueError:
        raise SettingError(_URL_WANTED) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingError(_URL_WANTED)
    if "@" in parts.path + parts.query + parts.fragment:
        raise SettingError(
            "--prometheus-url: an '@' outside the user:password part (a password with '/', '?' or '#' "
            "must write them %-encoded); the value is not shown"
        )
    return parts


def prometheus_session(access: PrometheusAccess) -> requests.Session:
    """A session that reaches the Prometheus at ``access.url`` as the flags say; SettingError naming
    the flag for anything unreadable or malformed, checked now rather than at the first query."""
    url = checked_url(access.url)
    headers = _headers(access.headers)
    base = _base_credentials(access)
    token = _token(access.token_file) if access.token_file else (base.token if base else None)
    basic = base.basic_auth if base and token is None else None
    if url.username is not None or url.password is not None:
        if token or basic:
            raise SettingError("--prometheus-url: a user in the URL and credentials from another flag, choose one")
        basic = (unquote(url.username or ""), unquote(url.password or ""))
    in_header = "authorization" in (name.lower() for name in headers)
    if in_header and (token or basic):
        raise SettingError("--prometheus-header: Authorization comes from the other credentials given")
    if url.scheme == "http" and (token or basic or in_header) and not access.allow_insecure_credentials:
        raise SettingError(
            f"{_credentials_flag(access, url, in_header)}: credentials would cross the network in plain text to an "
            "http:// --prometheus-url; use https://, or --prometheus-allow-insecure-credentials if a mesh "
            "encrypts the way"
        )
    tls = _tls(access, base.tls if base else None)
    session = requests.Session()
    session.max_redirects = 0
    session.headers.update(headers)
    session.auth = _Authorization(token, basic)
    if tls is not None:
        # The auth config's tls-server-name, if it has one (in a pod, the name is the API server's).
        named = base is not None and access.auth_config and base.server_hostname != base.host
        session.mount("https://", _TlsAdapter(tls, base.server_hostname if base and named else None))
        session.verify = tls.verify_mode != ssl.CERT_NONE
    return session


def _credentials_flag(access: PrometheusAccess, url: SplitResult, in_header: bool) -> str:
    """The flag the credentials came from, for the error that refuses them."""
    if access.token_file:
        return "--prometheus-token-file"
    if access.auth_config:
        return "--prometheus-auth-config"
    if access.auth_in_cluster:
        return "--prometheus-auth-incluster"
    return "--prometheus-header" if in_header else "--prometheus-url"


def _headers(pairs: tuple[str, ...]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for pair in pairs:
        name, equals, value = pair.partition("=")
        if not equals:
            raise SettingError("--prometheus-header: want Name=Value, got an argument without '='")
        if not HEADER_NAME.fullmatch(name):
            raise SettingError(f"--prometheus-header: {name!r} is not a header name (an HTTP token)")
        if not _fits_a_header(value):
            raise SettingError(f"--prometheus-header: the value of {name} has characters a header cannot carry")
        if name.lower() in (known.lower() for known in headers):
            raise SettingError(f"--prometheus-header: {name} given twice")
        headers[name] = value
    return headers


def _fits_a_header(value: str) -> bool:
    """Visible ASCII and inner blanks only: no line breaks, no control characters."""
    return value == value.strip() and all(" " <= c <= "~" or c == "\t" for c in value)


def _base_credentials(access: PrometheusAccess) -> Credentials | None:
    if access.auth_config and access.auth_in_cluster:
        raise SettingError("--prometheus-auth-config: not together with --prometheus-auth-incluster")
    try:
        if access.auth_config:
            return kubeconfig_credentials(Path(access.auth_config), server=access.url)
        if access.auth_in_cluster:
            return in_cluster_credentials(directory=access.service_account_dir)
    except ConfigError as error:
        flag = "--prometheus-auth-config" if access.auth_config else "--prometheus-auth-incluster"
        raise SettingError(f"{flag}: {error}") from error
    return None


def _token(path: str) -> Callable[[], str]:
    token_file = TokenFile(Path(path))
    try:
        token = token_file.read()
    except ConfigError as error:
        raise SettingError(f"--prometheus-token-file: {error}") from error
    if not token:
        raise SettingError(f"--prometheus-token-file: {path!r} is empty")
    if not _fits_a_header(token):
        raise SettingError(f"--prometheus-token-file: {path!r} has characters a header cannot carry")
    return token_file.read


def _tls(access: PrometheusAccess, base: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """The flags' TLS replaces the auth config's whole: the CA given (else the system's) and the
    client pair given, if any."""
    if not (access.ca_file or access.client_cert_file or access.client_key_file):
        return base
    if bool(access.client_cert_file) != bool(access.client_key_file):
        raise SettingError(f"{_TLS_FLAGS}: they go together")
    ca = _read("--prometheus-ca-file", access.ca_file) if access.ca_file else None
    try:
        if ca is not None and not ca.strip():
            raise ConfigError("empty")  # else the system's CAs would be trusted in its stead
        context = client_tls_context(ca_data=ca)
    except ConfigError as error:
        raise SettingError(f"--prometheus-ca-file: no usable CA certificate in {access.ca_file!r}") from error
    if access.client_cert_file and access.client_key_file:
        cert = _read("--prometheus-client-tls-cert-file", access.client_cert_file)
        key = _read("--prometheus-client-tls-key-file", access.client_key_file)
        try:
            context = client_tls_context(ca_data=ca, cert_data=cert, key_data=key)
        except ConfigError as error:
            raise SettingError(f"{_TLS_FLAGS}: not a PEM certificate and its private key") from error
    return context


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        raise SettingError(f"{flag}: cannot read {path!r}: {getattr(error, 'strerror', None) or error}") from error


class _Authorization(requests.auth.AuthBase):
    """Adds the bearer token (read afresh for each request) or basic auth."""

    def __init__(self, token: Callable[[], str] | None, basic: tuple[str, str] | None) -> None:
        self._token = token
        self._basic = basic

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if self._token is not None:
            try:
                token = self._token()
            except ConfigError as error:
                raise CredentialsError(str(error)) from error
            if not token or not _fits_a_header(token):
                raise CredentialsError("the token file is empty or has characters a header cannot carry")
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._basic is not None:
            request.headers["Authorization"] = basic_authorization(*self._basic)
        return request


class _TlsAdapter(HTTPAdapter):
    """HTTPS on a ready ``ssl.SSLContext``, directly or through an ``HTTPS_PROXY``: its CA alone is
    trusted (requests would otherwise add its own bundle on some versions) and its client pair
    presented."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        self._pool_settings: dict[str, Any] = {"ssl_context": context}
        if server_hostname:
            self._pool_settings["server_hostname"] = server_hostname
        super().__init__()

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs, **self._pool_settings)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return super().proxy_manager_for(proxy, **proxy_kwargs, **self._pool_settings)

    def cert_verify(self, conn: Any, url: str, verify: bool | str, cert: Any) -> None:
        conn.cert_reqs = "CERT_REQUIRED" if verify else "CERT_NONE"
