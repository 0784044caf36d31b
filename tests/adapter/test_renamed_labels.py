"""A scrape config without honor_labels: the real agent scraped by a real Prometheus that attaches
the agent's own namespace and pod as target labels, so the measured pods' labels come in renamed to
``exported_namespace``/``exported_pod``. A user allowed in the agent's namespace only must see none
of the other namespaces' GPUs, on any route. kube-apiserver is sim/apiserver.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

from sim.apiserver import FakeApiServer, pod_json
from sim.certs import Pki, make_pki
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import free_port, spawn_agent, start_adapter
from sim.prometheus import Prometheus
from sim.scenario import Gpu, Scenario, gpu_uuid

AGENT_NAMESPACE, AGENT_POD = "gpu-system", "gpu-agent-0"
CUSTOM = "/apis/custom.metrics.k8s.io/v1beta2"


class Cluster:
    def __init__(self, url: str, pki: Pki, api: FakeApiServer) -> None:
        self.url, self.pki, self.api = url, pki, api

    def get(self, path: str, user: str) -> requests.Response:
        return requests.get(
            self.url + path,
            headers={"X-Remote-User": user, "X-Remote-Group": "system:authenticated"},
            verify=str(self.pki.ca),
            cert=(str(self.pki.client_cert), str(self.pki.client_key)),
            timeout=10,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    directory = tmp_path_factory.mktemp("renamed")
    scenario = directory / "scenario.txt"
    Scenario(gpus=[Gpu(gpu_uuid(0), util=60), Gpu(gpu_uuid(1), util=40)]).write(scenario)
    kubelet = FakeKubelet(str(directory / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            PodDevices("default", "asr-0", {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]}),
            PodDevices("speech", "whisper-0", {"server": [("nvidia.com/gpu", [gpu_uuid(1)])]}),
        ]
    )
    agent_port = free_port()
    agent = spawn_agent(agent_port, scenario, "--no-kubernetes", "--pod-resources-socket", kubelet.socket_path)
    prometheus = Prometheus(
        directory / "store",
        [f"127.0.0.1:{agent_port}"],
        free_port(),
        target_labels={"namespace": AGENT_NAMESPACE, "pod": AGENT_POD},
    )
    api = FakeApiServer().start()
    api.apply(pod_json("uid-0", "default", "asr-0", "gpu-node-1", labels={"app": "asr"}))
    api.apply(pod_json("uid-1", "speech", "whisper-0", "gpu-node-1", labels={"app": "whisper"}))
    api.apply(pod_json("uid-2", AGENT_NAMESPACE, AGENT_POD, "gpu-node-1", labels={"app": "gpu-agent"}))
    pki = make_pki(directory)
    adapter, url = start_adapter(directory, pki, api.write_kubeconfig(directory / "kubeconfig"), prometheus.url)
    try:
        # The series are there, renamed, under the agent's own namespace.
        prometheus.wait_for(f'count(duty_cycle_current{{namespace="{AGENT_NAMESPACE}",exported_pod!=""}}) == 2')
        yield Cluster(url, pki, api)
    finally:
        adapter.stop()
        prometheus.stop()
        agent.stop()
        kubelet.stop()
        api.stop()


def _in_agent_namespace_only(spec: dict[str, Any]) -> bool:
    return spec.get("user") != "ops" or (spec.get("resourceAttributes") or {}).get("namespace") == AGENT_NAMESPACE


def test_renamed_labels_still_attribute_each_pod(cluster: Cluster) -> None:
    for path, value in (
        (f"{CUSTOM}/namespaces/default/pods/asr-0/duty_cycle_current", "60"),
        (f"{CUSTOM}/namespaces/speech/pods/%2A/duty_cycle_current?labelSelector=app%3Dwhisper", "40"),
    ):
        response = cluster.get(path, "hpa")
        assert response.status_code == 200, response.text
        assert [i["value"] for i in response.json()["items"]] == [value], path


@pytest.mark.parametrize(
    "path",
    [
        f"{CUSTOM}/namespaces/{AGENT_NAMESPACE}/metrics/duty_cycle_current",
        f"{CUSTOM}/namespaces/{AGENT_NAMESPACE}/pods/{AGENT_POD}/duty_cycle_current",
        f"{CUSTOM}/namespaces/{AGENT_NAMESPACE}/pods/%2A/duty_cycle_current?labelSelector=app%3Dgpu-agent",
        f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{AGENT_NAMESPACE}/gpu_duty_cycle",
    ],
)
def test_a_user_of_the_agents_namespace_sees_no_other_namespaces_gpus(cluster: Cluster, path: str) -> None:
    cluster.api.allow = _in_agent_namespace_only
    try:
        response = cluster.get(path, "ops")
    finally:
        cluster.api.allow = lambda spec: True
    assert response.status_code in (200, 404), response.text  # allowed: the agent's namespace is theirs
    assert response.status_code == 404 or response.json()["items"] == [], response.text  # 60 and 40 are not
