"""The adapter's view of the cluster's pods: namespace, name and labels, nothing else.

The HPA asks for a label selector's pods in one namespace. The pods come from the project's
list/watch reflector (exporter.sources.kube: pages of 500, metadata only, watch with bookmarks, backoff with
jitter, relist only on 410), each kept as a small record whose strings are interned (namespaces,
label keys and values repeat across a Deployment's pods). Requests read a per-namespace index that
is rebuilt from the reflector's records at most once per ``refresh_s`` after they change, so a
busy cluster's churn costs one rebuild a second, not one per request.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from exporter.adapter.selector import Selector


@dataclass(frozen=True, slots=True)
class PodMeta:
    namespace: str
    name: str
    labels: Mapping[str, str]


def pod_meta(raw: Mapping[str, Any]) -> PodMeta | None:
    """A pod's (PartialObjectMetadata) JSON as a compact record; None without a name."""
    metadata = raw.get("metadata") or {}
    namespace, name = metadata.get("namespace"), metadata.get("name")
    if not isinstance(namespace, str) or not isinstance(name, str) or not name:
        return None
    labels = metadata.get("labels") or {}
    return PodMeta(
        sys.intern(namespace),
        name,
        {sys.intern(str(k)): sys.intern(str(v)) for k, v in labels.items()} if isinstance(labels, dict) else {},
    )


class PodSource(Protocol):
    """What the index reads: the reflector's records by UID, None until its first list."""

    @property
    def items(self) -> Mapping[str, PodMeta] | None: ...


class PodIndex:
    def __init__(self, source: PodSource, refresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._source = source
        self._refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._built_from: Mapping[str, PodMeta] | None = None
        self._built_at = 0.0
        self._by_namespace: dict[str, list[PodMeta]] = {}

    @property
    def synced(self) -> bool:
        return self._source.items is not None

    def names(self, namespace: str, selector: Selector) -> list[str] | None:
        """The sorted names of the namespace's pods the selector picks; None until synced."""
        pods = self._namespace(namespace)
        if pods is None:
            return None
        return sorted(p.name for p in pods if selector.matches(p.labels))

    def _namespace(self, namespace: str) -> list[PodMeta] | None:
        items = self._source.items
        if items is None:
            return None
        due = items is not self._built_from and self._clock() - self._built_at >= self._refresh_s
        # One rebuild at a time; meanwhile the others read the index as it was (once there is one).
        if due and self._lock.acquire(blocking=self._built_from is None):
            try:
                if items is not self._built_from:
                    by_namespace: dict[str, list[PodMeta]] = {}
                    for pod in items.values():
                        by_namespace.setdefault(pod.namespace, []).append(pod)
                    self._by_namespace, self._built_from, self._built_at = by_namespace, items, self._clock()
            finally:
                self._lock.release()
        return self._by_namespace.get(namespace, [])
