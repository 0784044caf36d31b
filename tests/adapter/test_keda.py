"""The KEDA example (daemonset/adapter/examples/keda-scaledobject.yaml): its fields are the ones KEDA
documents, and its PromQL, run by a real Prometheus scraping the agent on a simulated node, is the
average GPU utilisation of the BERT Deployment's pods and of no other pod, whatever its name.

kube-state-metrics cannot be installed here, so a stand-in serves the two series the query joins
on (``kube_pod_owner``, ``kube_replicaset_owner``) with the names and labels kube-state-metrics
documents.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import pytest
import yaml

from exporter.exposition.httpserver import Handler, Server
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import free_port, spawn_agent
from sim.prometheus import Prometheus
from sim.scenario import Gpu, Scenario, gpu_uuid

EXAMPLE = Path(__file__).resolve().parents[2] / "daemonset" / "adapter" / "examples" / "keda-scaledobject.yaml"
SCHEMA = Path(__file__).resolve().parent / "schemas" / "scaledobject.json"

# (namespace, pod, GPU indices, owner ReplicaSet or "" for none, the ReplicaSet's Deployment)
PODS = [
    ("default", "bert-intent-detection-7d9f-aaaa", [0, 4], "bert-intent-detection-7d9f", "bert-intent-detection"),
    ("default", "bert-intent-detection-7d9f-bbbb", [1], "bert-intent-detection-7d9f", "bert-intent-detection"),
    # Names that look like the Deployment's pods but are not:
    ("default", "bert-intent-detection-canary-5c6d-cccc", [2], "bert-intent-detection-canary-5c6d", "bert-canary"),
    ("default", "bert-intent-detection-7d9f-zzzz", [5], "", ""),  # a bare pod, no owner
    ("speech", "bert-intent-detection-7d9f-aaaa", [3], "bert-intent-detection-7d9f", "bert-intent-detection"),
]
UTILISATION = {0: 30, 1: 10, 2: 90, 3: 70, 4: 50, 5: 80}
EXPECTED = ((30 + 50) / 2 + 10) / 2  # per pod over its GPUs, then over the Deployment's two pods


def example() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return loaded


def kube_state_metrics() -> str:
    lines = []
    for namespace, pod, _, replicaset, _ in PODS:
        kind = "ReplicaSet" if replicaset else ""
        lines.append(
            f'kube_pod_owner{{namespace="{namespace}",pod="{pod}",uid="uid-{namespace}-{pod}",owner_kind="{kind}",'
            f'owner_name="{replicaset}",owner_is_controller="{"true" if replicaset else ""}"}} 1'
        )
    for namespace, replicaset, deployment in sorted({(n, r, d) for n, _, _, r, d in PODS if r}):
        lines.append(
            f'kube_replicaset_owner{{namespace="{namespace}",replicaset="{replicaset}",owner_kind="Deployment",'
            f'owner_name="{deployment}",owner_is_controller="true"}} 1'
        )
    return "\n".join(lines) + "\n"


class _KubeStateMetrics(Handler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send(200, kube_state_metrics().encode(), "text/plain; version=0.0.4")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    directory = tmp_path_factory.mktemp("keda")
    Scenario(gpus=[Gpu(gpu_uuid(i), util=UTILISATION[i]) for i in sorted(UTILISATION)]).write(directory / "s.txt")
    kubelet = FakeKubelet(str(directory / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            PodDevices(namespace, pod, {"server": [("nvidia.com/gpu", [gpu_uuid(g) for g in gpus])]})
            for namespace, pod, gpus, _, _ in PODS
        ]
    )
    agent_port = free_port()
    agent = spawn_agent(
        agent_port, directory / "s.txt", "--no-kubernetes", "--pod-resources-socket", kubelet.socket_path
    )
    ksm = Server(("127.0.0.1", 0), _KubeStateMetrics, None)
    ksm.start()
    server = Prometheus(
        directory / "prometheus", [f"127.0.0.1:{agent_port}", f"127.0.0.1:{ksm.server_address[1]}"], free_port()
    )
    try:
        server.wait_for('count(duty_cycle_current{pod!=""}) == 6 and count(kube_replicaset_owner) == 3')
        yield server
    finally:
        server.stop()
        agent.stop()
        ksm.stop()
        kubelet.stop()


def test_the_scaled_object_has_only_fields_keda_documents() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(example(), schema)
    mutations: tuple[Callable[[dict[str, Any]], None], ...] = (
        lambda o: o["spec"]["triggers"][0]["metadata"].update(threshold=20),  # metadata values are strings
        lambda o: o["spec"]["triggers"][0]["metadata"].update(metricName="gpu"),  # removed in KEDA 2.12
        lambda o: o["spec"].update(minReplicas=1),  # the HPA's name, not KEDA's
        lambda o: o["spec"]["triggers"][0].update(metricType="Average"),
    )
    for mutate in mutations:
        broken = copy.deepcopy(example())
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_the_scaled_object_scales_the_bert_deployment_on_its_average_and_never_to_zero() -> None:
    scaled = example()
    spec = scaled["spec"]
    (trigger,) = spec["triggers"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bert-intent-detection"}
    # No pods, no GPU series: utilisation can never wake a Deployment scaled to zero.
    assert spec["minReplicaCount"] >= 1 and "idleReplicaCount" not in spec
    assert (trigger["type"], trigger["metricType"]) == ("prometheus", "Value")
    assert trigger["metadata"]["threshold"] == "20"
    assert trigger["metadata"]["ignoreNullValues"] == "false"  # no data is an error, never a 0
    query = trigger["metadata"]["query"]
    namespace = scaled["metadata"]["namespace"]
    assert f'owner_name="{spec["scaleTargetRef"]["name"]}"' in query
    assert query.count(f'namespace="{namespace}"') == 3  # every selector in the ScaledObject's namespace
    tree = promql_parser.parse(query)
    # avg(...) without "by": one element, whatever the number of pods
    assert isinstance(tree, promql_parser.AggregateExpr)
    assert (str(tree.op), tree.modifier) == ("avg", None)


def test_the_query_is_the_average_of_the_deployments_pods_on_a_real_prometheus(prometheus: Prometheus) -> None:
    query = example()["spec"]["triggers"][0]["metadata"]["query"]
    (result,) = prometheus.query(query)  # KEDA wants a single-element vector
    assert float(result["value"][1]) == pytest.approx(EXPECTED)
    # The same number from the pods' own series, picked by hand.
    per_pod = prometheus.query(
        'avg by (pod) (duty_cycle_current{namespace="default",pod=~"bert-intent-detection-7d9f-(aaaa|bbbb)"})'
    )
    assert sum(float(r["value"][1]) for r in per_pod) / len(per_pod) == pytest.approx(EXPECTED)
    # A name-prefix match, the usual shortcut, would have counted the look-alikes.
    prefix = prometheus.query('avg(avg by (namespace, pod) (duty_cycle_current{pod=~"bert-intent-detection-.*"}))')
    assert float(prefix[0]["value"][1]) != pytest.approx(EXPECTED)


def test_without_the_deployments_pods_the_query_is_empty_not_zero(prometheus: Prometheus) -> None:
    query = example()["spec"]["triggers"][0]["metadata"]["query"]
    assert prometheus.query(query.replace('owner_name="bert-intent-detection"', 'owner_name="scaled-to-zero"')) == []
