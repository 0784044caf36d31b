"""The Grafana dashboards: structure, PromQL that parses and names only metrics that exist, and every
panel returning data from a real Prometheus that scraped the agent on a simulated node with pods."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import requests

from exporter.exposition.httpserver import Handler, Server
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import free_port
from sim.prometheus import Prometheus
from sim.scenario import Gpu, Scenario, Xid, gpu_uuid
from tests.conftest import parse_samples

DASHBOARDS = Path(__file__).resolve().parent.parent / "dashboards"
# Series of kube-state-metrics (a named external exporter) that the HPA dashboard reads.
_HPA = 'namespace="default",horizontalpodautoscaler="gpu-hpa"'
KUBE_STATE_METRICS = (
    f'kube_horizontalpodautoscaler_info{{{_HPA},scaletargetref_api_version="apps/v1",'
    'scaletargetref_kind="Deployment",scaletargetref_name="bert-intent-detection"} 1\n'
    f'kube_horizontalpodautoscaler_spec_target_metric{{{_HPA},metric_name="duty_cycle_current",'
    'metric_target_type="average"} 20\n'
    f"kube_horizontalpodautoscaler_status_current_replicas{{{_HPA}}} 2\n"
    f"kube_horizontalpodautoscaler_status_desired_replicas{{{_HPA}}} 2\n"
    'kube_deployment_status_replicas{namespace="default",deployment="bert-intent-detection"} 2\n'
    # Pod -> ReplicaSet -> Deployment; the canary's pods share the name prefix but not the owner.
    'kube_pod_owner{namespace="default",pod="bert-intent-detection-7d9f-aaaa",owner_kind="ReplicaSet",'
    'owner_name="bert-intent-detection-7d9f",owner_is_controller="true"} 1\n'
    'kube_pod_owner{namespace="default",pod="bert-intent-detection-7d9f-bbbb",owner_kind="ReplicaSet",'
    'owner_name="bert-intent-detection-7d9f",owner_is_controller="true"} 1\n'
    'kube_pod_owner{namespace="default",pod="bert-intent-detection-canary-5c4b-cccc",owner_kind="ReplicaSet",'
    'owner_name="bert-intent-detection-canary-5c4b",owner_is_controller="true"} 1\n'
    'kube_replicaset_owner{namespace="default",replicaset="bert-intent-detection-7d9f",owner_kind="Deployment",'
    'owner_name="bert-intent-detection",owner_is_controller="true"} 1\n'
    'kube_replicaset_owner{namespace="default",replicaset="bert-intent-detection-canary-5c4b",owner_kind="Deployment",'
    'owner_name="bert-intent-detection-canary",owner_is_controller="true"} 1\n'
    # What docs/install.md's verification compares the agent's attributions with.
    + "".join(
        f'kube_pod_container_resource_requests{{namespace="{ns}",pod="{pod}",container="{c}",node="gpu-node-1",'
        f'resource="{resource}",unit="integer"}} 1\n'
        f'kube_pod_status_phase{{namespace="{ns}",pod="{pod}",phase="Running"}} 1\n'
        f'kube_pod_status_phase{{namespace="{ns}",pod="{pod}",phase="Pending"}} 0\n'
        for ns, pod, c, resource in (
            ("default", "bert-intent-detection-7d9f-aaaa", "server", "nvidia_com_gpu"),
            ("default", "bert-intent-detection-7d9f-bbbb", "server", "nvidia_com_gpu"),
            ("default", "bert-intent-detection-canary-5c4b-cccc", "server", "nvidia_com_gpu"),
            ("speech", "asr-0", "asr", "nvidia_com_gpu_shared"),
            ("speech", "asr-1", "asr", "nvidia_com_gpu_shared"),
        )
    )
)
KSM_NAMES = set(re.findall(r"^(\w+)\{", KUBE_STATE_METRICS, re.M))
VALUES = {
    "gpu-pods.json": {"node": ".*", "namespace": ".*", "pod": ".*"},
    "gpu-hpa.json": {"namespace": "default", "hpa": "gpu-hpa", "workload": "bert-intent-detection"},
}


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", ()))
    return found


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target."""
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", ())]


def substitute(expr: str, values: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: values.get(m.group(1), m.group(0)), expr)


def metric_names(node: Any) -> set[str]:
    names: set[str] = set()
    if type(node).__name__ == "VectorSelector" and node.name:
        names.add(node.name)
    for attribute in ("lhs", "rhs", "expr", "args", "param", "vector_selector"):
        child = getattr(node, attribute, None)
        for item in child if isinstance(child, list) else [child]:
            if item is not None and not isinstance(item, (str, int, float)):
                names |= metric_names(item)
    return names


def label_values(query: str) -> tuple[str, str]:
    match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
    assert match, query
    return match.group(1), match.group(2)


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_structure(name: str) -> None:
    dashboard = dashboards()[name]
    assert dashboard["schemaVersion"] >= 36  # Grafana 10/11
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    variables = dashboard["templating"]["list"]
    assert variables[0]["type"] == "datasource"
    text = json.dumps([p.get("targets", []) for p in panels(dashboard)]) + json.dumps(
        [v.get("query") for v in variables]
    )
    for variable in variables[1:]:
        assert f"${variable['name']}" in text.replace(json.dumps(variable["query"]), ""), (
            f"variable {variable['name']} is never used"
        )


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_promql_parses_and_names_only_known_metrics(name: str, agent_metric_names: set[str]) -> None:
    dashboard = dashboards()[name]
    queries = [e for _, e in expressions(dashboard)] + [
        label_values(v["query"]["query"])[0] for v in dashboard["templating"]["list"][1:]
    ]
    for query in queries:
        tree = promql_parser.parse(substitute(query, VALUES[name]))
        unknown = metric_names(tree) - agent_metric_names - KSM_NAMES
        assert not unknown, f"{query} uses {unknown}"


class _KubeStateMetrics(Handler):
    """Stands in for kube-state-metrics (not installable here): serves the series, with the names
    and labels kube-state-metrics documents, that the HPA dashboard reads."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send(200, KUBE_STATE_METRICS.encode(), "text/plain; version=0.0.4")


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, str]]:
    """A simulated node: two BERT pods (one busy, one idle), two pods time-slicing a GPU, a free GPU,
    and a busy pod of another Deployment whose name starts like the BERT pods'."""
    from sim.fakelib import build_fake_nvml
    from tests.conftest import AgentProcess

    directory = tmp_path_factory.mktemp("dashboards")
    scenario = directory / "scenario.txt"
    busy: dict[str, Any] = {"sm_active": 45.0, "sm_occupancy": 30.0, "tensor_active": 20.0, "dram_bandwidth": 35.0}
    node = Scenario(
        gpus=[
            Gpu(
                gpu_uuid(0),
                util=30,
                energy=9_000_000,
                energy_rate=250_000,
                energy_since=time.time(),
                pcie_tx=1000,
                **busy,
            ),
            Gpu(gpu_uuid(1), util=0, clock_reasons=0x1),  # idle
            Gpu(gpu_uuid(2), util=55, clock_reasons=0x4, encoder=10, **busy),  # capped by software power limit
            Gpu(gpu_uuid(3), util=0, clock_reasons=0x1, remap_failed=True),  # unhealthy: a row remap failed
            Gpu(gpu_uuid(4), util=80, clock_reasons=0x40),  # degraded: a hardware thermal slowdown
        ]
    )
    node.write(scenario)
    kubelet = FakeKubelet(str(directory / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            PodDevices("default", "bert-intent-detection-7d9f-aaaa", {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]}),
            PodDevices("default", "bert-intent-detection-7d9f-bbbb", {"server": [("nvidia.com/gpu", [gpu_uuid(1)])]}),
            PodDevices("speech", "asr-0", {"asr": [("nvidia.com/gpu.shared", [gpu_uuid(2) + "::0"])]}),
            PodDevices("speech", "asr-1", {"asr": [("nvidia.com/gpu.shared", [gpu_uuid(2) + "::1"])]}),
            PodDevices(
                "default", "bert-intent-detection-canary-5c4b-cccc", {"server": [("nvidia.com/gpu", [gpu_uuid(4)])]}
            ),
        ]
    )
    agent = AgentProcess(
        ["--no-kubernetes", "--node-name", "gpu-node-1", "--pod-resources-socket", kubelet.socket_path],
        scenario,
        build_fake_nvml().parent,
        directory / "agent.log",
    )
    ksm = Server(("127.0.0.1", 0), _KubeStateMetrics, None)
    ksm.start()
    prometheus = Prometheus(
        directory / "prometheus", [f"127.0.0.1:{agent.port}", f"127.0.0.1:{ksm.server_address[1]}"], free_port()
    )
    try:
        # An Xid on GPU 0 once the agent watches for them (events before that are not delivered).
        deadline = time.monotonic() + 30
        while "Xid events: watching 5 of 5 GPUs" not in agent.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        node.xids.append(Xid(gpu=0, code=79))
        node.write(scenario)
        prometheus.wait_for(
            "count(gpu_exporter_gpu_sharing_pods) > 0 and count(kube_deployment_status_replicas) > 0"
            " and count(gpu_xid_errors_total) > 0 and count(gpu_sm_active_ratio) > 0"
            " and count(increase(gpu_energy_joules_total[1h])) > 0"  # two scrapes, for increase()
            # and the pods' GPU-seconds moved between two scrapes (the ledger moves with the counter)
            ' and count(increase(gpu_pod_allocated_gpu_seconds_total{pod!=""}[1h]) > 0) == 5'
        )
        yield prometheus, agent.url
    finally:
        prometheus.stop()
        agent.stop()
        ksm.stop()
        kubelet.stop()


@pytest.fixture(scope="module")
def agent_metric_names(scraped: tuple[Prometheus, str]) -> set[str]:
    """The metric names the agent really exports (its contract and self-metrics)."""
    text = requests.get(scraped[1] + "/metrics", timeout=5).text
    return {name for name, _ in parse_samples(text)}


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_every_panel_and_variable_returns_data(name: str, scraped: tuple[Prometheus, str]) -> None:
    prometheus = scraped[0]
    dashboard = dashboards()[name]
    for title, expr in expressions(dashboard):
        assert prometheus.query(substitute(expr, VALUES[name])), f"panel {title!r} would read No data: {expr}"
    for variable in dashboard["templating"]["list"][1:]:
        selector, label = label_values(variable["query"]["query"])
        result = prometheus.query(substitute(selector, VALUES[name]))
        assert any(label in r["metric"] for r in result), f"variable {variable['name']} would be empty"


def test_the_hpa_dashboard_picks_the_workloads_pods_by_ownership_not_by_name(scraped: tuple[Prometheus, str]) -> None:
    """The canary Deployment's busy pod (same name prefix) is neither in the per-pod panel nor in the
    average the HPA sees: the BERT pods are at 30 and 0, their average 15."""
    (panel,) = [
        p for p in panels(dashboards()["gpu-hpa.json"]) if p["title"] == "GPU utilisation per pod of the workload"
    ]
    (target,) = panel["targets"]
    result = scraped[0].query(substitute(target["expr"], VALUES["gpu-hpa.json"]))
    assert sorted(r["metric"]["pod"] for r in result) == [
        "bert-intent-detection-7d9f-aaaa",
        "bert-intent-detection-7d9f-bbbb",
    ]
    (seen,) = [p for p in panels(dashboards()["gpu-hpa.json"]) if p["title"] == "What the HPA sees against its target"]
    (average,) = scraped[0].query(substitute(seen["targets"][0]["expr"], VALUES["gpu-hpa.json"]))
    assert float(average["value"][1]) == pytest.approx(15)


def test_the_install_guides_verification_queries_answer_as_it_says(scraped: tuple[Prometheus, str]) -> None:
    """docs/install.md's PromQL checks, in order, on this one-node install: NVML up on every node,
    nothing down, and the GPUs held whole equal to the running pods' nvidia.com/gpu requests (three;
    the two pods time-slicing a GPU request another resource)."""
    text = (DASHBOARDS.parent / "docs" / "install.md").read_text()
    blocks = re.findall(r"```promql\n(.*?)```", text, re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    nodes, broken, attributed, requested = [line for line in lines if line]
    prometheus = scraped[0]
    assert [float(r["value"][1]) for r in prometheus.query(nodes)] == [1]
    assert prometheus.query(broken) == []
    held = [float(r["value"][1]) for r in prometheus.query(attributed)]
    assert held == [float(r["value"][1]) for r in prometheus.query(requested)] == [3]


def test_the_least_efficient_pods_table_puts_the_idle_pod_first(scraped: tuple[Prometheus, str]) -> None:
    """BERT's idle replica held its GPU and used none of it; the busy one used 30 %."""
    (expr,) = [e for title, e in expressions(dashboards()["gpu-pods.json"]) if title.startswith("Least efficient")]
    result = scraped[0].query(substitute(expr, VALUES["gpu-pods.json"]))
    efficiency = {r["metric"]["pod"]: float(r["value"][1]) for r in result}
    assert min(efficiency, key=efficiency.__getitem__) == "bert-intent-detection-7d9f-bbbb"
    assert efficiency["bert-intent-detection-7d9f-bbbb"] == 0
    assert efficiency["bert-intent-detection-7d9f-aaaa"] == pytest.approx(0.30, rel=0.05)


def test_the_health_verdict_panels_show_each_gpus_status_and_its_reasons(scraped: tuple[Prometheus, str]) -> None:
    """GPU 0 had Xid 79 (a node reboot), GPU 3 a row remap failure, GPU 4 slows down for heat; GPU 2's
    software power cap is no health rule."""
    dashboard = dashboards()["gpu-pods.json"]
    (status,) = [p for p in panels(dashboard) if p["title"] == "GPU health" and p["type"] == "stat"]
    (reasons,) = [p for p in panels(dashboard) if p["title"] == "Health reasons in force"]
    prometheus = scraped[0]
    reasons_expr = substitute(reasons["targets"][0]["expr"], VALUES["gpu-pods.json"])
    prometheus.wait_for(f"count({reasons_expr}) == 3")
    shown = {
        r["metric"]["gpu"]: status["fieldConfig"]["defaults"]["mappings"][0]["options"][r["value"][1]]["text"]
        for r in prometheus.query(substitute(status["targets"][0]["expr"], VALUES["gpu-pods.json"]))
    }
    assert shown == {"0": "unhealthy", "1": "healthy", "2": "healthy", "3": "unhealthy", "4": "degraded"}
    in_force = {
        (r["metric"]["gpu"], r["metric"]["reason"], r["metric"]["severity"]) for r in prometheus.query(reasons_expr)
    }
    assert in_force == {
        ("0", "xid_node_reboot", "unhealthy"),
        ("3", "row_remap_failure", "unhealthy"),
        ("4", "thermal_slowdown", "degraded"),
    }
