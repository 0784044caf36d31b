"""The Kubernetes API edge: a list/watch reflector as client-go's, and the watch of this node's pods on it.

A reflector keeps one resource in memory as compact frozen records (a caller's function turns each
object into one; whole objects are never kept). It lists in pages, watches from the list's
resourceVersion with bookmarks, keeps the last version seen as events are applied, so a broken
watch (cut, unparsable, timed out) resumes from there, and re-lists only when that version is gone
(410). The loop is a supervised ``Loop``: every failure waits on client-go's reflector backoff (about
1 s doubling to 30 s, with jitter, reset after two healthy minutes), so a 410 storm or an API that is
away costs a few requests a minute instead of hundreds a second. A watch is healthy once it has
stayed open for a minimum duration (client-go's one second); one that ends sooner, even with
events in it, is backed off too, so a proxy ending every stream after its first flush cannot drive
a tight loop. ``up`` is false while failing and each change of state is logged once (a
``StateLog``). No fault in one event or object ends the thread.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from exporter.backoff import Backoff
from exporter.model import PodInfo
from exporter.sources.kubeclient import (
    MAX_ERROR_BODY_BYTES,
    ApiError,
    ConfigError,
    KubeClient,
    ProtocolError,
    StreamTimeout,
    api_error,
    decode_json,
    load_credentials,
)
from exporter.supervise import BackOff, Loop, StateLog, describe

log = logging.getLogger(__name__)

T = TypeVar("T")

PAGE_SIZE = 500  # client-go's pager default
LIST_TIMEOUT_S = 60.0  # per page
MIN_WATCH_TIMEOUT_S = 300.0  # the server ends each watch after 5-10 minutes (client-go's spread)
READ_GRACE_S = 30.0  # beyond the watch's timeout, before a silent server counts as hung
MIN_WATCH_S = 1.0  # a watch open this long is healthy; one ending sooner is backed off (client-go's bound)
JSON = "application/json"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
METADATA_WATCH = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


class _Expired(Exception):  # noqa: N818 (a state of the watch, not an error in itself)
    """410 Gone: the watch's resourceVersion has left the server's history."""


def _uid(raw: Mapping[str, Any]) -> str:
    return str(raw["metadata"]["uid"])


class Reflector(Generic[T]):
    """One resource (``path``, or a function finding it, e.g. by discovery) kept as ``uid -> record``.

    ``convert`` turns an object's JSON into a record, or None to leave it out; it may raise on an
    object it cannot read, which is then counted in ``errors`` and skipped. With ``metadata_only``
    the server sends PartialObjectMetadata (``metadata`` alone), which is all some callers need.
    """

    def __init__(
        self,
        what: str,
        path: str | Callable[[KubeClient], str],
        convert: Callable[[Mapping[str, Any]], T | None],
        connect: Callable[[], KubeClient],
        field_selector: str | None = None,
        label_selector: str | None = None,
        metadata_only: bool = False,
        page_size: int = PAGE_SIZE,
        backoff: Backoff | None = None,
        watch_timeout_s: float | None = None,
        min_watch_s: float = MIN_WATCH_S,
    ) -> None:
        self.what = what
        self.errors: Counter[str] = Counter()  # contained faults: bad_event, bad_object
        self._path = path
        self._convert = convert
        self._connect = connect
        self._selectors = {
            key: value for key, value in (("fieldSelector", field_selector), ("labelSelector", label_selector)) if value
        }
        self._accept_list = METADATA_LIST if metadata_only else JSON
        self._accept_watch = METADATA_WATCH if metadata_only else JSON
        self._page_size = page_size
        self._backoff = backoff or Backoff()
        self._watch_timeout_s = watch_timeout_s
        self._min_watch_s = min_watch_s
        self._lock = threading.Lock()
        self._store: dict[str, T] = {}
        self._changes = 0
        self._published: tuple[int, Mapping[str, T]] = (-1, MappingProxyType({}))
        self._synced = False
        self._version: str | None = None  # the last resourceVersion seen; None: list first
        self._resource = ""  # the path listed and watched
        self._fresh_list = False  # listed, and no watch has been healthy since
        self._client: KubeClient | None = None
        self.state = StateLog(log, f"{what}: Kubernetes API")
        self._loop = Loop(
            f"watch {what}",
            self._step,
            self.state,
            self._backoff,
            consequence=f"retrying with backoff up to {self._backoff.cap_s:g}s, keeping what was last seen",
            expected=(ApiError, StreamTimeout, ProtocolError, ConfigError, OSError, _Expired),
            describe=_describe,
        )

    # --- what callers read ---
    @property
    def items(self) -> Mapping[str, T] | None:
        """Records by UID, or None until the first list completed (unknown, not empty)."""
        if not self._synced:
            return None
        changes, published = self._published
        if changes != self._changes:
            with self._lock:
                self._published = (self._changes, MappingProxyType(dict(self._store)))
            changes, published = self._published
        return published

    @property
    def up(self) -> bool:
        """False before the first list, and while requests fail or watches cannot be kept open."""
        return self._synced and self.state.failing is None

    @property
    def synced(self) -> bool:
        """True once a first list completed; what was last seen is kept while failing after that."""
        return self._synced

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        """Ends the thread soon: requests in flight are cut off."""
        self._loop.stop()
        client = self._client
        if client is not None:
            client.close()

    def join(self, timeout: float | None = None) -> None:
        self._loop.join(timeout)

    # --- the loop ---
    def _step(self) -> float:
        """A list when there is no version to resume from, then one watch; the wait before the next."""
        try:
            if self._client is None:
                self._client = self._connect()
                if self._loop.stopping:
                    return 0.0
            client = self._client
            if self._version is None:
                self._resource = self._path if isinstance(self._path, str) else self._path(client)
                self._version = self._list(client, self._resource)
            self._watch(client, self._resource)
        except _Expired:
            self._version = None
            if self._fresh_list:  # not even a healthy watch since the list: the server cannot be watched
                raise
            # A watch that was healthy fell behind the server's history: relist after one backoff
            # step, as client-go does, without counting it as a failure.
            log.debug("%s: watch expired (410 Gone); listing again", self.what)
            return self._backoff.next_delay()
        except (ConfigError, OSError) as error:
            if not isinstance(error, TimeoutError):
                self._client = None  # credentials, CA or address may have changed: load them again
            raise
        return 0.0

    def _list(self, client: KubeClient, path: str) -> str:
        """All pages into a new store, swapped in whole; the list's resourceVersion."""
        records: dict[str, T] = {}
        token = ""
        restarted = False
        while True:
            params = dict(self._selectors, limit=str(self._page_size))
            if token:
                params["continue"] = token
            try:
                page = client.get_json(path, params, self._accept_list, LIST_TIMEOUT_S)
            except ApiError as error:
                if error.status == 410 and token and not restarted:
                    # The continue token outlived the server's history: start again from page one.
                    records.clear()
                    token, restarted = "", True
                    continue
                raise
            if self._loop.stopping:
                raise InterruptedError("stopping")
            if not isinstance(page, dict):
                raise ProtocolError("a list answer that is not an object")
            for item in page.get("items") or ():
                self._absorb(records, item)
            meta = page.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                version = str(meta.get("resourceVersion") or "")
                break
        if not version:
            raise ProtocolError("a list without a resourceVersion")
        with self._lock:
            self._store = records
            self._changes += 1
        self._fresh_list = True
        if not self._synced:
            log.info("%s: listed %d through the Kubernetes API, watching for changes", self.what, len(records))
            self._synced = True
        return version

    def _absorb(self, records: dict[str, T], item: object) -> None:
        try:
            if not isinstance(item, dict):
                raise ProtocolError("a list item that is not an object")
            record = self._convert(item)
            if record is not None:
                records[_uid(item)] = record
        except Exception as error:  # one unreadable object is left out, never the whole list
            self._contained("bad_object", error)

    def _watch(self, client: KubeClient, path: str) -> None:
        """Follows changes from the last version seen until the server ends the watch."""
        timeout_s = self._watch_timeout_s or MIN_WATCH_TIMEOUT_S * (1 + random.random())
        params = dict(
            self._selectors,
            watch="true",
            resourceVersion=self._version or "",
            allowWatchBookmarks="true",
            timeoutSeconds=str(int(timeout_s)),
        )
        started = time.monotonic()  # before the request: some proxies send the head with the first event
        healthy_at = started + self._min_watch_s
        end = started + timeout_s + READ_GRACE_S
        connection = client.open(path, params, self._accept_watch, end)
        try:
            status = connection.read_head(end)
            if status >= 400:
                error = api_error(status, connection.read_body(end, MAX_ERROR_BODY_BYTES))
                raise _Expired() if status == 410 else error
            if status != 200:
                raise ApiError(status, "Unexpected", "")
            healthy = False
            while not self._loop.stopping:
                try:
                    line = connection.read_line(end if healthy else min(end, healthy_at))
                except StreamTimeout:
                    if healthy or time.monotonic() >= end:
                        raise
                    line = b""  # open and quiet so far: a quiet resource
                if line is None:
                    if not healthy:
                        raise BackOff(f"watches end within {self._min_watch_s:g}s, long before their timeout")
                    return
                if line.strip():
                    self._apply(line)
                if not healthy and time.monotonic() >= healthy_at:
                    healthy = True
                    self._fresh_list = False
                    self.state.recovered()
        finally:
            connection.close()

    def _apply(self, line: bytes) -> None:
        """One watch event into the store; its resourceVersion becomes the one to resume from."""
        event = decode_json(line)  # not JSON: the stream is broken; resume from the last good version
        if not isinstance(event, dict):
            self._contained("bad_event", ProtocolError(f"an event that is not an object: {line[:80]!r}"))
            return
        kind, obj = event.get("type"), event.get("object")
        if kind == "ERROR":
            status = obj if isinstance(obj, dict) else {}
            code = status.get("code")
            if code == 410:
                raise _Expired()
            raise ApiError(
                code if isinstance(code, int) else 500, str(status.get("reason", "")), str(status.get("message", ""))
            )
        uid = None
        record = None
        try:
            if not isinstance(obj, dict) or kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                raise ProtocolError(f"an event of type {kind!r} with a {type(obj).__name__}")
            self._version = str(obj["metadata"].get("resourceVersion") or self._version)
            if kind == "BOOKMARK":
                return
            uid = _uid(obj)
            if kind != "DELETED":
                record = self._convert(obj)
        except Exception as error:  # one unreadable object is skipped (and forgotten); the watch goes on
            self._contained("bad_object", error)
        if uid is not None:
            with self._lock:
                if record is None:
                    self._store.pop(uid, None)
                else:
                    self._store[uid] = record
                self._changes += 1

    # --- contained faults and failure states ---
    def _contained(self, kind: str, error: Exception) -> None:
        self.errors[kind] += 1
        if self.errors[kind] == 1:
            log.warning(
                "%s: skipped %s (%s: %s); further ones are only counted", self.what, kind, type(error).__name__, error
            )


def _describe(error: BaseException) -> str:
    """A failure as its state: stable across retries, so one line is logged per change."""
    if isinstance(error, _Expired):
        return "the watch expired right after the list (410 Gone)"
    if isinstance(error, ApiError):
        kind = f"HTTP {error.status}" + (f" {error.reason}" if error.reason else "")
        return f"{kind}: {error.message.strip().splitlines()[0]}" if error.message.strip() else kind
    if isinstance(error, StreamTimeout):
        return "no answer in time"
    if isinstance(error, ProtocolError):
        return f"unreadable answer: {error}"
    if isinstance(error, ConfigError):
        return f"credentials: {error}"
    return describe(error)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: object) -> str:
    """A string safe to encode anywhere: lone surrogates (from ``\\udc80`` escapes) replaced."""
    text = value if isinstance(value, str) else ("" if value is None else str(value))
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def pod_info(raw: Mapping[str, Any]) -> PodInfo:
    """A pod object's JSON (as the API serves it) reduced to what attribution needs."""
    metadata = raw.get("metadata") or {}
    status = raw.get("status") or {}
    containers: dict[str, str] = {}
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for container in status.get(key) or ():
            container_id = _text(container.get("containerID"))
            if container_id:
                containers[container_id.split("://", 1)[-1]] = _text(container.get("name"))
    return PodInfo(
        uid=_text(metadata.get("uid")),
        namespace=_text(metadata.get("namespace")),
        name=_text(metadata.get("name")),
        phase=_text(status.get("phase")),
        container_names=containers,
        labels={_text(k): _text(v) for k, v in (metadata.get("labels") or {}).items()},
    )


class PodWatcher:
    """The pods scheduled on ``node_name`` (all pods when None) by UID, from a background thread."""

    def __init__(self, node_name: str | None, kubeconfig: str | None, backoff: Backoff | None = None) -> None:
        self.node_name = node_name
        self.reflector: Reflector[PodInfo] = Reflector(
            f"pods on node {node_name}" if node_name else "pods in the cluster",
            "/api/v1/pods",
            pod_info,
            connect=lambda: KubeClient(load_credentials(kubeconfig)),
            field_selector=f"spec.nodeName={node_name}" if node_name else None,
            backoff=backoff,
        )

    @property
    def pods(self) -> Mapping[str, PodInfo] | None:
        """Pods by UID, or None until the first list succeeded (the API is unknown, not empty)."""
        return self.reflector.items

    @property
    def up(self) -> bool:
        return self.reflector.up

    def start(self) -> None:
        self.reflector.start()

    def stop(self) -> None:
        self.reflector.stop()

    def join(self, timeout: float | None = None) -> None:
        self.reflector.join(timeout)
