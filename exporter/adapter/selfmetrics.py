"""The adapter's own metrics, served at /metrics on its HTTPS port: requests by verb, API group,
resource and code with their latencies (as kube-apiserver's ``apiserver_request_*``), Prometheus's
failed queries by kind, whether Prometheus answers, whether each APIService points at this
adapter, and how full the caches are. Gauges are read when scraped, from callables the wiring
registers; one not known yet (Prometheus not probed, APIServices not read) is absent, never 0."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

# From a cached answer (milliseconds) to a query at --prometheus-timeout's default (10 s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Gauges(Collector):
    def __init__(self) -> None:
        self.prometheus_up: Callable[[], bool | None] = lambda: None
        self.apiservices_owned: Callable[[], Mapping[str, bool]] = dict
        self.cache_entries: dict[str, Callable[[], int]] = {}

    def collect(self) -> Iterator[Metric]:
        up = self.prometheus_up()
        family = GaugeMetricFamily(
            "gpu_adapter_prometheus_up", "1 if Prometheus answered the adapter's latest query or probe, else 0"
        )
        if up is not None:
            family.add_metric([], 1.0 if up else 0.0)
        yield family
        owned = GaugeMetricFamily(
            "gpu_adapter_apiservice_owned",
            "1 if the APIService points at this adapter's Service, 0 if elsewhere or absent",
            labels=["apiservice"],
        )
        for name, ours in sorted(self.apiservices_owned().items()):
            owned.add_metric([name], 1.0 if ours else 0.0)
        yield owned
        entries = GaugeMetricFamily("gpu_adapter_cache_entries", "Entries held by each cache", labels=["cache"])
        for cache, size in sorted(self.cache_entries.items()):
            entries.add_metric([cache], float(size()))
        yield entries

    def describe(self) -> Iterator[Metric]:
        return iter(())  # read when scraped: describing would call the callables at registration


class SelfMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.gauges = _Gauges()
        self.registry.register(self.gauges)
        self._requests = Counter(
            "gpu_adapter_requests",
            "Requests answered, by verb, API group, resource and HTTP code",
            ["verb", "group", "resource", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "gpu_adapter_request_duration_seconds",
            "Time from a whole request to its answer, by verb, API group and resource",
            ["verb", "group", "resource"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._prometheus_errors = Counter(
            "gpu_adapter_prometheus_errors",
            "Queries Prometheus failed, by kind: unavailable (no answer in time), refused (a rule's PromQL) "
            "or malformed (an answer not shaped as Prometheus's API)",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("unavailable", "refused", "malformed"):  # counted from 0, so rate() sees the first failure
            self._prometheus_errors.labels(kind)

    def observe_request(self, verb: str, group: str, resource: str, code: int, seconds: float) -> None:
        self._requests.labels(verb, group, resource, str(code)).inc()
        self._latency.labels(verb, group, resource).observe(seconds)

    def count_prometheus_error(self, kind: str) -> None:
        self._prometheus_errors.labels(kind).inc()

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
