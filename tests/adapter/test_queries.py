"""The PromQL the adapter builds from its rules (``pods_query``, ``namespace_query``,
``external_query``), run by a real Prometheus and VictoriaMetrics over known series, through the
provider the API serves from: each pod's value and the time of its newest sample, under both
namings of the namespace/pod labels, a namespace's aggregate, and external selectors.

The series are a static exposition with explicit sample times, served from a local HTTP server and
scraped with honor_labels (as tests/adapter/test_keda.py serves kube-state-metrics' series), so
every answer is known before the query runs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from exporter.adapter.prometheus import PrometheusClient, PrometheusProvider
from exporter.adapter.provider import MetricInfo
from exporter.adapter.rules import DEFAULT_RULES, load_rules
from exporter.adapter.selector import Selector, parse_selector
from exporter.exposition.httpserver import Handler, Server
from sim.processes import free_port
from sim.prometheus import Prometheus


@dataclass(frozen=True)
class Series:
    """One GPU's series: its labels beyond ``gpu``, utilisation, and age of its sample (seconds)."""

    labels: dict[str, str]
    duty: float
    age_s: float


def memory(gpu: int) -> float:
    """GPU ``gpu``'s memory used, in bytes: each GPU's differs."""
    return (gpu + 1) * 1e9


GPUS = {
    # Namespace "ml", labels as the agent writes them under honor_labels.
    0: Series({"namespace": "ml", "pod": "train-0", "node": "node-a"}, 30, 20),
    1: Series({"namespace": "ml", "pod": "train-0", "node": "node-b"}, 50, 5),
    2: Series({"namespace": "ml", "pod": "serve-0", "node": "node-a"}, 70, 10),
    3: Series({"namespace": "ml", "pod": "canary-0", "node": "node-a", "canary": "true"}, 14, 12),
    4: Series({"namespace": "ml", "pod": "other-0", "node": "node-c"}, 90, 3),
    # Scraped without honor_labels: the scrape target's (an agent's) namespace and pod in
    # namespace/pod, the measured pod's in exported_namespace/exported_pod. These are speech's GPUs,
    # never ml's nor gpu-system's, though ml's is the newest sample of all.
    5: Series(
        {"namespace": "ml", "pod": "agent-0", "exported_namespace": "speech", "exported_pod": "whisper-0"}, 20, 2
    ),
    6: Series(
        {"namespace": "gpu-system", "pod": "agent-1", "exported_namespace": "speech", "exported_pod": "whisper-0"},
        80,
        1,
    ),
    # Only the exported pair.
    7: Series({"exported_namespace": "speech", "exported_pod": "asr-0", "node": "node-a"}, 64, 4),
    # Label keys a Kubernetes selector spells otherwise ("app.kubernetes.io/name" and so on).
    8: Series(
        {"namespace": "keys", "pod": "k-0", "app_kubernetes_io_name": "bert", "_lives": "a", "team_x": "y"}, 11, 1
    ),
    9: Series({"namespace": "keys", "pod": "k-1", "app_kubernetes_io_name": "bert", "_lives": "b"}, 22, 1),
    10: Series(
        {"namespace": "keys", "pod": "k-2", "app_kubernetes_io_name": "gpt", "_lives": "a", "team_x": ""}, 33, 1
    ),
    11: Series(
        {
            "namespace": "keys",
            "pod": "k-3",
            "app_kubernetes_io_name": "bert",
            "_lives": "a",
            "team_x": "y",
            "example_com_canary": "1",
        },
        44,
        1,
    ),
}
# A custom rules file's labels: k8s_namespace/k8s_pod.
BUSY = [("a", "p-0", 0.25, 9), ("a", "p-0", 0.5, 12), ("a", "p-1", 0.75, 6), ("b", "p-0", 0.9, 1)]


def labels_text(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items() if v)


def exposition(now: float) -> str:
    """The series, their samples' times counting back from ``now``."""
    lines = []
    for gpu, series in GPUS.items():
        labels = labels_text({"gpu": str(gpu), **series.labels})
        at = int((now - series.age_s) * 1000)
        lines.append(f"duty_cycle_current{{{labels}}} {series.duty} {at}")
        lines.append(f"memory_used_bytes_current{{{labels}}} {memory(gpu)} {at}")
    for i, (namespace, pod, value, age_s) in enumerate(BUSY):
        labels = labels_text({"k8s_namespace": namespace, "k8s_pod": pod, "gpu": str(i)})
        lines.append(f"gpu_busy{{{labels}}} {value} {int((now - age_s) * 1000)}")
    return "\n".join(lines) + "\n"


class _Series(Handler):
    now = 0.0

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send(200, exposition(self.now).encode(), "text/plain; version=0.0.4")


@dataclass(frozen=True)
class Store:
    prometheus: Prometheus
    now: float  # the samples' times count back from here

    def answer(self, gpus: list[int], combine: str) -> tuple[float, float]:
        """What the rule gives over ``gpus``: the average or total, at the newest sample's time
        (rounded as the tests round Prometheus's answers, whose order of summing is its own)."""
        values = [GPUS[g].duty if combine == "avg" else memory(g) for g in gpus]
        value = sum(values) / len(values) if combine == "avg" else sum(values)
        return round(value, 6), self.now - min(GPUS[g].age_s for g in gpus)


@pytest.fixture(scope="module", params=["prometheus", "victoria-metrics"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    directory = tmp_path_factory.mktemp(f"queries-{request.param}")
    now = float(int(time.time()))
    handler = type("Series", (_Series,), {"now": now})
    server = Server(("127.0.0.1", 0), handler, None)
    server.start()
    prometheus = Prometheus(directory, [f"127.0.0.1:{server.server_address[1]}"], free_port(), kind=request.param)
    try:
        prometheus.wait_for(f"count(duty_cycle_current) == {len(GPUS)} and count(gpu_busy) == {len(BUSY)}")
        yield Store(prometheus, now)
    finally:
        prometheus.stop()
        server.stop()


def every_pod(namespace: str, selector: Selector) -> list[str]:
    """The pod cache's answer: every name a series could carry, so the query alone decides."""
    names = {s.labels.get(key, "") for s in GPUS.values() for key in ("pod", "exported_pod")}
    return sorted(names - {""} | {pod for _, pod, _, _ in BUSY})


def provider(store: Store, rules_text: str | None = None) -> PrometheusProvider:
    rules = load_rules(rules_text, "rules.yaml") if rules_text else DEFAULT_RULES
    # The samples are dated up to 20 s back and scraped again and again: a window as long as an
    # instant query's lookback (5 min) averages each series' one sample, whenever the test runs.
    return PrometheusProvider(rules, PrometheusClient(store.prometheus.url, timeout_s=10), every_pod, window_s=300)


def pods(store: Store, metric: str, namespace: str, rules_text: str | None = None) -> dict[str, tuple[float, float]]:
    """Pod name -> (value, time of the newest sample behind it), as the HPA is answered."""
    values = provider(store, rules_text).get_metric_by_selector(
        namespace, parse_selector(""), MetricInfo("pods", metric, True)
    )
    assert all(v.namespace == namespace for v in values)
    return {v.name: (round(v.value, 6), v.timestamp) for v in values}


def test_each_pod_gets_the_average_utilisation_over_its_gpus_and_its_newest_samples_time(store: Store) -> None:
    assert pods(store, "duty_cycle_current", "ml") == {
        "train-0": store.answer([0, 1], "avg"),  # (30 + 50) / 2, at GPU 1's time, the newer
        "serve-0": store.answer([2], "avg"),
        "canary-0": store.answer([3], "avg"),
        "other-0": store.answer([4], "avg"),
    }  # not agent-0: its series carries the exported pair, so it is speech's whisper-0's


def test_each_pod_gets_the_total_memory_over_its_gpus(store: Store) -> None:
    found = pods(store, "memory_used_bytes_current", "ml")
    assert found["train-0"] == store.answer([0, 1], "sum") == (3e9, store.now - 5)


def test_a_series_carrying_the_exported_pair_is_attributed_by_it_alone(store: Store) -> None:
    assert pods(store, "duty_cycle_current", "speech") == {
        "whisper-0": store.answer([5, 6], "avg"),  # one pod, whichever agent's namespace/pod each GPU came with
        "asr-0": store.answer([7], "avg"),  # the exported pair alone
    }
    # The scrape targets' namespace holds no GPU of its own.
    assert pods(store, "duty_cycle_current", "gpu-system") == {}


def test_a_rules_files_own_label_names_are_mapped_back_to_namespace_and_pod(store: Store) -> None:
    rules = (
        "rules:\n- seriesQuery: gpu_busy\n  metricsQuery: max by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>})\n"
        "  resources: {namespace: [k8s_namespace], pod: [k8s_pod]}\n"
    )
    # p-0's two GPUs: the larger value (max), at the newer of the two times
    assert pods(store, "gpu_busy", "a", rules) == {"p-0": (0.5, store.now - 9), "p-1": (0.75, store.now - 6)}


def test_a_namespaces_metric_is_the_rule_over_its_pods_series(store: Store) -> None:
    for metric, combine in (("memory_used_bytes_current", "sum"), ("duty_cycle_current", "avg")):
        found = provider(store).get_metric_by_name("", "ml", MetricInfo("namespaces", metric, False))
        assert found is not None
        # GPUs 0-4; not GPU 5 (speech's), though it is newer than all of them
        assert (found.kind, found.name) == ("Namespace", "ml")
        assert (round(found.value, 6), found.timestamp) == store.answer([0, 1, 2, 3, 4], combine)
    missing = provider(store).get_metric_by_name("", "nowhere", MetricInfo("namespaces", "duty_cycle_current", False))
    assert missing is None  # no series: no value, never 0


@pytest.mark.parametrize(
    ("selector", "gpus"),
    [
        ("node in (node-a,node-b),pod!=serve-0,!canary", [0, 1]),
        ("pod!=serve-0,!canary", [0, 1, 4]),  # without `in`, other-0 on node-c counts
        ("node in (node-a,node-b),!canary", [0, 1, 2]),  # without `!=`, serve-0 counts
        ("node in (node-a,node-b),pod!=serve-0", [0, 1, 3]),  # without `!key`, canary-0 counts
        ("node notin (node-a),canary", []),  # nothing left: no value, never 0
        ("", [0, 1, 2, 3, 4]),  # not GPU 5: speech's
    ],
)
def test_an_external_metric_is_the_rule_over_the_series_its_selector_picks(
    store: Store, selector: str, gpus: list[int]
) -> None:
    found = provider(store).get_external_metric("ml", "gpu_duty_cycle", parse_selector(selector))
    expected = [store.answer(gpus, "avg")] if gpus else []
    assert [(round(v.value, 6), v.timestamp) for v in found] == expected
    assert all(v.labels == {} and v.metric == "gpu_duty_cycle" for v in found)


def test_an_external_selector_on_keys_kubernetes_spells_otherwise(store: Store) -> None:
    """Keys with '.', '/', '-' or a leading digit are sanitised as Prometheus sanitises them: raw,
    Prometheus refused the query."""
    selector = parse_selector("app.kubernetes.io/name=bert,9lives in (a,b),!example.com/canary,team-x")
    found = provider(store).get_external_metric("keys", "gpu_duty_cycle", selector)
    # k-0 alone: k-1 lacks team_x, k-2 is gpt, k-3 is a canary
    assert [v.value for v in found] == [GPUS[8].duty]
