"""The adapter end to end: the real agent on the fake NVML, scraped by a real Prometheus, served by
the adapter over real TLS to a client playing kube-apiserver's front proxy.

There is no kube-apiserver binary to be had here, so sim/apiserver.py plays its part for
pods, TokenReview and SubjectAccessReview, speaking the real JSON of those APIs.
"""

from __future__ import annotations

import calendar
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from sim.apiserver import FakeApiServer, pod_json
from sim.certs import Pki, make_pki
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import free_port, spawn_agent, start_adapter
from sim.prometheus import Prometheus
from sim.scenario import Gpu, Scenario, gpu_uuid

HPA_PATH = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/%2A/duty_cycle_current"
HPA_USER = "system:serviceaccount:kube-system:horizontal-pod-autoscaler"
PODS = {  # name -> (namespace, labels, GPU index or None, utilisation)
    "bert-intent-detection-a": ("default", {"app": "bert-intent-detection"}, 0, 22),
    "bert-intent-detection-b": ("default", {"app": "bert-intent-detection"}, 1, 17),
    "bert-intent-detection-c": ("default", {"app": "bert-intent-detection"}, None, 0),  # no GPU series yet
    "asr-0": ("default", {"app": "asr"}, 2, 60),
    "whisper-0": ("speech", {"app": "whisper"}, 3, 45),  # another team's namespace
}
NAN_RULES = (
    "rules:\n- name: duty_cycle_current\n  seriesQuery: duty_cycle_current\n"
    "- name: broken_ratio\n  seriesQuery: duty_cycle_current\n"
    "  metricsQuery: avg by (<<.GroupBy>>) (<<.Series>>{<<.LabelMatchers>>}) * 0 / 0\n"
)


@dataclass
class Stack:
    url: str
    pki: Pki
    api: FakeApiServer
    directory: Path
    kubeconfig: Path
    prometheus: Prometheus

    def get(
        self,
        path: str,
        user: str | None = HPA_USER,
        token: str | None = None,
        cert: bool = True,
        url: str | None = None,
    ) -> requests.Response:
        headers = {"X-Remote-User": user, "X-Remote-Group": "system:authenticated"} if user else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.get(
            (url or self.url) + path,
            headers=headers,
            verify=str(self.pki.ca),
            timeout=10,
            cert=(str(self.pki.client_cert), str(self.pki.client_key)) if cert else None,
        )


@pytest.fixture(scope="module", params=["prometheus", "victoria-metrics"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The same cases run against Prometheus and against VictoriaMetrics (the same query API)."""
    directory = tmp_path_factory.mktemp(request.param)
    scenario = directory / "scenario.txt"
    Scenario(gpus=[Gpu(gpu_uuid(gpu), util=u) for _, _, gpu, u in PODS.values() if gpu is not None]).write(scenario)
    kubelet = FakeKubelet(str(directory / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            PodDevices(namespace, name, {"server": [("nvidia.com/gpu", [gpu_uuid(gpu)])]})
            for name, (namespace, _, gpu, _) in PODS.items()
            if gpu is not None
        ]
    )
    agent_port = free_port()
    agent = spawn_agent(agent_port, scenario, "--no-kubernetes", "--pod-resources-socket", kubelet.socket_path)
    prometheus = Prometheus(directory / "store", [f"127.0.0.1:{agent_port}"], free_port(), kind=request.param)
    api = FakeApiServer().start()
    for i, (name, (namespace, labels, _, _)) in enumerate(PODS.items()):
        api.apply(pod_json(f"uid-{i}", namespace, name, "gpu-node-1", labels=labels))
    api.tokens["hpa-token"] = (HPA_USER, ["system:serviceaccounts"])
    pki = make_pki(directory)
    kubeconfig = api.write_kubeconfig(directory / "kubeconfig")
    adapter, url = start_adapter(directory, pki, kubeconfig, prometheus.url)
    try:
        prometheus.wait_for('count(duty_cycle_current{pod!=""}) == 4')
        yield Stack(url, pki, api, directory, kubeconfig, prometheus)
    finally:
        adapter.stop()
        prometheus.stop()
        agent.stop()
        kubelet.stop()
        api.stop()


def eventually_ok(stack: Stack, path: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        response = stack.get(path)
        if (response.status_code == 200 and response.json().get("items")) or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            return body
        time.sleep(0.3)


def test_the_hpas_exact_request(stack: Stack) -> None:
    body = eventually_ok(stack, HPA_PATH + "?labelSelector=app%3Dbert-intent-detection")
    assert (body["kind"], body["apiVersion"], body["metadata"]) == (
        "MetricValueList",
        "custom.metrics.k8s.io/v1beta2",
        {},
    )
    by_pod = {item["describedObject"]["name"]: item for item in body["items"]}
    assert set(by_pod) == {"bert-intent-detection-a", "bert-intent-detection-b"}  # c has no data: left out
    item = by_pod["bert-intent-detection-a"]
    assert set(item) == {"describedObject", "metric", "timestamp", "windowSeconds", "value"}
    assert item["describedObject"] == {
        "kind": "Pod",
        "namespace": "default",
        "name": "bert-intent-detection-a",
        "apiVersion": "/v1",
    }
    assert item["metric"] == {"name": "duty_cycle_current", "selector": None}
    assert item["value"] == "22" and by_pod["bert-intent-detection-b"]["value"] == "17"
    assert item["windowSeconds"] == 15  # the built-in rules average over --metrics-window's default
    # The timestamp is when the sample was scraped, not when the question was asked.
    (scraped,) = stack.prometheus.query('timestamp(duty_cycle_current{pod="bert-intent-detection-a"})')
    served = calendar.timegm(time.strptime(item["timestamp"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(served - float(scraped["value"][1])) <= 2


def test_v1beta1_shape(stack: Stack) -> None:
    path = HPA_PATH.replace("v1beta2", "v1beta1") + "?labelSelector=app%3Dbert-intent-detection"
    item = next(
        i for i in eventually_ok(stack, path)["items"] if i["describedObject"]["name"] == "bert-intent-detection-b"
    )
    assert set(item) == {"describedObject", "metricName", "timestamp", "window", "value", "selector"}
    assert (item["metricName"], item["value"], item["window"], item["selector"]) == (
        "duty_cycle_current",
        "17",
        15,
        None,
    )


def test_one_pod_by_name_and_the_namespace_aggregate(stack: Stack) -> None:
    one = eventually_ok(stack, "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/asr-0/duty_cycle_current")
    assert [i["value"] for i in one["items"]] == ["60"]
    missing = stack.get(
        "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/bert-intent-detection-c/duty_cycle_current"
    )
    assert missing.status_code == 404 and missing.json()["kind"] == "Status"
    namespace = eventually_ok(
        stack, "/apis/custom.metrics.k8s.io/v1beta1/namespaces/default/metrics/power_usage_milliwatts_current"
    )
    assert namespace["items"][0]["describedObject"] == {"kind": "Namespace", "name": "default", "apiVersion": "/v1"}
    assert namespace["items"][0]["value"] == "300k"  # three GPUs at the fake's default 100 W, summed


def test_discovery_lists_every_configured_metric(stack: Stack) -> None:
    groups = stack.get("/apis").json()
    assert [g["name"] for g in groups["groups"]] == ["custom.metrics.k8s.io", "external.metrics.k8s.io"]
    assert groups["groups"][0]["preferredVersion"]["version"] == "v1beta2"
    resources = stack.get("/apis/custom.metrics.k8s.io/v1beta1").json()
    assert resources["kind"] == "APIResourceList"
    names = {r["name"]: r for r in resources["resources"]}
    for metric in (
        "duty_cycle_current",
        "memory_used_bytes_current",
        "temperature_celsius_current",
        "power_usage_milliwatts_current",
    ):
        assert names[f"pods/{metric}"] == {
            "name": f"pods/{metric}",
            "singularName": "",
            "namespaced": True,
            "kind": "MetricValueList",
            "verbs": ["get"],
        }
        assert names[f"namespaces/{metric}"]["namespaced"] is False
    external = stack.get("/apis/external.metrics.k8s.io/v1beta1").json()
    assert {r["name"] for r in external["resources"]} == {"gpu_duty_cycle", "gpu_memory_used_bytes"}


def test_external_metric_with_a_label_selector(stack: Stack) -> None:
    path = "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/gpu_duty_cycle?labelSelector=pod%3Dasr-0"
    body = eventually_ok(stack, path)
    assert body["kind"] == "ExternalMetricValueList"
    (item,) = body["items"]
    assert (item["metricName"], item["value"], item["metricLabels"]) == ("gpu_duty_cycle", "60", {})


def test_empty_selector_match_and_errors(stack: Stack) -> None:
    empty = stack.get(HPA_PATH + "?labelSelector=app%3Dnothing-here")
    assert empty.status_code == 200 and empty.json()["items"] == []
    bad = stack.get(HPA_PATH + "?labelSelector=app%20in%20(x")
    assert bad.status_code == 400 and bad.json()["reason"] == "BadRequest"
    unknown = stack.get("/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/%2A/fan_speed")
    assert unknown.status_code == 404
    assert unknown.json()["message"] == "the server could not find the metric fan_speed for pods"


def test_authentication(stack: Stack) -> None:
    assert stack.get(HPA_PATH, cert=False).status_code == 401  # no client certificate, no token
    assert stack.get(HPA_PATH, user=None).status_code == 401  # front proxy without a user header
    assert stack.get(HPA_PATH, user=None, cert=False, token="wrong").status_code == 401
    assert stack.get(HPA_PATH, user=None, cert=False, token="hpa-token").status_code == 200
    other = make_pki(stack.directory / "other-ca")
    with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
        requests.get(
            stack.url + HPA_PATH,
            verify=str(stack.pki.ca),
            timeout=10,
            cert=(str(other.client_cert), str(other.client_key)),
            headers={"X-Remote-User": HPA_USER},
        )
    assert stack.get("/healthz", user=None, cert=False).status_code == 200
    assert stack.get("/readyz", user=None, cert=False).status_code == 200  # the pod cache has synced


def test_authorization_by_subject_access_review(stack: Stack) -> None:
    stack.api.allow = lambda spec: spec.get("user") != "mallory"
    try:
        denied = stack.get(HPA_PATH, user="mallory")
        assert denied.status_code == 403
        assert denied.json()["message"] == (
            'User "mallory" cannot get resource "pods/duty_cycle_current" in API group "custom.metrics.k8s.io" '
            'in the namespace "default"'
        )
        review = next(r for r in stack.api.access_reviews if r.get("user") == "mallory")
        assert review["resourceAttributes"] == {
            "group": "custom.metrics.k8s.io",
            "version": "v1beta2",
            "resource": "pods",
            "subresource": "duty_cycle_current",
            "name": "*",
            "namespace": "default",
            "verb": "get",
        }
        assert stack.get(HPA_PATH).status_code == 200
    finally:
        stack.api.allow = lambda spec: True


def test_nan_is_never_a_value(stack: Stack) -> None:
    rules = stack.directory / "nan-rules.yaml"
    rules.write_text(NAN_RULES)
    process, url = start_adapter(
        stack.directory, stack.pki, stack.kubeconfig, stack.prometheus.url, "--config", str(rules)
    )
    try:
        path = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/%2A/broken_ratio?labelSelector=app%3Dasr"
        response = stack.get(path, url=url)
        assert response.status_code == 200 and response.json()["items"] == []  # NaN left out, not 0
        works = stack.get(HPA_PATH.replace("%2A", "asr-0"), url=url)
        assert works.status_code == 200 and works.json()["items"][0]["value"] == "60"
    finally:
        process.stop()


def test_prometheus_down_is_503(stack: Stack) -> None:
    process, url = start_adapter(
        stack.directory, stack.pki, stack.kubeconfig, f"http://127.0.0.1:{free_port()}", "--prometheus-timeout", "2"
    )
    try:
        response = stack.get(HPA_PATH + "?labelSelector=app%3Dasr", url=url)
        for _ in range(50):  # the pod cache fills first; until then the selector matches nothing
            if response.status_code != 200:
                break
            time.sleep(0.1)
            response = stack.get(HPA_PATH + "?labelSelector=app%3Dasr", url=url)
        assert response.status_code == 503 and response.json()["reason"] == "ServiceUnavailable"
        assert "127.0.0.1" not in response.text  # where the backend is stays in the adapter's log
    finally:
        process.stop()


CUSTOM = "/apis/custom.metrics.k8s.io/v1beta2"
BERT = "?labelSelector=app%3Dbert-intent-detection"
# Every route of the custom and external metrics APIs, for a user allowed in "default" only:
# (path, expected status). Nothing of namespace "speech" may come back, whatever the path.
ONE_NAMESPACE_ROUTES = [
    # The reported attack: "namespaces" as a resource inside "default", answering for "speech".
    (f"{CUSTOM}/namespaces/default/namespaces/speech/duty_cycle_current", 404),
    (f"{CUSTOM.replace('v1beta2', 'v1beta1')}/namespaces/default/namespaces/speech/duty_cycle_current", 404),
    # Names that are no object names cannot smuggle another namespace in.
    (f"{CUSTOM}/namespaces/default%2Fnamespaces%2Fspeech/metrics/duty_cycle_current", 404),
    (f"{CUSTOM}/namespaces/default/pods/..%2F..%2Fspeech/duty_cycle_current", 404),
    (f"{CUSTOM}/namespaces//pods/%2A/duty_cycle_current", 404),
    # Pods in their own namespace.
    (f"{CUSTOM}/namespaces/default/pods/%2A/duty_cycle_current{BERT}", 200),
    (f"{CUSTOM}/namespaces/default/pods/asr-0/duty_cycle_current", 200),
    (f"{CUSTOM}/namespaces/speech/pods/%2A/duty_cycle_current?labelSelector=app%3Dwhisper", 403),
    (f"{CUSTOM}/namespaces/speech/pods/whisper-0/duty_cycle_current", 403),
    # The Namespace object, both forms: authorized in the namespace it is.
    (f"{CUSTOM}/namespaces/default/metrics/duty_cycle_current", 200),
    (f"{CUSTOM}/namespaces/default/duty_cycle_current", 200),
    (f"{CUSTOM}/namespaces/speech/metrics/duty_cycle_current", 403),
    (f"{CUSTOM}/namespaces/speech/duty_cycle_current", 403),
    # Root-scoped objects are cluster-wide: not for a user of one namespace.
    (f"{CUSTOM}/pods/whisper-0/duty_cycle_current", 403),
    (f"{CUSTOM}/nodes/gpu-node-1/duty_cycle_current", 403),
    ("/apis/external.metrics.k8s.io/v1beta1/namespaces/default/gpu_duty_cycle", 200),
    ("/apis/external.metrics.k8s.io/v1beta1/namespaces/speech/gpu_duty_cycle", 403),
    ("/apis/external.metrics.k8s.io/v1beta1/namespaces/default/speech/gpu_duty_cycle", 404),
]


def _in_default_only(spec: dict[str, Any]) -> bool:
    if spec.get("user") != "dev":
        return True
    return (spec.get("resourceAttributes") or {}).get("namespace") == "default"


def test_a_user_of_one_namespace_reads_that_namespace_only_on_every_route(stack: Stack) -> None:
    eventually_ok(stack, f"{CUSTOM}/namespaces/speech/pods/whisper-0/duty_cycle_current")  # data is there
    stack.api.allow = _in_default_only
    try:
        for path, expected in ONE_NAMESPACE_ROUTES:
            response = stack.get(path, user="dev")
            assert response.status_code == expected, (path, response.text)
            assert "whisper" not in response.text and '"45"' not in response.text, path
            if expected == 200:
                assert response.json()["items"], path
    finally:
        stack.api.allow = lambda spec: True


def test_the_namespace_object_is_reviewed_as_the_namespace_it_is(stack: Stack) -> None:
    for path in (
        f"{CUSTOM}/namespaces/speech/metrics/duty_cycle_current",
        f"{CUSTOM}/namespaces/speech/duty_cycle_current",
    ):
        body = eventually_ok(stack, path)
        assert [(i["describedObject"]["name"], i["value"]) for i in body["items"]] == [("speech", "45")]
    reviews = [r["resourceAttributes"] for r in stack.api.access_reviews if r.get("resourceAttributes")]
    assert {
        "group": "custom.metrics.k8s.io",
        "version": "v1beta2",
        "resource": "namespaces",
        "subresource": "duty_cycle_current",
        "name": "speech",
        "namespace": "speech",
        "verb": "get",
    } in reviews


def test_external_selectors_on_any_label_key_are_answered_not_500(stack: Stack) -> None:
    base = "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/gpu_duty_cycle?labelSelector="
    for selector in ("app.kubernetes.io%2Fname%3Dbert", "9lives%3Dx", "example.com%2Fteam-name", "pod%3Dasr-0"):
        response = stack.get(base + selector)
        assert response.status_code == 200, (selector, response.text)
    # The agent's series carry no app_kubernetes_io_name label: nothing matches, and nothing is invented.
    assert stack.get(base + "app.kubernetes.io%2Fname%3Dbert").json()["items"] == []
    assert [i["value"] for i in stack.get(base + "pod%3Dasr-0").json()["items"]] == ["60"]


def test_a_query_prometheus_refuses_is_500_without_its_words(stack: Stack) -> None:
    rules = stack.directory / "refused-rules.yaml"
    rules.write_text(
        "rules:\n- name: refused\n  seriesQuery: duty_cycle_current\n"
        "  metricsQuery: avg by (<<.GroupBy>>) (no_such_function(<<.Series>>{<<.LabelMatchers>>}))\n"
    )
    process, url = start_adapter(
        stack.directory, stack.pki, stack.kubeconfig, stack.prometheus.url, "--config", str(rules)
    )
    try:
        response = stack.get(f"{CUSTOM}/namespaces/default/pods/asr-0/refused", url=url)
        assert response.status_code == 500 and response.json()["reason"] == "InternalError"
        assert "function" not in response.text  # the backend's words stay out of the answer
    finally:
        process.stop()
    log = (stack.directory / f"adapter-{url.rsplit(':', 1)[1]}.log").read_text()
    assert log.count("refused a rule's query") == 1  # the operator finds the reason in the log, once


def test_before_the_pod_cache_synced_a_selector_is_503_not_an_empty_list(stack: Stack) -> None:
    nowhere = stack.directory / "kubeconfig-nowhere"
    nowhere.write_text(stack.kubeconfig.read_text().replace(stack.api.url, f"http://127.0.0.1:{free_port()}"))
    process, url = start_adapter(
        stack.directory,
        stack.pki,
        nowhere,  # the pod watch cannot list
        stack.prometheus.url,
        "--authentication-kubeconfig",
        str(stack.kubeconfig),
        "--authorization-kubeconfig",
        str(stack.kubeconfig),
        ready=False,
    )
    try:
        response = stack.get(HPA_PATH + BERT, url=url)
        assert response.status_code == 503, response.text
        assert response.json()["reason"] == "ServiceUnavailable"
        ready = stack.get("/readyz", user=None, cert=False, url=url)
        assert ready.status_code == 503 and "pod cache" in ready.text
        # A single pod by name needs no cache and is answered.
        assert eventually_ok(stack, f"{CUSTOM}/namespaces/default/pods/asr-0/duty_cycle_current")["items"]
    finally:
        process.stop()


def test_two_adapters_answer_the_same_request_the_same_way(stack: Stack) -> None:
    """The Deployment runs two replicas behind one Service: whichever answers, the HPA must read the
    same thing. Each replica keeps its own pod index and asks Prometheus; nothing else is state."""
    second, url = start_adapter(stack.directory, stack.pki, stack.kubeconfig, stack.prometheus.url)
    paths = [
        HPA_PATH + BERT,
        HPA_PATH.replace("v1beta2", "v1beta1") + BERT,
        f"{CUSTOM}/namespaces/default/metrics/power_usage_milliwatts_current",
        "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/gpu_duty_cycle?labelSelector=pod%3Dasr-0",
        f"{CUSTOM}/namespaces/default/pods/%2A/fan_speed",  # errors alike, too
        f"{CUSTOM}/namespaces/default/pods/%2A/duty_cycle_current?labelSelector=app%20in%20(x",
    ]
    try:
        for path in paths[:4]:
            eventually_ok(stack, path)
        for path in paths:
            for _ in range(10):  # the two may straddle a scrape: the newest sample's time moves
                first, other = stack.get(path), stack.get(path, url=url)
                if (first.status_code, first.content) == (other.status_code, other.content):
                    break
                time.sleep(0.3)
            assert (first.status_code, first.json()) == (other.status_code, other.json()), path
    finally:
        second.stop()


def test_the_selection_follows_the_pods_api(stack: Stack) -> None:
    """Prometheus still has a deleted pod's last series for a while; the HPA must not count it."""
    path = HPA_PATH + BERT
    assert {i["describedObject"]["name"] for i in eventually_ok(stack, path)["items"]} == {
        "bert-intent-detection-a",
        "bert-intent-detection-b",
    }
    uid = next(u for u, pod in stack.api.objects().items() if pod["metadata"]["name"] == "bert-intent-detection-b")
    pod = stack.api.objects()[uid]
    stack.api.delete(uid)
    try:
        deadline = time.monotonic() + 10
        while len(stack.get(path).json()["items"]) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [i["describedObject"]["name"] for i in stack.get(path).json()["items"]] == ["bert-intent-detection-a"]
    finally:
        stack.api.apply(pod)
    deadline = time.monotonic() + 10
    while len(stack.get(path).json()["items"]) != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(stack.get(path).json()["items"]) == 2


def test_slow_connections_do_not_hold_up_the_hpa(stack: Stack) -> None:
    """600 clients that connect and stall (some mid TLS record) cost neither a thread each nor the
    HPA its answers: past the connection limit the longest-waiting stalled one makes room."""
    process, url = start_adapter(stack.directory, stack.pki, stack.kubeconfig, stack.prometheus.url)
    port = int(url.rsplit(":", 1)[1])
    stalled: list[socket.socket] = []
    try:
        for i in range(600):
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                connection.sendall(b"\x16\x03\x01\x02")  # the start of a TLS record, then nothing
            stalled.append(connection)
        for _ in range(20):
            response = stack.get(HPA_PATH + BERT, url=url)
            assert response.status_code == 200 and len(response.json()["items"]) == 2
        threads = re.search(r"Threads:\s+(\d+)", Path(f"/proc/{process.pid}/status").read_text())
        assert threads and int(threads.group(1)) < 50  # a thread per connection would be 600 and more
    finally:
        for connection in stalled:
            connection.close()
        process.stop()


def _prometheus_queries(stack: Stack) -> float | None:
    """How many instant queries Prometheus has answered (its own counter); None on VictoriaMetrics."""
    text = requests.get(stack.prometheus.url + "/metrics", timeout=5).text
    found = re.findall(r'^prometheus_http_requests_total\{code="\d+",handler="/api/v1/query"\} (\S+)$', text, re.M)
    return sum(float(n) for n in found) if found else None


def test_identical_requests_at_once_cost_prometheus_one_query(stack: Stack) -> None:
    before = _prometheus_queries(stack)
    if before is None:
        pytest.skip("counted on Prometheus only")
    path = f"{CUSTOM}/namespaces/default/pods/%2A/temperature_celsius_current{BERT}"
    responses: list[requests.Response] = []
    threads = [threading.Thread(target=lambda: responses.append(stack.get(path))) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.content for r in responses}) == 1
    after = _prometheus_queries(stack)
    assert after is not None and after - before <= 2  # one, or two across a second's boundary; not 20
