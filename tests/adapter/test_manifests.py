"""The adapter's manifests (daemonset/adapter): they fit together and match the adapter's flags."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.adapter.main import build_parser

DIRECTORY = Path(__file__).resolve().parents[2] / "daemonset" / "adapter"


def rendered() -> list[dict[str, Any]]:
    """What `kubectl kustomize` renders (kubectl is on these machines), else the files as listed."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        text = subprocess.run([kubectl, "kustomize", str(DIRECTORY)], capture_output=True, text=True, check=True).stdout
        return [d for d in yaml.safe_load_all(text) if d]
    listed = yaml.safe_load((DIRECTORY / "kustomization.yaml").read_text())["resources"]
    return [d for name in listed for d in yaml.safe_load_all((DIRECTORY / name).read_text()) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered() if d["kind"] == kind]


def test_apiservices_route_both_custom_versions_and_external_to_the_service() -> None:
    (service,) = by_kind("Service")
    services = {d["metadata"]["name"]: d["spec"] for d in by_kind("APIService")}
    assert set(services) == {
        "v1beta2.custom.metrics.k8s.io",
        "v1beta1.custom.metrics.k8s.io",
        "v1beta1.external.metrics.k8s.io",
    }
    for name, spec in services.items():
        assert name == f"{spec['version']}.{spec['group']}"
        assert spec["service"] == {
            "name": service["metadata"]["name"],
            "namespace": service["metadata"]["namespace"],
            "port": service["spec"]["ports"][0]["port"],
        }
        assert spec["groupPriorityMinimum"] == 100
    assert (
        services["v1beta2.custom.metrics.k8s.io"]["versionPriority"]
        > services["v1beta1.custom.metrics.k8s.io"]["versionPriority"]
    )  # the HPA prefers v1beta2


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
    assert roles["gpu-metrics-adapter:metrics-reader"]["rules"][0]["apiGroups"] == [
        "custom.metrics.k8s.io",
        "external.metrics.k8s.io",
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
