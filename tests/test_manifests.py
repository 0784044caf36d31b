"""Every kustomize overlay renders, every object validates against the Kubernetes OpenAPI schemas of a
current release (kubernetes-validate), the ServiceMonitor against the fields we use; and the pieces fit
together as users rely on: every route to the agent reaches the port it listens on, its probes and
scrape path are ones it serves, its RBAC grants exactly the requests it makes, it lands on GPU nodes
only, and it runs with the least it needs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml
from kubernetes.utils import parse_quantity

from exporter.config import Config, parse_config
from sim.apiserver import Call, resource_slice_json
from sim.kubelet import Claim, ClaimDevice, PodDevices
from sim.scenario import gpu_uuid
from tests.conftest import NODE, Node

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = [
    "base",
    "overlays/prometheus-operator",
    "overlays/annotations",
    "overlays/adapter",
    "overlays/adapter-external",
    "adapter",
    "overlays/adapter-keda-scaler",
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


def agent_pod(objects: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DaemonSet's pod template and its one container."""
    template = one(objects, "DaemonSet")["spec"]["template"]
    (container,) = template["spec"]["containers"]
    return template, container


def agent_config(container: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    """The agent's own reading of the container's args (exit 2 on one it refuses), on a node."""
    return parse_config(container.get("args", []), environ or {})


def container_port(container: dict[str, Any], port: str | int) -> int:
    """The number a probe's or Service's port (a name or a number) reaches in the container."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def test_every_way_of_reaching_the_agent_reaches_the_port_it_listens_on() -> None:
    objects = render("overlays/prometheus-operator")
    template, container = agent_pod(objects)
    listening = agent_config(container).listen_port
    service = one(objects, "Service")
    # The Service picks the agent's pods, and sends each of its ports to the agent's listener.
    assert all(template["metadata"]["labels"].get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["metadata"]["namespace"] == one(objects, "DaemonSet")["metadata"]["namespace"]
    assert [container_port(container, p["targetPort"]) for p in service["spec"]["ports"]] == [listening]
    # Both probes too.
    for probe in ("livenessProbe", "readinessProbe"):
        assert container_port(container, container[probe]["httpGet"]["port"]) == listening, probe
    # The ServiceMonitor selects the Service, in its namespace, by one of its ports.
    monitor = one(objects, "ServiceMonitor")["spec"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in monitor["selector"]["matchLabels"].items())
    assert service["metadata"]["namespace"] in monitor["namespaceSelector"]["matchNames"]
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    # The classic annotations name the same port.
    _, annotated = agent_pod(render("overlays/annotations"))
    annotations = one(render("overlays/annotations"), "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == agent_config(annotated).listen_port


def test_the_probes_and_the_scrape_path_are_served_by_the_agent(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    """The agent started with the DaemonSet's args (its listener moved to a free port) on a
    simulated node answers the paths the probes, the annotations and the ServiceMonitor ask for."""
    _, container = agent_pod(render("base"))
    args = [a for a in container["args"] if not a.startswith("--listen")]
    agent = start_agent([*args, *node.args()], node.scenario_path)
    monitor = one(render("overlays/prometheus-operator"), "ServiceMonitor")
    annotations = one(render("overlays/annotations"), "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    for path in (container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"]):
        deadline = time.monotonic() + 10
        while (status := requests.get(agent.url + path, timeout=5).status_code) != 200:
            assert status == 503 and time.monotonic() < deadline, (path, status, agent.log())  # until the first poll
            time.sleep(0.2)
        assert status == 200, (path, agent.log())
    for path in {annotations["prometheus.io/path"], *(e.get("path", "/metrics") for e in monitor["spec"]["endpoints"])}:
        response = requests.get(agent.url + path, timeout=5)
        assert response.status_code == 200 and "duty_cycle_current{" in response.text, path


def test_the_agent_learns_its_node_from_the_downward_api() -> None:
    """NODE_NAME is what the pod watch and ResourceSlice watch select on: the wrong name would
    attribute no GPU to any pod."""
    _, container = agent_pod(render("base"))
    from_node = [
        e["name"]
        for e in container["env"]
        if e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName"
    ]
    assert from_node
    assert {agent_config(container, {name: "gpu-node-7"}).node_name for name in from_node} == {"gpu-node-7"}


def granted(objects: list[dict[str, Any]], service_account: str, namespace: str) -> set[tuple[str, str, str]]:
    """(API group, resource, verb) the ServiceAccount is granted by the ClusterRoles bound to it."""
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRole"}
    subject = {"kind": "ServiceAccount", "name": service_account, "namespace": namespace}
    bound = [b["roleRef"]["name"] for b in objects if b["kind"] == "ClusterRoleBinding" and subject in b["subjects"]]
    return {
        (group, resource, verb)
        for name in bound
        for rule in roles[name]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def requested(calls: list[Call]) -> set[tuple[str, str, str]]:
    """(API group, resource, verb) of the resource requests made, as the API server's authorizer
    sees them; discovery (``/apis/<group>``) is a non-resource URL every user may read."""
    found = set()
    for call in calls:
        parts = call.path.strip("/").split("/")
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
        if not rest:
            continue  # discovery
        if rest[0] == "namespaces" and len(rest) > 2:
            rest = rest[2:]
        verb = "watch" if call.is_watch else ("list" if len(rest) == 1 else "get")
        found.add((group, rest[0], verb))
    return found


def test_the_agents_rbac_grants_exactly_what_it_asks_the_api_for(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    """The agent on a node with a device-plugin pod and a DRA pod (so both watches run), against
    the pods API: every request it makes is granted, and nothing is granted it never asks for."""
    node.kubelet.set_pods(
        [
            *node.kubelet.pods,
            PodDevices(
                "ml",
                "llm",
                claims={"server": [Claim("ml", "llm-gpu", (ClaimDevice("gpu.nvidia.com", NODE, "gpu-1"),))]},
            ),
        ]
    )
    node.api.apply(resource_slice_json(f"{NODE}-gpu", NODE, "gpu.nvidia.com", NODE, {"gpu-1": {"uuid": gpu_uuid(1)}}))
    agent = start_agent(node.args(), node.scenario_path)
    agent.wait_for(
        lambda s: bool(node.api.watch_calls("pods") and node.api.watch_calls("resourceslices")),
        what="both watches",
    )
    objects = render("base")
    template, _ = agent_pod(objects)
    namespace = one(objects, "DaemonSet")["metadata"]["namespace"]
    assert requested(node.api.calls) == granted(objects, template["spec"]["serviceAccountName"], namespace)


def tolerated(tolerations: list[dict[str, Any]], taint: dict[str, str]) -> bool:
    """Kubernetes' rule: Exists matches any value of the key (all keys without one), Equal the value."""
    return any(
        (t.get("key") in (None, taint["key"]))
        and (t.get("operator", "Equal") == "Exists" or t.get("value") == taint.get("value"))
        and t.get("effect") in (None, "", taint["effect"])
        for t in tolerations
    )


def schedulable(pod: dict[str, Any], labels: dict[str, str], taints: list[dict[str, str]]) -> bool:
    """Required node affinity (In/Exists terms: any term, all its expressions) and NoSchedule taints."""
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]

    def holds(expression: dict[str, Any]) -> bool:
        if expression["operator"] == "Exists":
            return expression["key"] in labels
        assert expression["operator"] == "In", expression
        return labels.get(expression["key"]) in expression["values"]

    fits = any(all(holds(e) for e in term["matchExpressions"]) for term in terms)
    return fits and all(tolerated(pod.get("tolerations", []), t) for t in taints if t["effect"] == "NoSchedule")


@pytest.mark.parametrize(
    ("labels", "taints", "runs"),
    [
        (
            {"nvidia.com/gpu.present": "true"},
            [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
            True,
        ),
        ({"feature.node.kubernetes.io/pci-10de.present": "true"}, [], True),  # node feature discovery only
        ({"kubernetes.io/os": "linux"}, [], False),  # no GPU: no agent
        ({"nvidia.com/gpu.present": "true"}, [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}], False),
    ],
)
def test_the_agent_runs_on_gpu_nodes_only_tainted_or_not(
    labels: dict[str, str], taints: list[dict[str, str]], runs: bool
) -> None:
    template, _ = agent_pod(render("base"))
    assert schedulable(template["spec"], labels, taints) is runs


def test_the_agent_runs_with_least_privilege_and_bounded_memory() -> None:
    """What the agent needs: the host's PIDs (to tell pods' processes apart) and the kubelet's
    pod-resources socket, read only; no capability, no privilege escalation, nothing writable."""
    template, container = agent_pod(render("base"))
    pod = template["spec"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False and security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"] and not security["capabilities"].get("add")
    assert not security.get("privileged") and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert all(m.get("readOnly") for m in container["volumeMounts"])
    host_paths = {v["name"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {m["name"] for m in container["volumeMounts"]}
    # The socket the agent dials by default is the one mounted.
    socket = Path(agent_config(container).pod_resources_socket)
    assert any(socket.is_relative_to(m["mountPath"]) for m in container["volumeMounts"])
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    # A memory limit (a leak restarts the agent, never the node) at or above the request.
    resources = container["resources"]
    limit, request = (parse_quantity(resources[k]["memory"]) for k in ("limits", "requests"))  # type: ignore[no-untyped-call]
    assert limit >= request > 0


def discovered(objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The targets Prometheus's Kubernetes pod discovery finds for one agent pod (one per
    container port), with the meta labels the relabelling sees."""
    daemonset = one(objects, "DaemonSet")
    template, container = agent_pod(objects)
    labels = {
        f"__meta_kubernetes_pod_label_{re.sub('[^a-zA-Z0-9_]', '_', k)}": v
        for k, v in template["metadata"]["labels"].items()
    }
    return [
        {
            **labels,
            "__meta_kubernetes_namespace": daemonset["metadata"]["namespace"],
            "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
            "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
        }
        for port in container["ports"]
    ]


def kept(targets: list[dict[str, str]], relabel_configs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The targets ``keep`` rules leave, as Prometheus applies them (the source labels joined by
    ';', the regex anchored)."""
    for rule in relabel_configs:
        if rule.get("action") == "keep":
            pattern = re.compile(rule["regex"])
            targets = [t for t in targets if pattern.fullmatch(";".join(t.get(s, "") for s in rule["source_labels"]))]
    return targets


def test_the_scrape_job_keeps_the_agents_metrics_port_and_its_pod_labels() -> None:
    """Debian's promtool is built without Kubernetes service discovery, so the job's relabelling is
    applied here to the targets discovery would find."""
    objects = render("base")
    (job,) = yaml.safe_load((ROOT / "daemonset" / "prometheus" / "scrape-config.yaml").read_text())["scrape_configs"]
    # Without honor_labels, every GPU would be attributed to the agent's own namespace and pod.
    assert job["honor_labels"] is True
    assert one(render("overlays/prometheus-operator"), "ServiceMonitor")["spec"]["endpoints"][0]["honorLabels"] is True
    (sd,) = job["kubernetes_sd_configs"]
    targets = [t for t in discovered(objects) if t["__meta_kubernetes_namespace"] in sd["namespaces"]["names"]]
    _, container = agent_pod(objects)
    assert [int(t["__meta_kubernetes_pod_container_port_number"]) for t in kept(targets, job["relabel_configs"])] == [
        agent_config(container).listen_port
    ]


def test_the_adapter_overlay_runs_agent_and_adapter_in_one_namespace() -> None:
    objects = render("overlays/adapter")
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] in ("DaemonSet", "Deployment")} == {
        "gpu-monitoring"
    }
    assert len([o for o in objects if o["kind"] == "Namespace"]) == 1
    assert len([o for o in objects if o["kind"] == "APIService"]) == 2  # custom metrics only (see adapter-external)
