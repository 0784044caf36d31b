"""What the HTTP layer and the metric sources share, in the shape of custom-metrics-apiserver's
providers: the value types, the provider interfaces (list all, get by name, get by selector, and the
external equivalent), and the errors a provider may raise. Nothing here knows HTTP or Prometheus."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from exporter.adapter.selector import Selector

# A gauge sample covers NVML's sampling period: at most one second on current GPUs.
WINDOW_SECONDS = 1


def window_seconds(windowed: bool, window_s: int) -> int:
    """The window an answer covers: the metrics window for a rule averaging over it, else one sample's."""
    return window_s if windowed else WINDOW_SECONDS


class ProviderError(Exception):
    """A request the provider cannot answer. The message is for the client: short, and never a
    backend's own error text (providers log that)."""


class MetricNotFoundError(ProviderError):
    """No rule serves this metric for this resource: 404."""


class BadRequestError(ProviderError):
    """The request cannot be turned into a query (a label key no series can carry): 400."""


class UnavailableError(ProviderError):
    """Not answerable now (the metrics backend is down, the pod cache not synced yet): 503."""


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

    def get_metric_by_name(self, namespace: str, name: str, info: MetricInfo) -> MetricValue | None:
        """The Pod ``namespace/name``; for a Namespace object ``namespace`` is its own name."""
        ...

    def get_metric_by_selector(self, namespace: str, selector: Selector, info: MetricInfo) -> list[MetricValue]: ...


class ExternalMetricsProvider(Protocol):
    def list_all_external_metrics(self) -> list[str]: ...

    def get_external_metric(self, namespace: str, metric: str, selector: Selector) -> list[ExternalValue]: ...
