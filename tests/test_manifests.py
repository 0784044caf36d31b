"""Every kustomize overlay renders, every object validates against the Kubernetes OpenAPI schemas of a
current release (kubernetes-validate), the ServiceMonitor against the fields we use, and the agent's
security settings stay as they are."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = [
    "base",
    "overlays/prometheus-operator",
    "overlays/annotations",
    "overlays/adapter",
    "overlays/adapter-external",
    "adapter",
]
KUBERNETES_VERSION = "1.34.0"


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is needed to render the overlays")
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "daemonset" / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay: str) -> None:
    schemas = {
        kind: json.loads((ROOT / "tests" / "schemas" / f"{kind.lower()}.json").read_text())
        for kind in ("ServiceMonitor", "PrometheusRule")  # prometheus-operator's, not Kubernetes'
    }
    objects = render(overlay)
    assert objects
    for obj in objects:
        if obj["kind"] in schemas:
            jsonschema.validate(obj, schemas[obj["kind"]])
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_a_typo_would_be_caught() -> None:
    daemonset = one(render("base"), "DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


def test_the_agents_security_and_scheduling_settings() -> None:
    objects = render("base")
    pod = one(objects, "DaemonSet")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (mount,) = container["volumeMounts"]
    assert mount == {"name": "pod-resources", "mountPath": "/var/lib/kubelet/pod-resources", "readOnly": True}
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in container["env"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    service = one(objects, "Service")["spec"]
    assert service["clusterIP"] == "None" and service["ports"] == [
        {"name": "metrics", "port": 9400, "targetPort": "metrics"}
    ]
    assert one(objects, "ClusterRole")["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["resource.k8s.io"], "resources": ["resourceslices"], "verbs": ["get", "list", "watch"]},
    ]


def test_scrape_setups_keep_the_agents_pod_labels() -> None:
    monitor = one(render("overlays/prometheus-operator"), "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    annotations = one(render("overlays/annotations"), "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9400",
        "prometheus.io/path": "/metrics",
    }
    # Debian's promtool is built without Kubernetes service discovery, so this one is checked by hand.
    (job,) = yaml.safe_load((ROOT / "daemonset" / "prometheus" / "scrape-config.yaml").read_text())["scrape_configs"]
    assert job["honor_labels"] is True
    assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["gpu-monitoring"]}}]
    keep = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert {
        "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"],
        "regex": "gpu-pod-exporter",
        "action": "keep",
    } in keep


def test_the_adapter_overlay_runs_agent_and_adapter_in_one_namespace() -> None:
    objects = render("overlays/adapter")
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] in ("DaemonSet", "Deployment")} == {
        "gpu-monitoring"
    }
    assert len([o for o in objects if o["kind"] == "Namespace"]) == 1
    assert len([o for o in objects if o["kind"] == "APIService"]) == 2  # custom metrics only (see adapter-external)
