"""``--metrics-window``: the built-in rules serve each gauge's average over the window, not its
latest sample, run by a real Prometheus over a series whose every sample is known.

The series is served one sample per scrape, each with an explicit time a second after the one
before (the last one again once all are in), so Prometheus holds exactly those samples. Another
pod's series is in the first scrape only: within the window, but gone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from exporter.adapter.prometheus import PrometheusClient, PrometheusProvider
from exporter.adapter.provider import MetricInfo
from exporter.adapter.rules import DEFAULT_RULES, load_rules
from exporter.adapter.selector import parse_selector
from exporter.exposition.httpserver import Handler, Server
from sim.processes import free_port
from sim.prometheus import Prometheus

VALUES = (10.0, 20.0, 30.0, 100.0)  # the latest is 100, the average 40
INSTANT_RULES = (
    "rules:\n- name: duty_cycle_current\n  seriesQuery: duty_cycle_current\n"
    "  metricsQuery: avg by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})\n"
)


class _OneSampleAScrape(Handler):
    start_ms = 0
    served = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        cls = type(self)
        i = min(cls.served, len(VALUES) - 1)
        cls.served += 1
        at = cls.start_ms + 1000 * i
        series = f'duty_cycle_current{{namespace="ml",pod="p-0"}} {VALUES[i]} {at}\n'
        if i == 0:  # p-1 in the first scrape only, at the scrape's time: then Prometheus marks it stale
            series += 'duty_cycle_current{namespace="ml",pod="p-1"} 50\n'
        self.send(200, series.encode(), "text/plain")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    # Dated in the last few seconds, so a 15 s window still holds them all while the tests run.
    handler = type("Samples", (_OneSampleAScrape,), {"start_ms": int((time.time() - len(VALUES)) * 1000)})
    server = Server(("127.0.0.1", 0), handler, None)
    server.start()
    store = Prometheus(tmp_path_factory.mktemp("window"), [f"127.0.0.1:{server.server_address[1]}"], free_port())
    try:
        store.wait_for(f'count_over_time(duty_cycle_current{{pod="p-0"}}[1h]) == {len(VALUES)}')
        yield store
    finally:
        store.stop()
        server.stop()


def provider(prometheus: Prometheus, rules_text: str | None = None) -> PrometheusProvider:
    rules = load_rules(rules_text, "rules.yaml") if rules_text else DEFAULT_RULES
    return PrometheusProvider(rules, PrometheusClient(prometheus.url), lambda ns, sel: ["p-0", "p-1"], window_s=15)


def test_a_pods_value_is_the_average_over_the_window_and_says_so(prometheus: Prometheus) -> None:
    found = provider(prometheus).get_metric_by_selector(
        "ml", parse_selector(""), MetricInfo("pods", "duty_cycle_current", True)
    )
    # Not p-1, nor in the aggregates: its sample is in the window, but its series is gone (stale).
    assert [(v.name, v.value, v.window_seconds) for v in found] == [("p-0", 40.0, 15)]
    namespace = provider(prometheus).get_metric_by_name("", "ml", MetricInfo("namespaces", "duty_cycle_current", False))
    assert namespace is not None and (namespace.value, namespace.window_seconds) == (40.0, 15)
    external = provider(prometheus).get_external_metric("ml", "gpu_duty_cycle", parse_selector(""))
    assert [(v.value, v.window_seconds) for v in external] == [(40.0, 15)]


def test_a_rule_without_the_window_serves_the_latest_sample(prometheus: Prometheus) -> None:
    found = provider(prometheus, INSTANT_RULES).get_metric_by_selector(
        "ml", parse_selector(""), MetricInfo("pods", "duty_cycle_current", True)
    )
    assert [(v.value, v.window_seconds) for v in found] == [(100.0, 1)]


def test_a_windowed_rule_of_ones_own_leaves_a_gone_series_out_rather_than_undated(prometheus: Prometheus) -> None:
    """Without ``and <<.Series>>{...}``, p-1's window still averages its sample, but no current
    sample dates it: left out, never served as measured in 1970."""
    windowed = "(avg_over_time(<<.Series>>{<<.LabelMatchers>>}[<<.Window>>]))"
    rules = INSTANT_RULES.replace("(<<.Series>>{<<.LabelMatchers>>})", windowed)
    found = provider(prometheus, rules).get_metric_by_selector(
        "ml", parse_selector(""), MetricInfo("pods", "duty_cycle_current", True)
    )
    assert [(v.name, v.value) for v in found] == [("p-0", 40.0)]
