"""Something in Prometheus's place (a misconfigured proxy, a half-compatible backend) answering 200 with
a body not shaped as Prometheus's API, from a real HTTP server: the adapter treats it as Prometheus
failing, never as a bug. The HPA gets a 503, KEDA UNAVAILABLE, the log says so once per change of
state without a traceback, and ``gpu_adapter_prometheus_errors_total{kind="malformed"}`` counts it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest

from exporter.adapter.keda import externalscaler_pb2 as pb
from exporter.adapter.keda import externalscaler_pb2_grpc as pb_grpc
from exporter.adapter.keda.scaler import GpuScaler
from exporter.adapter.keda.server import ScalerServer
from exporter.adapter.prometheus import PrometheusClient, PrometheusMalformedAnswerError, PrometheusProvider
from exporter.adapter.rules import DEFAULT_RULES
from sim.apiserver import FakeApiServer
from sim.certs import make_pki
from sim.processes import start_adapter
from tests.adapter.test_renamed_labels import Cluster
from tests.conftest import find, parse_samples


def vector(*result: object) -> object:
    return {"status": "success", "data": {"resultType": "vector", "result": list(result)}}


MALFORMED = {
    "not JSON": "<html>502 from the proxy</html>",
    "a JSON array": [],
    "data a list": {"status": "success", "data": []},
    "result an object": {"status": "success", "data": {"resultType": "vector", "result": {"a": 1}}},
    "a null value": vector({"metric": {}, "value": None}),
    "no value": vector({"metric": {"pod": "a"}}),
    "a value that is no number": vector({"metric": {}, "value": [1, "many"]}),
    "a label value that is an object": vector({"metric": {"pod": {"name": "a"}}, "value": [1, "1"]}),
    "a sample that is a string": vector("1"),
}


class Answering:
    """A Prometheus stand-in on a real socket that answers 200 with ``body`` to every request."""

    def __init__(self) -> None:
        self.body: object = MALFORMED["a null value"]
        answering = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = answering.body
                content = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def answering() -> Iterator[Answering]:
    stand_in = Answering()
    yield stand_in
    stand_in.server.shutdown()
    stand_in.server.server_close()


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_each_malformed_answer_is_a_prometheus_failure(answering: Answering, body: object) -> None:
    answering.body = body
    with pytest.raises(PrometheusMalformedAnswerError, match=f"^{answering.url} answered "):
        PrometheusClient(answering.url, 5).query("vector(1)")


def test_keda_gets_unavailable_not_internal(answering: Answering) -> None:
    answering.body = MALFORMED["a label value that is an object"]
    provider = PrometheusProvider(DEFAULT_RULES, PrometheusClient(answering.url, 5), lambda ns, selector: ["a"])
    server = ScalerServer(("127.0.0.1", 0), GpuScaler(provider, lambda ns, selector: ["a"], 5, 1), None)
    server.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb_grpc.ExternalScalerStub(channel)  # type: ignore[no-untyped-call]  # generated code
        trigger = {"metricName": "duty_cycle_current", "podSelector": "app=a", "targetAverageValue": "20"}
        ref = pb.ScaledObjectRef(name="a", namespace="default", scalerMetadata=trigger)
        with pytest.raises(grpc.RpcError) as error:
            stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value.details()
    finally:
        server.stop()


def test_the_hpa_gets_503_the_log_one_line_and_the_self_metric_a_count(answering: Answering, tmp_path: Path) -> None:
    answering.body = MALFORMED["a null value"]
    api = FakeApiServer().start()
    pki = make_pki(tmp_path / "pki")
    adapter, url = start_adapter(tmp_path, pki, api.write_kubeconfig(tmp_path / "kubeconfig"), answering.url)
    cluster = Cluster(url, pki, api)
    try:
        for namespace in ("default", "speech"):  # two queries: answers are shared for a second
            path = f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/{namespace}/metrics/duty_cycle_current"
            assert cluster.get(path, "hpa").status_code == 503
        metrics = cluster.get("/metrics", "scraper")
        assert metrics.status_code == 200, metrics.text
        (count,) = find(parse_samples(metrics.text), "gpu_adapter_prometheus_errors_total", kind="malformed")
        assert count[1] >= 2
    finally:
        adapter.stop()
        api.stop()
    log = adapter.log()
    assert log.count("reaching Prometheus failing") == 1 and "answered a malformed body" in log, log
    assert "Traceback" not in log, log
