"""A small HTTP(S) server speaking the Kubernetes API's JSON for what the agent and adapter call.

Why not a real kube-apiserver: none can be run on the machines this project is built and tested
on (no cluster, no etcd, no network), so the agent's watches are tested against this server. It
answers as the real API does for the calls made:

- ``GET /api/v1/pods`` and ``/api/v1/namespaces/<ns>/pods``: a PodList with
  ``metadata.resourceVersion``; ``limit`` pages it, each page but the last carrying a
  ``metadata.continue`` token (and ``remainingItemCount`` when no selector is given); every page of
  one list comes from the same snapshot; a token made stale by ``expire_continues()`` or
  ``compact()`` answers ``410 Expired``. ``fieldSelector`` takes ``=``, ``==``, ``!=`` on the fields
  the real API supports for the resource (others: ``400 BadRequest``); ``labelSelector`` takes
  ``k=v``, ``k!=v``, ``k`` and ``!k``.
- ``watch=true&resourceVersion=N``: one JSON event per line, chunked (ADDED / MODIFIED / DELETED,
  BOOKMARK when ``allowWatchBookmarks=true`` and a test calls ``bookmark()``, ERROR with a 410
  Status when N is older than the retained history); an object leaving the selector is sent as
  DELETED; without N (or with 0) the current objects come first as ADDED. ``timeoutSeconds`` ends
  the watch.
- Metadata only: ``Accept: application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1`` on a
  list answers a ``PartialObjectMetadataList`` (items ``PartialObjectMetadata``, ``metadata`` only);
  ``as=PartialObjectMetadata`` on a watch sends such objects in its events; any other Accept gets
  the full objects.
- ResourceSlices (``resource.k8s.io``, cluster-scoped) at ``/apis/resource.k8s.io/<v>/resourceslices``
  for each version in ``resource_versions`` (``v1``, ``v1beta2``, ``v1beta1``), with the discovery
  document ``/apis/resource.k8s.io`` (an APIGroup naming the served versions, the first preferred).
  Slices follow upstream's types: ``spec.driver``, ``spec.nodeName``, ``spec.pool`` (``name``,
  ``generation``, ``resourceSliceCount``) and ``spec.devices[].name``; they are stored in the ``v1``
  shape (device attributes at ``spec.devices[].attributes``, each value one of ``string``, ``int``,
  ``bool``, ``version``), served so in ``v1`` and ``v1beta2``, and in ``v1beta1`` with them under
  ``spec.devices[].basic`` (``attributes``, ``capacity``), as upstream's conversion does. Field
  selectors: ``metadata.name``, ``spec.nodeName``, ``spec.driver``.

Faults tests can cause: ``break_watches()`` (each watch ends as the server ends it), ``cut_watches()``
(each watch's connection closes in the middle of its chunked stream, as a dropped connection
does), ``end_watches_after`` (every watch ends normally after that many events, as a proxy that
ends each stream after its first flush), ``compact()`` (history gone: resuming watches get 410),
``expire_continues()``, ``watch_gone`` (every watch answers 410 at once, forever), ``fail_status``
(every list and watch answers that HTTP status, forever), ``forbidden`` (resources answering 403, as
RBAC does). Names need not be valid UTF-8 on the wire: objects are written with
``ensure_ascii=False`` and ``surrogateescape``, so a name holding ``\\udcff`` goes out as the raw
byte 0xff, and one holding another lone surrogate (``\\ud800``) as its JSON escape. Every request is
recorded in ``calls`` with its time. Over TLS with a test CA's certificate when given a ``Pki``;
``token`` makes it answer 401 to requests without that bearer token.

For the adapter it also answers ``POST`` TokenReviews (``status.user`` with ``username``,
``groups``, and ``uid`` and ``extra`` when ``tokens`` gives them) and SubjectAccessReviews (``allow``
decides on the review's whole ``spec``: ``user``, ``uid``, ``groups``, ``extra`` and the attributes,
each recorded in ``access_reviews``), and ``GET`` the ``kube-system/extension-apiserver-authentication``
ConfigMap, and the ``apiregistration.k8s.io/v1`` APIServices in ``api_services`` (by name; see
``api_service_json``), as an ``APIServiceList`` or one ``APIService``.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from sim.certs import Pki

Obj = dict[str, Any]

TokenUser = tuple[str, list[str]] | tuple[str, list[str], str, dict[str, list[str]]]
"""A bearer token's user: (username, groups) or (username, groups, uid, extra), in UserInfo's order."""
USER_INFO_FIELDS = ("username", "groups", "uid", "extra")

# resource -> (kind, the field selectors upstream supports for it)
RESOURCES: dict[str, tuple[str, frozenset[str]]] = {
    "pods": (
        "Pod",
        frozenset(
            {
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            }
        ),
    ),
    "resourceslices": ("ResourceSlice", frozenset({"metadata.name", "spec.nodeName", "spec.driver"})),
}
KIND_TO_RESOURCE = {kind: resource for resource, (kind, _) in RESOURCES.items()}
API_SERVICES = "/apis/apiregistration.k8s.io/v1/apiservices"
RESOURCE_GROUP = "resource.k8s.io"


def pod_json(
    uid: str,
    namespace: str,
    name: str,
    node: str,
    phase: str = "Running",
    containers: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> Obj:
    """A pod object as the API returns it; ``containers`` maps container name -> runtime id."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels or {}},
        "spec": {"nodeName": node, "containers": [{"name": n} for n in (containers or {})]},
        "status": {
            "phase": phase,
            "containerStatuses": [
                {"name": n, "containerID": f"containerd://{cid}", "ready": True}
                for n, cid in (containers or {}).items()
            ],
        },
    }


def api_service_json(group: str, version: str, service: tuple[str, str] | None) -> Obj:
    """An APIService as kube-apiserver returns it: sending ``group``/``version`` to the Service
    (namespace, name), or served by kube-apiserver itself (``service`` None)."""
    spec: Obj = {"group": group, "version": version, "groupPriorityMinimum": 100, "versionPriority": 100}
    if service is not None:
        spec |= {"service": {"namespace": service[0], "name": service[1], "port": 443}, "insecureSkipTLSVerify": True}
    return {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": f"{version}.{group}", "uid": f"uid-{version}.{group}", "resourceVersion": "1"},
        "spec": spec,
        "status": {"conditions": [{"type": "Available", "status": "True", "reason": "Passed"}]},
    }


def resource_slice_json(
    name: str, node: str, driver: str, pool: str, devices: dict[str, dict[str, Any]], uid: str | None = None
) -> Obj:
    """A ResourceSlice in the ``resource.k8s.io/v1`` shape; ``devices`` maps a device name to its
    attributes as plain values (str, int, bool), typed here as the API types them."""

    def typed(value: Any) -> dict[str, Any]:
        if isinstance(value, bool):
            return {"bool": value}
        if isinstance(value, int):
            return {"int": value}
        return {"string": str(value)}

    return {
        "apiVersion": f"{RESOURCE_GROUP}/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": name, "uid": uid or f"slice-{name}"},
        "spec": {
            "driver": driver,
            "nodeName": node,
            "pool": {"name": pool, "generation": 1, "resourceSliceCount": 1},
            "devices": [
                {"name": device, "attributes": {key: typed(value) for key, value in attributes.items()}}
                for device, attributes in devices.items()
            ],
        },
    }


@dataclass(frozen=True)
class Call:
    """One request as the server saw it."""

    at: float  # time.monotonic()
    method: str
    path: str
    query: dict[str, list[str]]
    accept: str = ""
    authorization: str = ""
    client_cn: str = ""  # the common name of the client certificate presented over TLS

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None

    @property
    def is_watch(self) -> bool:
        return self.param("watch") in ("true", "True", "1")


@dataclass
class _Snapshot:
    version: int
    items: list[Obj] = field(default_factory=list)


class FakeApiServer:
    def __init__(self, tls: Pki | None = None, token: str | None = None) -> None:
        self._cond = threading.Condition()
        self._objects: dict[str, dict[str, Obj]] = {resource: {} for resource in RESOURCES}
        self._events: list[tuple[int, str, str, Obj]] = []  # (version, resource, type, object)
        self._version = 100
        self._oldest = 100  # watches from before this version get 410 Gone
        self._generation = 0  # bumped to end every open watch
        self._cut = False  # with the generation bumped: end them without the last chunk
        self._bookmarks = 0  # bumped to send a BOOKMARK on every open watch that allows them
        self._snapshots: dict[int, _Snapshot] = {}  # continue token id -> the list it continues
        self._next_snapshot = 0
        self._raw_lines: list[bytes] = []  # sent once to the watches open when injected
        self.expire_next_continues = 0  # this many continue requests answer 410 (then they work again)
        self.calls: list[Call] = []
        self.watch_gone = False
        self.end_watches_after: int | None = None
        self.fail_status: int | None = None
        self.forbidden: set[str] = set()
        self.resource_versions: tuple[str, ...] = ("v1", "v1beta1")
        self.token = token
        self.tokens: dict[str, TokenUser] = {}  # bearer token -> its user
        self.allow: Callable[[dict[str, Any]], bool] = lambda spec: True  # SubjectAccessReview spec -> allowed
        self.access_reviews: list[dict[str, Any]] = []
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {}
        self.api_services: dict[str, Obj] = {}  # APIService name -> the object
        self.pki = tls
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.server_cert, tls.server_key)
            context.load_verify_locations(tls.ca)
            context.verify_mode = ssl.CERT_OPTIONAL
            self._server.socket = context.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    # --- what tests do ---
    def apply(self, obj: Obj) -> None:
        """Creates or replaces an object (a Pod or a ResourceSlice, by its ``kind``)."""
        resource = KIND_TO_RESOURCE[obj.get("kind", "Pod")]
        with self._cond:
            self._version += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self._version)
            uid = obj["metadata"]["uid"]
            kind = "MODIFIED" if uid in self._objects[resource] else "ADDED"
            self._objects[resource][uid] = obj
            self._events.append((self._version, resource, kind, obj))
            self._cond.notify_all()

    def delete(self, uid: str) -> None:
        with self._cond:
            resource = next(r for r, objects in self._objects.items() if uid in objects)
            obj = copy.deepcopy(self._objects[resource].pop(uid))
            self._version += 1
            obj["metadata"]["resourceVersion"] = str(self._version)
            self._events.append((self._version, resource, "DELETED", obj))
            self._cond.notify_all()

    def objects(self, resource: str = "pods") -> dict[str, Obj]:
        with self._cond:
            return copy.deepcopy(self._objects[resource])

    def break_watches(self) -> None:
        with self._cond:
            self._generation += 1
            self._cut = False
            self._cond.notify_all()

    def cut_watches(self) -> None:
        with self._cond:
            self._generation += 1
            self._cut = True
            self._cond.notify_all()

    def bookmark(self) -> None:
        """Every open watch that allows bookmarks gets a BOOKMARK at the current version."""
        with self._cond:
            self._bookmarks += 1
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: older watches and lists must start over."""
        with self._cond:
            self._events.clear()
            self._snapshots.clear()
            self._oldest = self._version + 1
            self._generation += 1
            self._cut = False
            self._cond.notify_all()

    def expire_continues(self) -> None:
        with self._cond:
            self._snapshots.clear()

    def inject(self, line: bytes) -> None:
        """Sends ``line`` as it is, as one line of every watch open now (a broken proxy, a bad byte)."""
        with self._cond:
            self._raw_lines.append(line)
            self._cond.notify_all()

    def list_calls(self, resource: str = "pods") -> list[Call]:
        return [c for c in self.calls if c.path.endswith(f"/{resource}") and not c.is_watch]

    def watch_calls(self, resource: str = "pods") -> list[Call]:
        return [c for c in self.calls if c.path.endswith(f"/{resource}") and c.is_watch]

    def write_kubeconfig(
        self, path: Path, token: str | None = None, client_cert: bool = False, inline: bool = False
    ) -> Path:
        """A kubeconfig for this server: its CA (a file, or ``inline`` as ``-data``), and as the user a
        ``token`` and/or the test PKI's client certificate."""
        cluster = {"server": self.url}
        user: dict[str, str] = {}
        if self.pki is not None:
            if inline:
                cluster["certificate-authority-data"] = base64.b64encode(self.pki.ca.read_bytes()).decode()
            else:
                cluster["certificate-authority"] = str(self.pki.ca)
            if client_cert:
                for key, file in (("client-certificate", self.pki.client_cert), ("client-key", self.pki.client_key)):
                    if inline:
                        user[f"{key}-data"] = base64.b64encode(file.read_bytes()).decode()
                    else:
                        user[key] = str(file)
        if token:
            user["token"] = token
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        return path

    def start(self) -> FakeApiServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.break_watches()
        self._server.shutdown()
        self._server.server_close()

    # --- the API's logic, under the lock ---
    def _list(
        self, resource: str, version: str, selector: _Selector, limit: int, token: str, metadata_only: bool
    ) -> tuple[int, Obj]:
        with self._cond:
            if token:
                try:
                    state = json.loads(base64.urlsafe_b64decode(token))
                    snapshot_id, offset = int(state["id"]), int(state["offset"])
                    if self.expire_next_continues > 0:
                        self.expire_next_continues -= 1
                        raise KeyError(snapshot_id)
                    snapshot = self._snapshots[snapshot_id]
                except (ValueError, KeyError, TypeError):
                    return 410, _status(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter.",
                    )
            else:
                items = sorted(
                    (o for o in self._objects[resource].values() if selector.matches(o)),
                    key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]),
                )
                # Stored objects are replaced, never changed in place: the list of them is the snapshot.
                snapshot, offset, snapshot_id = _Snapshot(self._version, items), 0, 0
            page = snapshot.items[offset : offset + limit] if limit else snapshot.items[offset:]
            metadata: Obj = {"resourceVersion": str(snapshot.version)}
            rest = len(snapshot.items) - offset - len(page)
            if rest > 0:
                if not token:  # the first page: keep its snapshot for the pages after it (the last 32 lists)
                    self._next_snapshot += 1
                    snapshot_id = self._next_snapshot
                    self._snapshots[snapshot_id] = snapshot
                    for stale in [k for k in self._snapshots if k <= snapshot_id - 32]:
                        del self._snapshots[stale]
                state = {"id": snapshot_id, "offset": offset + len(page)}
                metadata["continue"] = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
                if selector.empty:
                    metadata["remainingItemCount"] = rest
        kind = RESOURCES[resource][0]
        if metadata_only:
            return 200, {
                "kind": "PartialObjectMetadataList",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": metadata,
                "items": [_partial(o) for o in page],
            }
        return 200, {
            "kind": f"{kind}List",
            "apiVersion": _api_version(resource, version),
            "metadata": metadata,
            "items": [_served(resource, version, o) for o in page],
        }

    def _watch_events(
        self,
        resource: str,
        version: str,
        selector: _Selector,
        since_text: str,
        timeout_s: float,
        bookmarks: bool,
        metadata_only: bool,
    ) -> Iterator[Obj | bytes | None]:
        """A watch's events (raw lines as bytes) until it ends (None: cut, not ended); taken under the
        lock, yielded outside it."""
        deadline = time.monotonic() + timeout_s

        def shown(obj: Obj) -> Obj:
            return _partial(obj) if metadata_only else _served(resource, version, obj)

        with self._cond:
            generation, bookmark, raw_sent = self._generation, self._bookmarks, len(self._raw_lines)
            if self.watch_gone or (since_text not in ("", "0") and int(since_text) < self._oldest - 1):
                since = self._oldest
                gone = True
            else:
                gone = False
                if since_text in ("", "0"):
                    since = self._version
                    initial = [o for o in self._objects[resource].values() if selector.matches(o)]
                else:
                    since, initial = int(since_text), []
        if gone:
            message = f"too old resource version: {since_text} ({since})"
            yield {"type": "ERROR", "object": _status(410, "Expired", message)}
            return
        sent_uids: set[str] = set()
        for obj in initial:
            sent_uids.add(obj["metadata"]["uid"])
            yield {"type": "ADDED", "object": shown(obj)}
        sent = since
        while True:
            out: list[Obj | bytes] = []
            with self._cond:
                if self._generation != generation:
                    cut = self._cut
                    break
                out.extend(self._raw_lines[raw_sent:])
                raw_sent = len(self._raw_lines)
                for event_version, event_resource, kind, obj in self._events:
                    if event_version <= sent or event_resource != resource:
                        continue
                    uid = obj["metadata"]["uid"]
                    if selector.matches(obj):
                        if kind == "DELETED":
                            sent_uids.discard(uid)
                        else:
                            sent_uids.add(uid)
                        out.append({"type": kind, "object": shown(obj)})
                    elif uid in sent_uids:  # left the selector: gone for this watch
                        sent_uids.discard(uid)
                        out.append({"type": "DELETED", "object": shown(obj)})
                sent = max(sent, self._version)
                if bookmarks and self._bookmarks != bookmark:
                    bookmark = self._bookmarks
                    kind_name = "PartialObjectMetadata" if metadata_only else RESOURCES[resource][0]
                    out.append(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": kind_name,
                                "apiVersion": _api_version(resource, version),
                                "metadata": {"resourceVersion": str(self._version)},
                            },
                        }
                    )
                if not out:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self._cond.wait(timeout=left)
                    continue
            yield from out
        if cut:
            yield None

    # --- the HTTP side ---
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # watches stream with chunked encoding, as the real API does

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                call = Call(
                    time.monotonic(),
                    "GET",
                    url.path,
                    query,
                    self.headers.get("Accept", ""),
                    self.headers.get("Authorization", ""),
                    _client_cn(self.connection),
                )
                api.calls.append(call)
                if api.token is not None and call.authorization != f"Bearer {api.token}":
                    self._json(401, _status(401, "Unauthorized", "Unauthorized"))
                    return
                config_map = re.fullmatch(r"/api/v1/namespaces/([^/]+)/configmaps/([^/]+)", url.path)
                if config_map and config_map.groups() in api.config_maps:
                    namespace, name = config_map.groups()
                    self._json(
                        200,
                        {
                            "apiVersion": "v1",
                            "kind": "ConfigMap",
                            "metadata": {"name": name, "namespace": namespace},
                            "data": api.config_maps[(namespace, name)],
                        },
                    )
                    return
                if url.path == API_SERVICES or url.path.startswith(API_SERVICES + "/"):
                    self._api_services(url.path.removeprefix(API_SERVICES).strip("/"))
                    return
                if url.path == f"/apis/{RESOURCE_GROUP}":
                    self._json(200, _api_group(api.resource_versions))
                    return
                route = _route(url.path, api.resource_versions)
                if route is None:
                    self._json(404, _status(404, "NotFound", f"the server could not find {url.path}"))
                    return
                resource, version, namespace = route
                if resource in api.forbidden:
                    self._json(403, _status(403, "Forbidden", f"cannot list resource {resource!r}"))
                    return
                if api.fail_status is not None:
                    self._json(api.fail_status, _status(api.fail_status, "InternalError", "failing as told"))
                    return
                try:
                    selector = _Selector(
                        resource, namespace, call.param("fieldSelector") or "", call.param("labelSelector") or ""
                    )
                except ValueError as error:
                    self._json(400, _status(400, "BadRequest", str(error)))
                    return
                accept = call.accept
                if call.is_watch:
                    self._watch(
                        api._watch_events(
                            resource,
                            version,
                            selector,
                            call.param("resourceVersion") or "",
                            float(call.param("timeoutSeconds") or 1800),
                            call.param("allowWatchBookmarks") == "true",
                            "as=PartialObjectMetadata;" in accept or accept.endswith("as=PartialObjectMetadata"),
                        )
                    )
                    return
                code, body = api._list(
                    resource,
                    version,
                    selector,
                    int(call.param("limit") or 0),
                    call.param("continue") or "",
                    "as=PartialObjectMetadataList" in accept,
                )
                self._json(code, body)

            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                api.calls.append(Call(time.monotonic(), "POST", self.path, {}))
                spec = review.get("spec", {})
                if self.path.startswith("/apis/authentication.k8s.io/v1/tokenreviews"):
                    known = api.tokens.get(spec.get("token", ""))
                    review["status"] = (
                        {"authenticated": True, "user": dict(zip(USER_INFO_FIELDS, known, strict=False))}
                        if known
                        else {"authenticated": False}
                    )
                elif self.path.startswith("/apis/authorization.k8s.io/v1/subjectaccessreviews"):
                    api.access_reviews.append(spec)
                    review["status"] = {"allowed": bool(api.allow(spec))}
                else:
                    self._json(404, _status(404, "NotFound", "not found"))
                    return
                self._json(201, review)

            def _api_services(self, name: str) -> None:
                registered = dict(api.api_services)
                if not name:
                    self._json(
                        200,
                        {
                            "kind": "APIServiceList",
                            "apiVersion": "apiregistration.k8s.io/v1",
                            "metadata": {"resourceVersion": str(api._version)},
                            "items": list(registered.values()),
                        },
                    )
                elif name in registered:
                    self._json(200, registered[name])
                else:
                    message = f'apiservices.apiregistration.k8s.io "{name}" not found'
                    self._json(404, _status(404, "NotFound", message))

            def _json(self, code: int, body: Obj) -> None:
                data = _encode(body)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def _watch(self, events: Iterator[Obj | bytes | None]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.flush()
                try:
                    for sent, event in enumerate(events, 1):
                        if event is None:
                            return  # cut: the connection closes without the last chunk
                        self._chunk((event if isinstance(event, bytes) else _encode(event)) + b"\n")
                        if sent == api.end_watches_after:
                            break
                except OSError:
                    return  # the client went away
                self._chunk(b"")  # the last chunk: the watch ends

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        return Handler


class _Selector:
    """A request's namespace, field selector and label selector, over one resource's objects."""

    def __init__(self, resource: str, namespace: str | None, fields: str, labels: str) -> None:
        self.namespace = namespace
        self.fields = [_term(t) for t in fields.split(",") if t]
        for name, _, _ in self.fields:
            if name not in RESOURCES[resource][1]:
                raise ValueError(f"field label not supported: {name}")
        self.labels = [_label_term(t) for t in labels.split(",") if t]
        self.empty = not self.fields and not self.labels

    def matches(self, obj: Obj) -> bool:
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        for name, negate, value in self.fields:
            actual: Any = obj
            for part in name.split("."):
                actual = actual.get(part, "") if isinstance(actual, dict) else ""
            if (str(actual) == value) == negate:
                return False
        obj_labels = obj["metadata"].get("labels") or {}
        for key, op, value in self.labels:
            if op == "exists" and key not in obj_labels:
                return False
            if op == "absent" and key in obj_labels:
                return False
            if op == "=" and obj_labels.get(key) != value:
                return False
            if op == "!=" and obj_labels.get(key) == value:
                return False
        return True


def _term(term: str) -> tuple[str, bool, str]:
    for op, negate in (("!=", True), ("==", False), ("=", False)):
        if op in term:
            name, _, value = term.partition(op)
            return name.strip(), negate, value.strip()
    raise ValueError(f"invalid field selector term {term!r}")


def _label_term(term: str) -> tuple[str, str, str]:
    term = term.strip()
    if "!=" in term:
        key, _, value = term.partition("!=")
        return key.strip(), "!=", value.strip()
    if "=" in term:
        key, _, value = term.replace("==", "=").partition("=")
        return key.strip(), "=", value.strip()
    if term.startswith("!"):
        return term[1:].strip(), "absent", ""
    if re.fullmatch(r"[A-Za-z0-9./_-]+", term):
        return term, "exists", ""
    raise ValueError(f"unable to parse requirement: {term!r}")


def _route(path: str, resource_versions: tuple[str, ...]) -> tuple[str, str, str | None] | None:
    """(resource, version, namespace or None) for a collection path this server serves."""
    if path == "/api/v1/pods":
        return "pods", "v1", None
    namespaced = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", path)
    if namespaced:
        return "pods", "v1", namespaced.group(1)
    group = re.fullmatch(rf"/apis/{re.escape(RESOURCE_GROUP)}/([^/]+)/resourceslices", path)
    if group and group.group(1) in resource_versions:
        return "resourceslices", group.group(1), None
    return None


def _client_cn(connection: object) -> str:
    if not isinstance(connection, ssl.SSLSocket):
        return ""
    subject: Any = (connection.getpeercert() or {}).get("subject", ())
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    return str(names[0]) if names else ""


def _api_version(resource: str, version: str) -> str:
    return version if resource == "pods" else f"{RESOURCE_GROUP}/{version}"


def _api_group(versions: tuple[str, ...]) -> Obj:
    served = [{"groupVersion": f"{RESOURCE_GROUP}/{v}", "version": v} for v in versions]
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": RESOURCE_GROUP,
        "versions": served,
        "preferredVersion": served[0] if served else {},
    }


def _served(resource: str, version: str, obj: Obj) -> Obj:
    """The stored object as the requested version shows it."""
    if resource != "resourceslices" or version != "v1beta1":  # v1beta2 has v1's shape
        return obj
    converted = copy.deepcopy(obj)
    converted["apiVersion"] = f"{RESOURCE_GROUP}/{version}"
    converted["spec"]["devices"] = [
        {"name": device["name"], "basic": {k: v for k, v in device.items() if k != "name"}}
        for device in obj["spec"].get("devices", [])
    ]
    return converted


def _partial(obj: Obj) -> Obj:
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _encode(body: Obj) -> bytes:
    try:
        return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate outside \udc80-\udcff: send its JSON escape
        return json.dumps(body).encode()
