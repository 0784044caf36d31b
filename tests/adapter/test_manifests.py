"""The adapter's manifests (daemonset/adapter): they fit together and match the adapter's flags."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.adapter.main import build_parser

DAEMONSET = Path(__file__).resolve().parents[2] / "daemonset"
DIRECTORY = DAEMONSET / "adapter"


def rendered(directory: Path = DIRECTORY) -> list[dict[str, Any]]:
    """What `kubectl kustomize` renders (kubectl is on these machines), else the files as listed."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        text = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True).stdout
        return [d for d in yaml.safe_load_all(text) if d]
    if directory != DIRECTORY:
        pytest.skip("kubectl is needed to render overlays")
    listed = yaml.safe_load((DIRECTORY / "kustomization.yaml").read_text())["resources"]
    return [d for name in listed for d in yaml.safe_load_all((DIRECTORY / name).read_text()) if d]


def by_kind(kind: str, directory: Path = DIRECTORY) -> list[dict[str, Any]]:
    return [d for d in rendered(directory) if d["kind"] == kind]


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector's matchLabels (the only form these manifests use) against labels."""
    assert set(selector) == {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def test_the_custom_metrics_api_is_routed_to_the_adapter_and_the_external_one_only_on_request() -> None:
    (service,) = by_kind("Service")
    routed = {
        "adapter": {d["metadata"]["name"]: d["spec"] for d in by_kind("APIService")},
        "overlays/adapter": {
            d["metadata"]["name"]: d["spec"] for d in by_kind("APIService", DAEMONSET / "overlays/adapter")
        },
        "overlays/adapter-external": {
            d["metadata"]["name"]: d["spec"] for d in by_kind("APIService", DAEMONSET / "overlays/adapter-external")
        },
    }
    custom = {"v1beta2.custom.metrics.k8s.io", "v1beta1.custom.metrics.k8s.io"}
    # Beside KEDA, which registers v1beta1.external.metrics.k8s.io, nothing here takes it over.
    assert set(routed["adapter"]) == set(routed["overlays/adapter"]) == custom
    assert set(routed["overlays/adapter-external"]) == custom | {"v1beta1.external.metrics.k8s.io"}
    for name, spec in routed["overlays/adapter-external"].items():
        assert name == f"{spec['version']}.{spec['group']}"
        assert spec["service"] == {
            "name": service["metadata"]["name"],
            "namespace": service["metadata"]["namespace"],
            "port": service["spec"]["ports"][0]["port"],
        }
        assert spec["groupPriorityMinimum"] == 100
    assert (
        routed["adapter"]["v1beta2.custom.metrics.k8s.io"]["versionPriority"]
        > (routed["adapter"]["v1beta1.custom.metrics.k8s.io"]["versionPriority"])
    )  # the HPA prefers v1beta2


def test_the_hpa_may_read_external_metrics_from_the_adapter_only_where_it_serves_them() -> None:
    def groups(directory: Path) -> list[str]:
        roles = {d["metadata"]["name"]: d for d in by_kind("ClusterRole", directory)}
        rules: list[dict[str, Any]] = roles["gpu-metrics-adapter:metrics-reader"]["rules"]
        return [g for rule in rules for g in rule["apiGroups"]]

    assert groups(DIRECTORY) == groups(DAEMONSET / "overlays/adapter") == ["custom.metrics.k8s.io"]
    assert groups(DAEMONSET / "overlays/adapter-external") == ["custom.metrics.k8s.io", "external.metrics.k8s.io"]


def test_a_node_drain_never_takes_the_last_ready_adapter() -> None:
    (deployment,) = by_kind("Deployment")
    (budget,) = by_kind("PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert matches(budget["spec"]["selector"], pod_labels)
    assert budget["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    replicas, min_available = deployment["spec"]["replicas"], budget["spec"]["minAvailable"]
    # One may always be evicted (a drain proceeds), one always stays.
    assert 1 <= min_available <= replicas - 1


def test_a_rollout_never_drops_below_one_ready_adapter() -> None:
    (deployment,) = by_kind("Deployment")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] >= 1
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    # Ready means /readyz, which the adapter answers 503 until its pod index has synced and it has
    # read the front proxy's CA (tests/adapter/test_adapter.py, tests/adapter/test_trust.py).
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["scheme"], probe["port"]) == ("/readyz", "HTTPS", "https")


def test_the_replicas_spread_over_nodes_without_blocking_small_clusters() -> None:
    (deployment,) = by_kind("Deployment")
    pod = deployment["spec"]["template"]
    constraints = {c["topologyKey"]: c for c in pod["spec"]["topologySpreadConstraints"]}
    node = constraints["kubernetes.io/hostname"]
    assert matches(node["labelSelector"], pod["metadata"]["labels"])
    assert node["maxSkew"] == 1
    # Soft: a one-node cluster still runs both, and a rollout's surge replica is never left Pending.
    assert node["whenUnsatisfiable"] == "ScheduleAnyway"
    assert deployment["spec"]["replicas"] >= 2


def test_the_service_sends_traffic_to_the_adapters_pods() -> None:
    (deployment,) = by_kind("Deployment")
    (service,) = by_kind("Service")
    assert matches({"matchLabels": service["spec"]["selector"]}, deployment["spec"]["template"]["metadata"]["labels"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["ports"][0]["targetPort"] in [p["name"] for p in container["ports"]]


def test_deployment_runs_the_adapter_with_flags_it_accepts() -> None:
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["gpu-metrics-adapter"]
    build_parser().parse_args(container["args"])  # exits 2 on a flag the adapter does not know
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    cert_dir = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--cert-dir="))
    assert cert_dir in mounts  # the self-signed pair needs somewhere writable
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_rbac_grants_what_the_adapter_and_the_hpa_need_and_nothing_more() -> None:
    roles = {d["metadata"]["name"]: d for d in by_kind("ClusterRole")}
    assert roles["gpu-metrics-adapter:pods-reader"]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
    ]
    bindings = {d["roleRef"]["name"]: d for d in by_kind("ClusterRoleBinding") + by_kind("RoleBinding")}
    assert "system:auth-delegator" in bindings
    reader = bindings["extension-apiserver-authentication-reader"]
    assert reader["kind"] == "RoleBinding" and reader["metadata"]["namespace"] == "kube-system"
    hpa = bindings["gpu-metrics-adapter:metrics-reader"]["subjects"]
    assert hpa == [{"kind": "ServiceAccount", "name": "horizontal-pod-autoscaler", "namespace": "kube-system"}]


@pytest.mark.parametrize("name", ["hpa-v2beta1.yaml", "hpa-v2.yaml"])
def test_example_hpas_target_an_average_duty_cycle_of_20(name: str) -> None:
    hpa = yaml.safe_load((DIRECTORY / "examples" / name).read_text())
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    if hpa["apiVersion"] == "autoscaling/v2beta1":
        assert metric["pods"] == {"metricName": "duty_cycle_current", "targetAverageValue": 20}
    else:
        assert metric["pods"]["metric"]["name"] == "duty_cycle_current"
        assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "20"}
