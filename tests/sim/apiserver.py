"""A small HTTP server speaking the Kubernetes API's JSON for what the agent and adapter call.

Why not a real kube-apiserver: none can be run on the machines this project is built and tested
on (no cluster, no etcd, no network), so the agent's pod watch is tested against this server
instead. It serves exactly what the real API serves for the calls the agent makes:
``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`` returns a PodList with a
``metadata.resourceVersion``; with ``watch=true&resourceVersion=N`` it streams one JSON event per
line (ADDED / MODIFIED / DELETED / BOOKMARK, or ERROR with a 410 Status when N is older than the
retained history). Tests can break open watches and compact the history to force a relist.
For the adapter it also answers ``POST`` TokenReviews and SubjectAccessReviews (from ``tokens``
and ``allow``) and ``GET`` the ``kube-system/extension-apiserver-authentication`` ConfigMap.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse


def pod_json(
    uid: str,
    namespace: str,
    name: str,
    node: str,
    phase: str = "Running",
    containers: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
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


class FakeApiServer:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pods: dict[str, dict[str, Any]] = {}
        self._events: list[tuple[int, str, dict[str, Any]]] = []
        self._version = 100
        self._oldest = 100  # watches from before this version get 410 Gone
        self._generation = 0  # bumped to end every open watch
        self.requests: list[dict[str, list[str]]] = []
        self.tokens: dict[str, tuple[str, list[str]]] = {}  # bearer token -> (user, groups)
        self.allow: Callable[[dict[str, Any]], bool] = lambda spec: True  # SubjectAccessReview spec -> allowed
        self.access_reviews: list[dict[str, Any]] = []
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    # --- what tests do ---
    def apply(self, pod: dict[str, Any]) -> None:
        with self._cond:
            self._version += 1
            pod = json.loads(json.dumps(pod))
            pod["metadata"]["resourceVersion"] = str(self._version)
            uid = pod["metadata"]["uid"]
            kind = "MODIFIED" if uid in self._pods else "ADDED"
            self._pods[uid] = pod
            self._events.append((self._version, kind, pod))
            self._cond.notify_all()

    def delete(self, uid: str) -> None:
        with self._cond:
            pod = self._pods.pop(uid)
            self._version += 1
            self._events.append((self._version, "DELETED", pod))
            self._cond.notify_all()

    def break_watches(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: older watches must relist."""
        with self._cond:
            self._events.clear()
            self._oldest = self._version + 1
            self._generation += 1
            self._cond.notify_all()

    def watch_requests(self) -> list[dict[str, list[str]]]:
        return [q for q in self.requests if q.get("watch", [""])[0] in ("true", "True", "1")]

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
            "users:\n- name: fake\n  user: {}\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n"
            "current-context: fake\n"
        )
        return path

    def start(self) -> FakeApiServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.break_watches()
        self._server.shutdown()
        self._server.server_close()

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
                api.requests.append(query)
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
                if url.path != "/api/v1/pods":
                    self._json(404, {"kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound"})
                    return
                node = _node_from_selector(query.get("fieldSelector", [""])[0])
                if query.get("watch", [""])[0] in ("true", "True", "1"):
                    self._watch(
                        node,
                        int(query.get("resourceVersion", ["0"])[0] or 0),
                        float(query.get("timeoutSeconds", ["300"])[0]),
                    )
                else:
                    with api._cond:
                        items = [p for p in api._pods.values() if _on_node(p, node)]
                        version = api._version
                    self._json(
                        200,
                        {
                            "kind": "PodList",
                            "apiVersion": "v1",
                            "metadata": {"resourceVersion": str(version)},
                            "items": items,
                        },
                    )

            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                spec = review.get("spec", {})
                if self.path.startswith("/apis/authentication.k8s.io/v1/tokenreviews"):
                    known = api.tokens.get(spec.get("token", ""))
                    review["status"] = (
                        {"authenticated": True, "user": {"username": known[0], "groups": known[1]}}
                        if known
                        else {"authenticated": False}
                    )
                elif self.path.startswith("/apis/authorization.k8s.io/v1/subjectaccessreviews"):
                    api.access_reviews.append(spec)
                    review["status"] = {"allowed": bool(api.allow(spec))}
                else:
                    self._json(404, {"kind": "Status", "status": "Failure", "code": 404, "reason": "NotFound"})
                    return
                self._json(201, review)

            def _json(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)

            def _watch(self, node: str | None, since: int, timeout_s: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self._stream(node, since, timeout_s)
                finally:
                    self._chunk(b"")  # the last chunk: the watch ends

            def _stream(self, node: str | None, since: int, timeout_s: float) -> None:
                with api._cond:
                    generation = api._generation
                    if since < api._oldest - 1:
                        self._event(
                            {
                                "type": "ERROR",
                                "object": {
                                    "kind": "Status",
                                    "apiVersion": "v1",
                                    "status": "Failure",
                                    "code": 410,
                                    "reason": "Expired",
                                    "message": f"too old resource version: {since} ({api._oldest})",
                                },
                            }
                        )
                        return
                    sent = since
                    while api._generation == generation:
                        for version, kind, pod in api._events:
                            if version > sent:
                                sent = version
                                if _on_node(pod, node):
                                    self._event({"type": kind, "object": pod})
                        if not api._cond.wait(timeout=timeout_s):
                            return

            def _event(self, event: dict[str, Any]) -> None:
                self._chunk(json.dumps(event).encode() + b"\n")

            def _chunk(self, data: bytes) -> None:
                try:
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                except OSError:
                    pass

        return Handler


def _node_from_selector(selector: str) -> str | None:
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if key == "spec.nodeName":
            return value
    return None


def _on_node(pod: dict[str, Any], node: str | None) -> bool:
    return node is None or pod.get("spec", {}).get("nodeName") == node
