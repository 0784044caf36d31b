"""The Kubernetes API edge: a watch of the pods on this node, kept as a UID -> PodInfo map.

List once, then watch from the list's resourceVersion; a broken watch resumes from the last
resourceVersion seen (bookmarks included), and only an expired one (410 Gone) costs a relist.
The map is replaced, never mutated, so the poll loop reads a consistent copy without locks.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from exporter.model import PodInfo

log = logging.getLogger(__name__)

WATCH_SECONDS = 300  # the server ends each watch after this; we resume from the last version


def api_client(kubeconfig: str | None) -> client.ApiClient:
    """From a kubeconfig file, or the pod's service account when None."""
    if kubeconfig:
        loaded: client.ApiClient = config.new_client_from_config(config_file=kubeconfig)
        return loaded
    configuration = client.Configuration()
    config.incluster_config.InClusterConfigLoader(
        token_filename=config.incluster_config.SERVICE_TOKEN_FILENAME,
        cert_filename=config.incluster_config.SERVICE_CERT_FILENAME,
    ).load_and_set(configuration)
    return client.ApiClient(configuration)


def pod_info(raw: Mapping[str, Any]) -> PodInfo:
    """A pod object's JSON (as the API serves it) reduced to what attribution needs."""
    metadata = raw.get("metadata", {})
    status = raw.get("status", {})
    containers: dict[str, str] = {}
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for container in status.get(key) or ():
            container_id = container.get("containerID") or ""
            if container_id:
                containers[container_id.split("://", 1)[-1]] = container.get("name", "")
    return PodInfo(
        uid=metadata.get("uid", ""),
        namespace=metadata.get("namespace", ""),
        name=metadata.get("name", ""),
        phase=status.get("phase", ""),
        container_names=containers,
        labels=dict(metadata.get("labels") or {}),
    )


class _WatchExpiredError(Exception):
    """The watch's resourceVersion is too old: relist."""


class PodWatcher:
    """Keeps the pods scheduled on ``node_name`` (all pods when None) in memory, from a background thread."""

    def __init__(self, node_name: str | None, kubeconfig: str | None, retry_s: float = 2.0) -> None:
        self.node_name = node_name
        self.up = False
        self._synced = False
        self._pods: dict[str, PodInfo] = {}
        self._kubeconfig = kubeconfig
        self._retry_s = retry_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)

    @property
    def pods(self) -> Mapping[str, PodInfo] | None:
        """Pods by UID, or None until the first list succeeded (the API is unknown, not empty)."""
        return self._pods if self._synced else None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _api(self) -> client.CoreV1Api:
        return client.CoreV1Api(api_client(self._kubeconfig))

    def _run(self) -> None:
        api: client.CoreV1Api | None = None
        version: str | None = None
        last_error = ""
        while not self._stop.is_set():
            try:
                if api is None:
                    api = self._api()
                if version is None:
                    version = self._list(api)
                version = self._watch(api, version)
                last_error = ""
            except _WatchExpiredError:
                version = None
            except ApiException as error:
                if error.status == 410:
                    version = None
                    continue
                self.up = False
                log.warning("Kubernetes API error %s: %s; retrying", error.status, error.reason)
                self._stop.wait(self._retry_s)
            except Exception as error:  # the API edge: any failure means "retry later"
                self.up = False
                message = f"Kubernetes API unavailable ({type(error).__name__}: {error})"
                if message != last_error:
                    log.warning("%s; pods named from pod-resources only, retrying", message.splitlines()[0])
                    last_error = message
                if isinstance(error, config.ConfigException):
                    api = None
                self._stop.wait(self._retry_s)

    def _selector(self) -> str | None:
        return f"spec.nodeName={self.node_name}" if self.node_name else None

    def _list(self, api: client.CoreV1Api) -> str:
        # With _preload_content=False the client returns the raw HTTP response, not a V1PodList.
        response: Any = api.list_pod_for_all_namespaces(
            field_selector=self._selector(), _preload_content=False, _request_timeout=30
        )
        body = json.loads(response.data)
        pods = {info.uid: info for info in (pod_info(item) for item in body.get("items") or ()) if info.uid}
        self._pods = pods
        if not self._synced:
            where = f"on node {self.node_name}" if self.node_name else "in the cluster"
            log.info("watching %d pods %s through the Kubernetes API", len(pods), where)
        self._synced = True
        self.up = True
        return str(body.get("metadata", {}).get("resourceVersion", ""))

    def _watch(self, api: client.CoreV1Api, version: str) -> str:
        response: Any = api.list_pod_for_all_namespaces(
            field_selector=self._selector(),
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(10, WATCH_SECONDS + 30),
        )
        try:
            self.up = True
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    break
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _WatchExpiredError()
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                version = str(obj.get("metadata", {}).get("resourceVersion", version))
                if kind == "BOOKMARK":
                    continue
                info = pod_info(obj)
                pods = dict(self._pods)
                if kind == "DELETED":
                    pods.pop(info.uid, None)
                else:
                    pods[info.uid] = info
                self._pods = pods
        finally:
            response.release_conn()
        return version
