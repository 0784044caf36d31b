"""Metric sources behind the API, in the shape of custom-metrics-apiserver's providers: list all,
get by name, get by selector (and the external equivalent). The HTTP layer knows nothing of
Prometheus; this module knows nothing of HTTP."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from exporter.adapter.prometheus import PrometheusClient, Sample
from exporter.adapter.rules import FIELD, Rule, Rules, external_query, namespace_query, pods_query
from exporter.adapter.selector import Selector
from exporter.model import PodInfo

# A gauge sample covers NVML's sampling period: at most one second on current GPUs.
WINDOW_SECONDS = 1


class MetricNotFoundError(Exception):
    """No rule serves this metric for this resource: the API answers 404."""


@dataclass(frozen=True)
class MetricInfo:
    resource: str  # "pods" or "namespaces"
    metric: str
    namespaced: bool


@dataclass(frozen=True)
class MetricValue:
    kind: str  # "Pod" or "Namespace"
    namespace: str
    name: str
    metric: str
    value: float
    timestamp: float
    window_seconds: int = WINDOW_SECONDS


@dataclass(frozen=True)
class ExternalValue:
    metric: str
    labels: Mapping[str, str]
    value: float
    timestamp: float
    window_seconds: int = WINDOW_SECONDS


class CustomMetricsProvider(Protocol):
    def list_all_metrics(self) -> list[MetricInfo]: ...

    def get_metric_by_name(self, namespace: str, name: str, info: MetricInfo) -> MetricValue | None: ...

    def get_metric_by_selector(self, namespace: str, selector: Selector, info: MetricInfo) -> list[MetricValue]: ...


class ExternalMetricsProvider(Protocol):
    def list_all_external_metrics(self) -> list[str]: ...

    def get_external_metric(self, namespace: str, metric: str, selector: Selector) -> list[ExternalValue]: ...


class PrometheusProvider:
    """Serves the rules' metrics from Prometheus; pods for a selector come from ``pods()``, a
    watch-backed cache (UID -> PodInfo), never from a list call per request."""

    def __init__(self, rules: Rules, prometheus: PrometheusClient, pods: Callable[[], Mapping[str, PodInfo] | None]):
        self._rules = rules
        self._prometheus = prometheus
        self._pods = pods

    def list_all_metrics(self) -> list[MetricInfo]:
        """Every configured metric, always: discovery never depends on data being there."""
        return [
            MetricInfo(resource, rule.name, resource == "pods")
            for rule in self._rules.custom
            for resource in ("pods", "namespaces")
        ]

    def list_all_external_metrics(self) -> list[str]:
        return [rule.name for rule in self._rules.external]

    def _rule(self, info: MetricInfo) -> Rule:
        rule = self._rules.custom_rule(info.metric)
        if rule is None or info.resource not in ("pods", "namespaces"):
            raise MetricNotFoundError(f"the server could not find the metric {info.metric} for {info.resource}")
        return rule

    def get_metric_by_name(self, namespace: str, name: str, info: MetricInfo) -> MetricValue | None:
        rule = self._rule(info)
        if info.resource == "namespaces":
            timed = _timed_values(self._prometheus.query(namespace_query(rule, name)))
            return next((MetricValue("Namespace", "", name, info.metric, v, t) for v, t in timed.values()), None)
        values = self._pod_values(rule, namespace, [name])
        return values[0] if values else None

    def get_metric_by_selector(self, namespace: str, selector: Selector, info: MetricInfo) -> list[MetricValue]:
        rule = self._rule(info)
        if info.resource != "pods":
            raise MetricNotFoundError(f"the server could not find the metric {info.metric} for {info.resource}")
        pods = self._pods() or {}
        names = sorted(p.name for p in pods.values() if p.namespace == namespace and selector.matches(p.labels))
        return self._pod_values(rule, namespace, names)

    def _pod_values(self, rule: Rule, namespace: str, names: list[str]) -> list[MetricValue]:
        """One query for all the pods; pods without a (finite) value are left out, never 0."""
        if not names:
            return []
        found: dict[str, tuple[float, float]] = {}
        for group, timed in _timed_values(self._prometheus.query(pods_query(rule, namespace))).items():
            labels = dict(group)
            if labels.get("namespace") == namespace:
                found.setdefault(labels.get("pod", ""), timed)
        return [MetricValue("Pod", namespace, name, rule.name, *found[name]) for name in names if name in found]

    def get_external_metric(self, namespace: str, metric: str, selector: Selector) -> list[ExternalValue]:
        rule = self._rules.external_rule(metric)
        if rule is None:
            raise MetricNotFoundError(f"the server could not find the metric {metric} for external metrics")
        timed = _timed_values(self._prometheus.query(external_query(rule, namespace, selector)))
        return [ExternalValue(metric, dict(group), value, when) for group, (value, when) in timed.items()]


def _timed_values(samples: list[Sample]) -> dict[frozenset[tuple[str, str]], tuple[float, float]]:
    """Each group's value paired with its newest sample's time (see rules._timed), keyed by the
    group's labels; groups without a (finite) value are left out, whatever their time."""
    values: dict[frozenset[tuple[str, str]], float] = {}
    times: dict[frozenset[tuple[str, str]], float] = {}
    for sample in samples:
        group = frozenset((k, v) for k, v in sample.labels.items() if k != FIELD)
        field = sample.labels.get(FIELD)
        if field == "value":
            values.setdefault(group, sample.value)
        elif field == "timestamp":
            times[group] = max(times.get(group, sample.value), sample.value)
    return {group: (value, times.get(group, 0.0)) for group, value in values.items()}
