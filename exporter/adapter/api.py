"""The custom and external metrics APIs' JSON, and their routes, as Kubernetes serves them.

Shapes follow k8s.io/metrics (custom_metrics v1beta1 / v1beta2, external_metrics v1beta1) and
k8s.io/apimachinery (APIGroupList, APIGroup, APIResourceList, Status). Pure functions.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from exporter.adapter.provider import ExternalValue, MetricInfo, MetricValue
from exporter.adapter.quantity import format_quantity

CUSTOM = "custom.metrics.k8s.io"
EXTERNAL = "external.metrics.k8s.io"
VERSIONS = {CUSTOM: ("v1beta2", "v1beta1"), EXTERNAL: ("v1beta1",)}  # preferred first


def _group(name: str) -> dict[str, Any]:
    versions = [{"groupVersion": f"{name}/{v}", "version": v} for v in VERSIONS[name]]
    return {"name": name, "versions": versions, "preferredVersion": versions[0]}


def group_list() -> dict[str, Any]:
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group(CUSTOM), _group(EXTERNAL)]}


def group(name: str) -> dict[str, Any]:
    return {"kind": "APIGroup", "apiVersion": "v1", **_group(name)}


def custom_resources(version: str, metrics: list[MetricInfo]) -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{CUSTOM}/{version}",
        "resources": [
            {
                "name": f"{m.resource}/{m.metric}",
                "singularName": "",
                "namespaced": m.namespaced,
                "kind": "MetricValueList",
                "verbs": ["get"],
            }
            for m in metrics
        ],
    }


def external_resources(metrics: list[str]) -> dict[str, Any]:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{EXTERNAL}/v1beta1",
        "resources": [
            {"name": m, "singularName": "", "namespaced": True, "kind": "ExternalMetricValueList", "verbs": ["get"]}
            for m in metrics
        ],
    }


def _time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def metric_value_list(version: str, values: list[MetricValue]) -> dict[str, Any]:
    """A MetricValueList in the version's own shape (no metric label selectors: ``selector`` is null)."""
    items = []
    times: dict[float, str] = {}  # most items share a scrape time: format each once
    for v in values:
        when = times.get(v.timestamp) or times.setdefault(v.timestamp, _time(v.timestamp))
        item: dict[str, Any] = {
            "describedObject": {"kind": v.kind, "namespace": v.namespace, "name": v.name, "apiVersion": "/v1"},
        }
        if not v.namespace:
            del item["describedObject"]["namespace"]
        if version == "v1beta1":
            item.update(
                metricName=v.metric,
                timestamp=when,
                window=v.window_seconds,
                value=format_quantity(v.value),
                selector=None,
            )
        else:
            item.update(
                metric={"name": v.metric, "selector": None},
                timestamp=when,
                windowSeconds=v.window_seconds,
                value=format_quantity(v.value),
            )
        items.append(item)
    return {"kind": "MetricValueList", "apiVersion": f"{CUSTOM}/{version}", "metadata": {}, "items": items}


def external_value_list(values: list[ExternalValue]) -> dict[str, Any]:
    return {
        "kind": "ExternalMetricValueList",
        "apiVersion": f"{EXTERNAL}/v1beta1",
        "metadata": {},
        "items": [
            {
                "metricName": v.metric,
                "metricLabels": dict(v.labels),
                "timestamp": _time(v.timestamp),
                "window": v.window_seconds,
                "value": format_quantity(v.value),
            }
            for v in values
        ],
    }


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


# Object names as the API validates them: namespaces are DNS labels, most objects DNS subdomains.
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_RESOURCE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


@dataclass(frozen=True)
class Route:
    """What a request path asks for. For custom metrics, ``namespace`` is the namespace whose data the
    answer holds: the Pod's, or for a Namespace object the namespace itself (as kube-apiserver's
    RequestInfo names it for ``GET /api/v1/namespaces/{name}``); None for other root-scoped objects."""

    kind: str  # "groups", "group", "resources", "custom", "external"
    group: str = ""
    version: str = ""
    namespace: str | None = None
    resource: str = ""  # "pods", "namespaces", ...
    name: str = ""  # object name, or "*" for every object the label selector picks
    metric: str = ""


def route(path: str) -> Route | None:
    """Parses an API path by the custom and external metrics APIs' grammar; None (404) for anything
    else. Custom metrics::

        /namespaces/{namespace}/{resource}/{name}/{metric}   a namespaced object; resource is not
                                                               "namespaces"
        /namespaces/{name}/metrics/{metric}                   the Namespace object itself
        /{resource}/{name}/{metric}                           a root-scoped object

    External metrics: ``/namespaces/{namespace}/{metric}``. Names must be valid object names, so a
    path can never name one namespace and reach into another."""
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if parts == ["apis"]:
        return Route("groups")
    if len(parts) < 2 or parts[0] != "apis" or parts[1] not in VERSIONS:
        return None
    group_name = parts[1]
    if len(parts) == 2:
        return Route("group", group_name)
    version, rest = parts[2], parts[3:]
    if version not in VERSIONS[group_name]:
        return None
    if not rest:
        return Route("resources", group_name, version)
    if any(not part for part in rest):
        return None
    if group_name == EXTERNAL:
        if len(rest) == 3 and rest[0] == "namespaces" and DNS_LABEL.fullmatch(rest[1]):
            return Route("external", group_name, version, namespace=rest[1], metric=rest[2])
        return None
    if rest[0] == "namespaces" and len(rest) in (4, 5) and not DNS_LABEL.fullmatch(rest[1]):
        return None
    if len(rest) == 4 and rest[0] == "namespaces" and rest[2] == "metrics":
        return Route("custom", group_name, version, rest[1], "namespaces", rest[1], rest[3])
    if len(rest) == 5 and rest[0] == "namespaces":
        resource, name = rest[2], rest[3]
        if resource == "namespaces" or not _RESOURCE.fullmatch(resource) or not _object_name(name):
            return None
        return Route("custom", group_name, version, rest[1], resource, name, rest[4])
    if len(rest) == 3:
        resource, name = rest[0], rest[1]
        if resource == "namespaces":  # the Namespace object, root-scoped form
            return (
                Route("custom", group_name, version, name, resource, name, rest[2])
                if DNS_LABEL.fullmatch(name)
                else None
            )
        if not _RESOURCE.fullmatch(resource) or not _object_name(name):
            return None
        return Route("custom", group_name, version, None, resource, name, rest[2])
    return None


def _object_name(name: str) -> bool:
    return name == "*" or bool(_DNS_SUBDOMAIN.fullmatch(name))
