"""What the adapter says about its surroundings without taking its API down, as a process over
real TLS: Prometheus out of reach (a log line per change of state, ``gpu_adapter_prometheus_up``,
a line in ``/readyz?verbose``, readiness unaffected), whether each APIService points at its Service
(the APIServices read from sim/apiserver.py as kube-apiserver serves them), and its own metrics
at /metrics for whom a SubjectAccessReview allows ``get /metrics``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sim.apiserver import FakeApiServer, api_service_json
from sim.certs import Pki, make_pki
from sim.processes import Process, free_port, start_adapter
from sim.prometheus import Prometheus
from tests.adapter.test_renamed_labels import Cluster
from tests.adapter.test_trust import until
from tests.conftest import Samples, find, parse_samples

OURS = ("gpu-monitoring", "gpu-metrics-adapter")
SCRAPER = "system:serviceaccount:monitoring:prometheus-k8s"
NAMESPACE_METRIC = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/metrics/duty_cycle_current"


class Running(Cluster):
    def __init__(self, url: str, pki: Pki, api: FakeApiServer, adapter: Process, port: int, directory: Path) -> None:
        super().__init__(url, pki, api)
        self.adapter, self.prometheus_port, self.directory = adapter, port, directory

    def get(self, path: str, user: str = SCRAPER) -> requests.Response:
        return super().get(path, user)

    def readyz(self) -> str:
        response = requests.get(self.url + "/readyz?verbose", verify=str(self.pki.ca), timeout=10)
        assert response.status_code == 200, response.text  # conditions never fail readiness
        return response.text

    def metrics(self) -> Samples:
        response = self.get("/metrics")
        assert response.status_code == 200, response.text
        return parse_samples(response.text)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    directory = tmp_path_factory.mktemp("conditions")
    api = FakeApiServer().start()
    api.api_services = {
        "v1beta2.custom.metrics.k8s.io": api_service_json("custom.metrics.k8s.io", "v1beta2", OURS),
        # Taken over by prometheus-adapter, applied after this adapter.
        "v1beta1.custom.metrics.k8s.io": api_service_json(
            "custom.metrics.k8s.io", "v1beta1", ("monitoring", "prometheus-adapter")
        ),
    }
    # Only the scraper may read /metrics; everyone may read the metrics APIs.
    api.allow = lambda spec: spec.get("nonResourceAttributes", {}).get("path") != "/metrics" or spec["user"] == SCRAPER
    pki = make_pki(directory / "pki")
    port = free_port()  # where Prometheus will be: nothing listens there yet
    adapter, url = start_adapter(
        directory,
        pki,
        api.write_kubeconfig(directory / "kubeconfig"),
        f"http://127.0.0.1:{port}",
        "--service-namespace",
        OURS[0],
    )  # ready, though Prometheus is not there
    try:
        yield Running(url, pki, api, adapter, port, directory)
    finally:
        adapter.stop()
        api.stop()


def test_an_apiservice_pointing_elsewhere_is_reported_not_a_readiness_failure(running: Running) -> None:
    assert until(lambda: "apiservice v1beta1" in running.readyz()), running.adapter.log()
    lines = running.readyz().splitlines()
    assert "[+]ready ok" in lines and lines[-1] == "readyz check passed"
    assert "[+]apiservice v1beta2.custom.metrics.k8s.io ok" in lines
    assert (
        "[-]apiservice v1beta1.custom.metrics.k8s.io failed (not a readiness check): "
        "points at the Service monitoring/prometheus-adapter"
    ) in lines
    assert not any("external" in line for line in lines)  # opt-in, not registered: nothing to say
    samples = running.metrics()
    owned = {labels["apiservice"]: value for labels, value in find(samples, "gpu_adapter_apiservice_owned")}
    assert owned == {"v1beta2.custom.metrics.k8s.io": 1.0, "v1beta1.custom.metrics.k8s.io": 0.0}
    assert running.adapter.log().count("the APIService v1beta1.custom.metrics.k8s.io pointing at") == 1


def test_the_adapters_metrics_are_for_whom_a_review_allows_get_metrics(running: Running) -> None:
    forbidden = running.get("/metrics", user="bob")
    assert forbidden.status_code == 403 and 'cannot get path "/metrics"' in forbidden.json()["message"]
    review = running.api.access_reviews[-1]
    assert (review["user"], review["nonResourceAttributes"]) == ("bob", {"path": "/metrics", "verb": "get"})
    assert running.get("/apis/custom.metrics.k8s.io/v1beta2").status_code == 200
    samples = running.metrics()
    discovery = dict(verb="get", group="custom.metrics.k8s.io", resource="", code="200")
    assert find(samples, "gpu_adapter_requests_total", **discovery)[0][1] >= 1
    assert find(samples, "gpu_adapter_requests_total", resource="/metrics", code="403")[0][1] >= 1
    assert find(samples, "gpu_adapter_request_duration_seconds_count", group="custom.metrics.k8s.io")[0][1] >= 1
    caches = {labels["cache"] for labels, _ in find(samples, "gpu_adapter_cache_entries")}
    assert caches == {"answers", "queries", "pods", "tokens", "decisions"}


def test_prometheus_out_of_reach_is_a_condition_until_it_answers(running: Running) -> None:
    assert running.get(NAMESPACE_METRIC).status_code == 503  # the API answers; the metric cannot be had
    assert until(lambda: "Prometheus is not answering" in running.readyz()), running.adapter.log()
    assert "[+]ready ok" in running.readyz().splitlines()
    samples = running.metrics()
    assert find(samples, "gpu_adapter_prometheus_up") == [({}, 0.0)]
    assert find(samples, "gpu_adapter_prometheus_errors_total", kind="unavailable")[0][1] >= 1
    assert find(samples, "gpu_adapter_prometheus_errors_total", kind="refused") == [({"kind": "refused"}, 0.0)]
    store = Prometheus(running.directory / "prometheus", ["127.0.0.1:1"], running.prometheus_port)
    try:
        # Answered (no series: 404), so Prometheus is reachable again, without waiting for the probe.
        assert until(lambda: running.get(NAMESPACE_METRIC).status_code == 404, 30), running.adapter.log()
        assert "[+]prometheus ok" in running.readyz().splitlines()
        assert find(running.metrics(), "gpu_adapter_prometheus_up") == [({}, 1.0)]
    finally:
        store.stop()
    log = running.adapter.log()
    assert log.count("reaching Prometheus failing") == 1, log  # the queries and the probe: one state
    assert log.count("reaching Prometheus recovered") == 1, log
