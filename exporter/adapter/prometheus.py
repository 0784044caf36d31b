"""The Prometheus edge: instant queries over the HTTP API (``/api/v1/query``).

Works with anything that serves that API: Prometheus, VictoriaMetrics, and the Thanos and Mimir
query frontends. NaN and infinite values are dropped here, so a missing value can never reach the
HPA as a number. Series the agent stopped exporting are already gone: Prometheus writes a
staleness marker when a series disappears from a scrape or a scrape fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import requests


class PrometheusUnavailableError(Exception):
    """Prometheus could not answer (down, timing out, or failing): the API answers 503."""


class PrometheusQueryError(Exception):
    """Prometheus rejected the query (a bad rule): the API answers 500."""


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float
    timestamp: float  # Prometheus's evaluation time, seconds since the epoch


class PrometheusClient:
    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session = requests.Session()

    def query(self, promql: str) -> list[Sample]:
        """An instant query's vector, without NaN or infinite samples."""
        try:
            response = self._session.post(f"{self.url}/api/v1/query", data={"query": promql}, timeout=self.timeout_s)
        except requests.RequestException as error:
            raise PrometheusUnavailableError(f"querying {self.url}: {type(error).__name__}") from error
        if response.status_code in (400, 422):
            raise PrometheusQueryError(response.json().get("error", response.text))
        if response.status_code != 200:
            raise PrometheusUnavailableError(f"{self.url} answered {response.status_code}")
        body = response.json()
        data = body.get("data", {})
        if body.get("status") != "success" or data.get("resultType") != "vector":
            raise PrometheusQueryError(f"unexpected answer: {body.get('error') or data.get('resultType')}")
        samples = []
        for item in data.get("result", ()):
            timestamp, text = item["value"]
            value = float(text)
            if math.isfinite(value):
                samples.append(Sample(labels=item.get("metric", {}), value=value, timestamp=float(timestamp)))
        return samples
