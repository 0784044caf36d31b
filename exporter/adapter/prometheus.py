"""The metrics behind the API, from Prometheus: the HTTP API client (``/api/v1/query``) and the
provider that turns the rules into instant queries.

Works with anything that serves that API: Prometheus, VictoriaMetrics, and the Thanos and Mimir
query frontends. NaN and infinite values are dropped here, so a missing value can never reach the
HPA as a number. Series the agent stopped exporting are already gone: Prometheus writes a
staleness marker when a series disappears from a scrape or a scrape fails. What Prometheus says
when it fails goes to the log, never to the API's clients.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from exporter.adapter.promauth import CredentialsError, redacted
from exporter.adapter.provider import (
    ExternalValue,
    MetricInfo,
    MetricNotFoundError,
    MetricValue,
    ProviderError,
    UnavailableError,
    window_seconds,
)
from exporter.adapter.rules import DEFAULT_WINDOW_S, Rule, Rules, quote, selector_matchers
from exporter.adapter.selector import Selector
from exporter.adapter.sharing import SharedAnswers
from exporter.supervise import StateLog

log = logging.getLogger(__name__)


class PrometheusUnavailableError(Exception):
    """Prometheus could not answer (down, timing out, or failing)."""


class PrometheusMalformedAnswerError(PrometheusUnavailableError):
    """Prometheus (or what stands in its place) answered 200 with a body not shaped as its API's:
    as good as no answer, and counted apart."""


class PrometheusQueryError(Exception):
    """Prometheus rejected the query (a rule's PromQL it cannot run)."""


@dataclass(frozen=True)
class Sample:
    labels: dict[str, str]
    value: float
    timestamp: float  # Prometheus's evaluation time, seconds since the epoch


class PrometheusClient:
    """``timeout_s`` bounds each query as a whole: requests' own timeout bounds each read only, and a
    Prometheus (or a proxy before it) sending a byte now and then would hold the caller for ever.
    Until the answer's head is in, each read waits at most ``timeout_s``; from then on a timer cuts
    the connection when the whole time is up."""

    def __init__(
        self, url: str, timeout_s: float = 10.0, session: requests.Session | None = None, verb: str = "POST"
    ) -> None:
        self.url = url.rstrip("/")
        self.where = redacted(self.url)  # what logs and errors may show
        self.timeout_s = timeout_s
        self.verb = verb  # POST keeps long queries out of URLs; some front ends take GET only
        self._session = session or requests.Session()

    def query(self, promql: str) -> list[Sample]:
        """An instant query's vector, without NaN or infinite samples."""
        deadline = time.monotonic() + self.timeout_s
        try:
            query, post = {"query": promql}, self.verb == "POST"
            with self._session.request(
                self.verb,
                f"{self.url}/api/v1/query",
                data=query if post else None,
                params=None if post else query,
                timeout=self.timeout_s,
                stream=True,
            ) as response:
                _read_by(response, deadline)
            if time.monotonic() > deadline:
                raise requests.Timeout(f"no whole answer within {self.timeout_s:g} s")
        except requests.RequestException as error:
            # Only the type: requests' texts can quote the request, a credentials error says which file.
            reason = str(error) if isinstance(error, CredentialsError) else type(error).__name__
            raise PrometheusUnavailableError(f"querying {self.where}: {reason}") from error
        if response.status_code in (400, 422):
            refusal = _json(response, self.where)
            raise PrometheusQueryError(str(refusal.get("error") or response.text[:200]))
        if response.status_code in (401, 403):
            raise PrometheusUnavailableError(
                f"{self.where} refused the adapter's credentials (HTTP {response.status_code}): see the "
                "--prometheus-token-file, --prometheus-auth-config and --prometheus-header flags"
            )
        if response.status_code != 200:
            raise PrometheusUnavailableError(f"{self.where} answered {response.status_code}")
        body = _json(response, self.where)
        if body.get("status") == "error":
            raise PrometheusQueryError(f"unexpected answer: {body.get('error')}")
        data = body.get("data")
        result = data.get("result") if isinstance(data, dict) else None
        if body.get("status") != "success" or not isinstance(data, dict) or not isinstance(result, list | None):
            raise PrometheusMalformedAnswerError(f"{self.where} answered a malformed body: no {{data: {{result}}}}")
        if data.get("resultType") != "vector":
            raise PrometheusQueryError(f"unexpected answer: {data.get('resultType')}")
        samples = []
        for item in result or ():
            sample = _sample(item)
            if sample is None:
                raise PrometheusMalformedAnswerError(
                    f"{self.where} answered a malformed body: a sample is not {{metric: {{name: string}}, "
                    "value: [time, string]}"
                )
            if math.isfinite(sample.value):
                samples.append(sample)
        return samples


def _json(response: requests.Response, where: str) -> dict[str, Any]:
    """The answer's JSON object; a body that is not one is a malformed answer (its text never
    quoted: an error page may be long, and says nothing the status does not)."""
    try:
        body = response.json()
    except ValueError:
        raise PrometheusMalformedAnswerError(f"{where} answered a body that is not JSON") from None
    if not isinstance(body, dict):
        raise PrometheusMalformedAnswerError(f"{where} answered JSON that is not an object")
    return body


def _sample(item: object) -> Sample | None:
    """One element of a vector as Prometheus's API writes it, or None if it is not shaped so."""
    if not isinstance(item, dict):
        return None
    labels, pair = item.get("metric", {}), item.get("value")
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        return None
    if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[1], str):
        return None
    timestamp, text = pair
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        return None
    try:
        return Sample(labels=labels, value=float(text), timestamp=float(timestamp))
    except ValueError:  # a value that is no number
        return None


def _read_by(response: requests.Response, deadline: float) -> None:
    """Reads the whole body, cutting the connection at ``deadline`` (a shut-down socket ends the
    read at once with an error; the connection is then discarded, never reused)."""
    connection = getattr(response.raw, "connection", None)
    sock: socket.socket | None = getattr(connection, "sock", None)
    if sock is None:  # already read whole with the head
        response.content  # noqa: B018 (reads the body)
        return
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _cut, (sock,))
    timer.daemon = True
    timer.start()
    try:
        response.content  # noqa: B018 (reads the body)
    finally:
        timer.cancel()


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # closed meanwhile
        sock.shutdown(socket.SHUT_RDWR)


# Each query answers two things per group: the value and, labelled apart, the time of the newest
# sample behind it, so an answer's timestamp is when the GPU was measured, not when it was asked.
_FIELD = "gpu_adapter_field"


def _timed(rule: Rule, matchers: str, group_by: str, window_s: int) -> str:
    value = rule.render(matchers, group_by, window_s)
    grouping = f" by ({group_by})" if group_by else ""
    newest = f"max{grouping} (timestamp({rule.series_query}{{{matchers}}}))"
    return (
        f'label_replace({value}, "{_FIELD}", "value", "", "") or '
        f'label_replace({newest}, "{_FIELD}", "timestamp", "", "")'
    )


def _object_matchers(rule: Rule, naming: int, namespace: str, pods_only: bool = True) -> list[str]:
    """Matchers for the namespace's pod series by the rule's ``naming``-th pair of namespace/pod
    labels. A series that also carries a later pair is that pair's, never this one's: without
    honor_labels a scrape keeps the agent's own namespace and pod in ``namespace``/``pod`` and the
    measured pod's in ``exported_namespace``/``exported_pod``, and matching ``namespace`` alone
    would hand every namespace's GPUs to the agent's namespace."""
    namespaces, pods = rule.resources["namespace"], rule.resources["pod"]
    own = (namespaces[naming], pods[naming])
    later = dict.fromkeys([*namespaces[naming + 1 :], *pods[naming + 1 :]])
    absent = [f'{label}=""' for label in later if label not in own]
    return [f"{own[0]}={quote(namespace)}", *([f'{own[1]}!=""'] if pods_only else []), *absent]


def pods_query(rule: Rule, namespace: str, window_s: int = DEFAULT_WINDOW_S) -> str:
    """One query for every pod of a namespace, whatever the number a request selects: the caller
    keeps the pods it wants. Matching the namespace alone is cheaper for Prometheus than a regex of
    hundreds of pod names. Every naming of the
    namespace/pod labels the rule allows is tried, and renamed ones are mapped back, so the result
    is grouped by (namespace, pod) whichever the scrape config used."""
    alternatives = []
    for naming, (ns_label, pod_label) in enumerate(
        zip(rule.resources["namespace"], rule.resources["pod"], strict=True)
    ):
        matchers = ",".join(_object_matchers(rule, naming, namespace))
        query = _timed(rule, matchers, f"{ns_label},{pod_label}", window_s)
        if (ns_label, pod_label) != ("namespace", "pod"):
            query = (
                f'label_replace(label_replace({query}, "namespace", "$1", "{ns_label}", "(.*)"), '
                f'"pod", "$1", "{pod_label}", "(.*)")'
            )
        alternatives.append(query)
    return " or ".join(alternatives)


def namespace_query(rule: Rule, namespace: str, window_s: int = DEFAULT_WINDOW_S) -> str:
    """The rule's aggregate over all the namespace's pods (the Namespace object's metric), by the
    first naming of the labels."""
    matchers = ",".join(_object_matchers(rule, 0, namespace))
    return _timed(rule, matchers, rule.resources["namespace"][0], window_s)


def external_query(rule: Rule, namespace: str, selector: Selector, window_s: int = DEFAULT_WINDOW_S) -> str:
    """The rule over the namespace's series matching a metric label selector (first naming)."""
    matchers = [*_object_matchers(rule, 0, namespace, pods_only=False), *selector_matchers(selector.requirements)]
    return _timed(rule, ",".join(matchers), "", window_s)


def _timed_values(samples: list[Sample]) -> dict[frozenset[tuple[str, str]], tuple[float, float]]:
    """Each group's value paired with its newest sample's time, keyed by the group's labels; groups
    without a (finite) value are left out, whatever their time, and so are groups without a current
    sample: a series gone stale (its pod or agent gone) still has samples in the window, but is gone."""
    values: dict[frozenset[tuple[str, str]], float] = {}
    times: dict[frozenset[tuple[str, str]], float] = {}
    for sample in samples:
        group = frozenset((k, v) for k, v in sample.labels.items() if k != _FIELD)
        field = sample.labels.get(_FIELD)
        if field == "value":
            values.setdefault(group, sample.value)
        elif field == "timestamp":
            times[group] = max(times.get(group, sample.value), sample.value)
    return {group: (value, times[group]) for group, value in values.items() if group in times}


SHARED_GROUPS = 200_000  # Prometheus answers shared for a second, together at most this many groups (~30 MB)


def _by_pod(
    timed: dict[frozenset[tuple[str, str]], tuple[float, float]], namespace: str
) -> dict[str, tuple[float, float]]:
    found: dict[str, tuple[float, float]] = {}
    for group, value in timed.items():
        labels = dict(group)
        if labels.get("namespace") == namespace:
            found.setdefault(labels.get("pod", ""), value)
    return found


PodNames = Callable[[str, Selector], list[str] | None]


def unreachable_state(error: PrometheusUnavailableError) -> str:
    """How Prometheus being out of reach is logged, by the queries and the probe alike, so that
    both failing the same way is one state, logged once."""
    return f"unavailable: {error}"


class PrometheusProvider:
    """Serves the rules' metrics from Prometheus. The pods a selector picks come from ``pod_names``
    (namespace, selector -> sorted names, or None until the pod cache has synced), a watch-backed
    index, never a list call per request. Whether Prometheus answers goes to ``reachability`` (shared
    with the adapter's probe); each failed query's kind (``unavailable``, ``refused``, ``malformed``)
    to ``count_error``. Windowed rules average over ``window_s`` seconds."""

    def __init__(
        self,
        rules: Rules,
        prometheus: PrometheusClient,
        pod_names: PodNames,
        shared: SharedAnswers | None = None,
        *,
        window_s: int = DEFAULT_WINDOW_S,
        reachability: StateLog | None = None,
        count_error: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self._rules = rules
        self._prometheus = prometheus
        self._pod_names = pod_names
        self._window_s = window_s
        # A query waits for an identical one in flight no longer than that one may take.
        self.shared = shared or SharedAnswers(SHARED_GROUPS, len, wait_s=prometheus.timeout_s + 1)
        self._reachability = reachability or StateLog(log, "Prometheus")
        self._rule_queries = StateLog(log, "Prometheus")
        self._count_error = count_error

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
            timed = self._timed(namespace_query(rule, name, self._window_s))
            window = window_seconds(rule.windowed, self._window_s)
            return next(
                (MetricValue("Namespace", "", name, info.metric, v, t, window) for v, t in timed.values()), None
            )
        values = self._pod_values(rule, namespace, [name])
        return values[0] if values else None

    def get_metric_by_selector(self, namespace: str, selector: Selector, info: MetricInfo) -> list[MetricValue]:
        rule = self._rule(info)
        if info.resource != "pods":
            raise MetricNotFoundError(f"the server could not find the metric {info.metric} for {info.resource}")
        names = self._pod_names(namespace, selector)
        if names is None:
            raise UnavailableError("the adapter's pod cache has not synced yet")
        return self._pod_values(rule, namespace, names)

    def _pod_values(self, rule: Rule, namespace: str, names: list[str]) -> list[MetricValue]:
        """One query for all the pods; pods without a (finite) value are left out, never 0."""
        if not names:
            return []
        query = pods_query(rule, namespace, self._window_s)
        found: dict[str, tuple[float, float]] = self.shared.get(
            query, lambda: _by_pod(_timed_values(self._query(query)), namespace)
        )
        window = window_seconds(rule.windowed, self._window_s)
        return [MetricValue("Pod", namespace, name, rule.name, *found[name], window) for name in names if name in found]

    def get_external_metric(self, namespace: str, metric: str, selector: Selector) -> list[ExternalValue]:
        rule = self._rules.external_rule(metric)
        if rule is None:
            raise MetricNotFoundError(f"the server could not find the metric {metric} for external metrics")
        timed = self._timed(external_query(rule, namespace, selector, self._window_s))
        window = window_seconds(rule.windowed, self._window_s)
        return [ExternalValue(metric, dict(group), value, when, window) for group, (value, when) in timed.items()]

    def _timed(self, promql: str) -> dict[frozenset[tuple[str, str]], tuple[float, float]]:
        timed: dict[frozenset[tuple[str, str]], tuple[float, float]] = self.shared.get(
            promql, lambda: _timed_values(self._query(promql))
        )
        return timed

    def _query(self, promql: str) -> list[Sample]:
        """Prometheus's answer, or a provider error with a short reason; the backend's own words go to
        the log, once per change of state."""
        try:
            samples = self._prometheus.query(promql)
        except PrometheusUnavailableError as error:
            self._count_error("malformed" if isinstance(error, PrometheusMalformedAnswerError) else "unavailable")
            self._reachability.failed(unreachable_state(error))
            raise UnavailableError("the metrics backend is unavailable") from error
        except PrometheusQueryError as error:
            self._count_error("refused")
            self._reachability.recovered()  # it answered
            self._rule_queries.failed(f"refused a rule's query ({error}): {promql}")
            raise ProviderError("the metric's query failed; the adapter's log says why") from error
        self._reachability.recovered()
        self._rule_queries.recovered()
        return samples
