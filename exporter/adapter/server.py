"""The adapter's HTTPS edge: routes, authentication, authorization and errors as Kubernetes Status.

Everything about metrics is behind the provider interface (exporter.adapter.provider); this module
only speaks HTTP and never sees a backend's own error text.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from exporter.adapter import api
from exporter.adapter.auth import Authenticator, Authorizer, RequestHeaderConfig, ReviewUnavailableError, User
from exporter.adapter.provider import (
    BadRequestError,
    CustomMetricsProvider,
    ExternalMetricsProvider,
    MetricInfo,
    MetricNotFoundError,
    ProviderError,
    UnavailableError,
)
from exporter.adapter.selector import SelectorError, parse_selector
from exporter.adapter.selfmetrics import SelfMetrics
from exporter.adapter.sharing import SharedAnswers, WaitTimeoutError
from exporter.exposition.httpserver import Handler, Server

log = logging.getLogger(__name__)

SHARED_BODY_BYTES = 32 * 2**20  # answers shared for a second, together at most this big
PROBES = frozenset({"/livez", "/readyz", "/healthz"})  # answered by the server's loop, never behind workers
METRICS_PATH = "/metrics"  # the adapter's own metrics, for whom a SubjectAccessReview allows `get /metrics`
NAMESPACED_RESOURCES = frozenset({"pods"})  # of the resources the providers serve; "namespaces" is root-scoped


@dataclass(frozen=True)
class Services:
    custom: CustomMetricsProvider
    external: ExternalMetricsProvider
    authenticator: Authenticator
    authorizer: Authorizer
    always_allow_paths: frozenset[str]
    not_ready: Callable[[], str]  # why /readyz is not ok ("" when ready): caches not synced, no CA yet
    # Identical metric requests within a second share one answer (after each one's own authorization).
    answers: SharedAnswers = field(default_factory=lambda: SharedAnswers(SHARED_BODY_BYTES, len))
    # Conditions reported in /readyz?verbose that never fail readiness: (name, "" when fine, else why).
    conditions: Callable[[], list[tuple[str, str]]] = lambda: []
    self_metrics: SelfMetrics = field(default_factory=SelfMetrics)


class _ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


_NOT_FOUND = _ApiError(404, "NotFound", "the server could not find the requested resource")


class _Handler(Handler):
    server: AdapterServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        started = time.monotonic()
        try:
            url = urlsplit(self.path)
        except ValueError:  # a target no URL parser takes (``http://[::1/apis``): the client's fault, no traceback
            self._send_status(400, "BadRequest", "the request target is not a valid URL")
            return
        self._get(url.path, url.query)
        if self.answer is not None:
            verb, group, resource = _request_labels(url.path)
            self.server.services.self_metrics.observe_request(
                verb, group, resource, self.answer.code, time.monotonic() - started
            )

    def _get(self, path: str, query: str) -> None:
        services = self.server.services
        if path in services.always_allow_paths:
            why_not = services.not_ready() if path == "/readyz" else ""
            if path == "/readyz" and "verbose" in parse_qs(query, keep_blank_values=True):
                self.send(200 if not why_not else 503, _verbose(why_not, services.conditions()), "text/plain")
            elif why_not:
                self.send(503, why_not.encode(), "text/plain; charset=utf-8")
            else:
                self.send(200, b"ok", "text/plain; charset=utf-8")
            return
        if self._verified_under_a_replaced_ca():
            log.info(
                "closing a connection from %s verified under the front proxy's previous CA", self.client_address[0]
            )
            self.drop()  # unanswered: the client's retry connects under the current CA
            return
        try:
            user = services.authenticator.authenticate(self._peer_cert(), self.headers)
            if user is None:
                raise _ApiError(401, "Unauthorized", "Unauthorized")
            if path == METRICS_PATH:
                self._authorize(user, None, path)
                exposition, content_type = services.self_metrics.exposition()
                self.send(200, exposition, content_type)
                return
            route = api.route(path)
            if route is None:
                raise _NOT_FOUND
            self._authorize(user, route, path)
            if route.kind in ("custom", "external"):
                data: bytes = services.answers.get(
                    f"{path}?{query}", lambda: json.dumps(self._serve(route, parse_qs(query))).encode()
                )
            else:
                data = json.dumps(self._serve(route, parse_qs(query))).encode()
        except WaitTimeoutError:  # an identical request's query outlasted its deadline
            self._send_status(503, "ServiceUnavailable", "the metrics backend did not answer in time")
            return
        except _ApiError as error:
            self._send_status(error.code, error.reason, error.message)
            return
        except Exception:  # a failed review or a bug: answer, log, keep serving
            log.exception("%s failed", path)
            self._send_status(500, "InternalError", "an error on the server prevented the request from succeeding")
            return
        self.send(200, data, "application/json")

    def _send_status(self, code: int, reason: str, message: str) -> None:
        self.send(code, json.dumps(api.status(code, reason, message)).encode(), "application/json")

    def _peer_cert(self) -> dict[str, Any] | None:
        connection = self.connection
        return connection.getpeercert() if isinstance(connection, ssl.SSLSocket) else None

    def _verified_under_a_replaced_ca(self) -> bool:
        """A client certificate verified in the handshake under a front-proxy CA since replaced.

        k8s.io/apiserver checks the chain against the current CA on every request; a handshake's
        verification is the connection's context's, so a connection wrapped with a context no longer
        current is closed before it is answered. Its client retries on a new connection (Go's
        transport does so for a GET on a reused one), which the current CA verifies or refuses."""
        connection = self.connection
        return (
            isinstance(connection, ssl.SSLSocket)
            and not self.server.under_current_ca(connection.context)
            and bool(connection.getpeercert())
        )

    def _authorize(self, user: User, route: api.Route | None, path: str) -> None:
        """A SubjectAccessReview whose attributes name exactly the object whose data is returned
        (without a route, a non-resource path: discovery, the adapter's own metrics)."""
        if route is None or route.kind in ("groups", "group", "resources"):
            attributes: dict[str, Any] = {"path": path, "verb": "get"}
            what = f'path "{path}"'
        elif route.kind == "custom":
            attributes = {
                "group": route.group,
                "version": route.version,
                "resource": route.resource,
                "subresource": route.metric,
                "name": route.name,
                "verb": "get",
                "namespace": route.namespace or "",
            }
            what = f'resource "{route.resource}/{route.metric}" in API group "{route.group}"'
        else:
            attributes = {
                "group": route.group,
                "version": route.version,
                "resource": route.metric,
                "verb": "list",
                "namespace": route.namespace or "",
            }
            what = f'resource "{route.metric}" in API group "{route.group}"'
        try:
            allowed = self.server.services.authorizer.allowed(user, attributes)
        except ReviewUnavailableError as error:
            raise _ApiError(500, "InternalError", "the authorization check could not be made") from error
        if not allowed:
            scope = f' in the namespace "{route.namespace}"' if route and route.namespace else ""
            verb = attributes["verb"]
            raise _ApiError(403, "Forbidden", f'User "{user.name}" cannot {verb} {what}{scope}')

    def _serve(self, route: api.Route, query: dict[str, list[str]]) -> dict[str, Any]:
        services = self.server.services
        if route.kind == "groups":
            return api.group_list()
        if route.kind == "group":
            return api.group(route.group)
        if route.kind == "resources":
            if route.group == api.CUSTOM:
                return api.custom_resources(route.version, services.custom.list_all_metrics())
            return api.external_resources(services.external.list_all_external_metrics())
        try:
            selector = parse_selector(query.get("labelSelector", [""])[0])
        except SelectorError as error:
            raise _ApiError(400, "BadRequest", str(error)) from error
        if query.get("metricLabelSelector", [""])[0]:
            raise _ApiError(400, "BadRequest", "metricLabelSelector is not supported by this adapter's rules")
        try:
            if route.kind == "external":
                values = services.external.get_external_metric(route.namespace or "", route.metric, selector)
                return api.external_value_list(values)
            namespaced = route.resource in NAMESPACED_RESOURCES
            if namespaced != (route.resource != "namespaces" and route.namespace is not None):
                raise _NOT_FOUND  # a namespaced resource at the root, or a root-scoped one in a namespace
            info = MetricInfo(route.resource, route.metric, namespaced)
            if route.name == "*":
                found = services.custom.get_metric_by_selector(route.namespace or "", selector, info)
                return api.metric_value_list(route.version, found)
            value = services.custom.get_metric_by_name(route.namespace or "", route.name, info)
            if value is None:
                raise _ApiError(
                    404,
                    "NotFound",
                    f"the server could not find the metric {route.metric} for {route.resource} {route.name}",
                )
            return api.metric_value_list(route.version, [value])
        except MetricNotFoundError as error:
            raise _ApiError(404, "NotFound", str(error)) from error
        except BadRequestError as error:
            raise _ApiError(400, "BadRequest", str(error)) from error
        except UnavailableError as error:
            raise _ApiError(503, "ServiceUnavailable", str(error)) from error
        except ProviderError as error:
            raise _ApiError(500, "InternalError", str(error)) from error


def _request_labels(path: str) -> tuple[str, str, str]:
    """A request's verb, API group and resource for the adapter's request metrics, from a bounded
    set: resources other than those served, and external metrics' names (any a client sends), are
    not label values."""
    route = api.route(path)
    if route is None:
        return "get", "", path if path in PROBES or path == METRICS_PATH else ""
    if route.kind == "custom":
        return "get", route.group, route.resource if route.resource in ("pods", "namespaces") else "other"
    if route.kind == "external":
        return "list", route.group, "*"
    return "get", route.group, ""


def _verbose(why_not: str, conditions: list[tuple[str, str]]) -> bytes:
    """/readyz?verbose as k8s.io/apiserver writes it, a line per check; conditions are reported
    beside readiness and never fail it."""
    lines = [f"[-]ready failed: {why_not}" if why_not else "[+]ready ok"]
    lines += [
        f"[-]{name} failed (not a readiness check): {trouble}" if trouble else f"[+]{name} ok"
        for name, trouble in conditions
    ]
    lines.append(f"readyz check {'failed' if why_not else 'passed'}")
    return "\n".join(lines).encode() + b"\n"


def tls_context(cert: str, key: str, client_ca_pem: str | None) -> ssl.SSLContext:
    """The serving context; with the front proxy's CA, client certificates are asked for and verified."""
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    tls.load_cert_chain(cert, key)
    if client_ca_pem:
        tls.load_verify_locations(cadata=client_ca_pem)
        tls.verify_mode = ssl.CERT_OPTIONAL
    return tls


class AdapterServer(Server):
    """Serves over TLS with a context that is replaced when the front proxy's CA or the serving
    certificate changes (each accepted connection is wrapped with the context current at that
    moment). Until a CA is installed no client certificate is asked for, so only bearer tokens
    authenticate."""

    def __init__(
        self,
        address: tuple[str, int],
        cert: str,
        key: str,
        services: Services,
        max_connections_per_client: int | None = None,
    ) -> None:
        self.services = services
        self._cert, self._key = cert, key
        self._replacing = threading.Lock()
        # A probe that needs no authentication is a flag check, cheap enough for the loop thread.
        probes = PROBES & services.always_allow_paths
        tls = tls_context(cert, key, None)
        # The contexts made with the front proxy's current CA: a connection wrapped with one of them
        # was verified as now, whichever serving certificate it was made for.
        self._current_ca: weakref.WeakSet[ssl.SSLContext] = weakref.WeakSet([tls])
        super().__init__(
            address,
            _Handler,
            tls,
            probe_paths=probes,
            max_connections_per_client=max_connections_per_client,
        )

    def under_current_ca(self, context: ssl.SSLContext) -> bool:
        return context in self._current_ca

    def serve_certificate(self, cert: str, key: str) -> None:
        """Serves new connections with this pair (raises, keeping the current one, if it does not load)."""
        with self._replacing:
            front_proxy = self.services.authenticator.front_proxy
            tls = tls_context(cert, key, front_proxy.client_ca_pem if front_proxy else None)
            self._cert, self._key = cert, key
            self._current_ca.add(tls)
            self.tls = tls

    def trust(self, front_proxy: RequestHeaderConfig) -> None:
        """Installs the front proxy's settings (raises if its CA does not load). A new CA is a new
        context, and connections wrapped with the one before are trusted no more (see the handler);
        the same CA with other header names keeps the context and its connections."""
        with self._replacing:
            current = self.services.authenticator.front_proxy
            if current is None or current.client_ca_pem != front_proxy.client_ca_pem:
                tls = tls_context(self._cert, self._key, front_proxy.client_ca_pem)
                self._current_ca = weakref.WeakSet([tls])
                self.tls = tls
            self.services.authenticator.front_proxy = front_proxy
