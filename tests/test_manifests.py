"""Every kustomize overlay, and every component on top of the fullest one, renders, and every object
validates against the Kubernetes OpenAPI schemas of the oldest and newest release we claim
(kubernetes-validate), the custom resources against the fields we use; and the pieces fit together as
users rely on: every route to the agent reaches the port it listens on, its probes and scrape path
are ones it serves, its RBAC grants exactly the requests it makes, it lands on GPU nodes only (on
each platform with its component), each pod passes the Pod Security level its namespace enforces,
everything follows a namespace set with kustomize, and it runs with the least it needs."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import requests
import yaml
from kubernetes.utils import parse_quantity

from exporter.adapter.main import build_parser
from exporter.config import Config, parse_config
from sim.apiserver import Call, resource_slice_json
from sim.kubelet import Claim, ClaimDevice, PodDevices
from sim.scenario import gpu_uuid
from tests import podsecurity
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
    "overlays/adapter-prometheus-operator",
]
# Platform and stack components (daemonset/components), each rendered on the overlay with everything.
COMPONENTS = ["eks", "gke", "aks", "gpu-operator", "nvidia-runtimeclass", "kube-prometheus-stack", "cert-manager"]
FULLEST = "overlays/adapter-external"
KUBERNETES_VERSION = "1.34.0"
KUBERNETES_VERSIONS = ["1.29.0", KUBERNETES_VERSION]  # the oldest and newest the README claims
CUSTOM_RESOURCES = ("ServiceMonitor", "PrometheusRule", "Certificate", "Issuer")  # schemas in tests/schemas
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "APIService", "PriorityClass"}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is needed to render the overlays")
        pytest.skip("kubectl is not installed")
    return found


@functools.cache
def _rendered(overlay: str, components: tuple[str, ...], namespace: str | None) -> str:
    """`kubectl kustomize` of an overlay; with components or a namespace, of a kustomization that
    lists the overlay and sets them, as a user's own kustomization does."""
    if not components and namespace is None:
        target = ROOT / "daemonset" / overlay
        return subprocess.run([kubectl(), "kustomize", str(target)], capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as directory:
        relative = os.path.relpath(ROOT / "daemonset", directory)
        kustomization: dict[str, Any] = {"resources": [f"{relative}/{overlay}"]}
        if components:
            kustomization["components"] = [f"{relative}/components/{c}" for c in components]
        if namespace is not None:
            kustomization["namespace"] = namespace
        (Path(directory) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return subprocess.run([kubectl(), "kustomize", directory], capture_output=True, text=True, check=True).stdout


def render(overlay: str, components: tuple[str, ...] = (), namespace: str | None = None) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(_rendered(overlay, components, namespace)) if d]


def custom_resource_schema(kind: str) -> dict[str, Any]:
    return json.loads((ROOT / "tests" / "schemas" / f"{kind.lower()}.json").read_text())  # type: ignore[no-any-return]


@functools.cache
def _validate_once(document: str, version: str) -> None:
    """Objects shared by several renders are validated once per version."""
    obj = json.loads(document)
    if obj["kind"] in CUSTOM_RESOURCES:
        jsonschema.validate(obj, custom_resource_schema(obj["kind"]))
    else:
        kubernetes_validate.validate(obj, version, strict=True)


def namespace_of(objects: list[dict[str, Any]], obj: dict[str, Any]) -> dict[str, Any]:
    """The Namespace object the render creates for a namespaced object."""
    (found,) = [
        n for n in objects if n["kind"] == "Namespace" and n["metadata"]["name"] == obj["metadata"]["namespace"]
    ]
    return found


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


VARIANTS = [(overlay, ()) for overlay in OVERLAYS] + [(FULLEST, (component,)) for component in COMPONENTS]


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_every_object_validates(overlay: str, components: tuple[str, ...]) -> None:
    objects = render(overlay, components)
    assert objects
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            _validate_once(json.dumps(obj, sort_keys=True), version)


def test_every_prometheus_operator_object_in_the_tree_is_rendered_and_validated() -> None:
    """A ServiceMonitor or PrometheusRule file no kustomization lists is never validated, never
    labelled by the kube-prometheus-stack component and never moved by `namespace:`."""
    shipped = {
        (document["kind"], document["metadata"]["name"])
        for path in (ROOT / "daemonset").rglob("*.yaml")
        for document in yaml.safe_load_all(path.read_text())
        if document and document.get("apiVersion", "").startswith("monitoring.coreos.com/")
    }
    assert shipped
    assert shipped <= {(o["kind"], o["metadata"]["name"]) for o in render(FULLEST)}


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
    assert selects_services_in(one(objects, "ServiceMonitor")) == {service["metadata"]["namespace"]}
    assert {e["port"] for e in monitor["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    # The classic annotations name the same port.
    _, annotated = agent_pod(render("overlays/annotations"))
    annotations = one(render("overlays/annotations"), "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == agent_config(annotated).listen_port


def selects_services_in(monitor: dict[str, Any]) -> set[str]:
    """The namespaces a ServiceMonitor looks for Services in: its own unless it names others."""
    selector = monitor["spec"].get("namespaceSelector")
    if selector is None:
        return {monitor["metadata"]["namespace"]}
    assert set(selector) == {"matchNames"}, selector
    return set(selector["matchNames"])


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
    """Required node affinity (In/NotIn/Exists/DoesNotExist terms: any term, all its expressions) and
    NoSchedule taints."""
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]

    def holds(expression: dict[str, Any]) -> bool:
        key: str = expression["key"]
        operator: str = expression["operator"]
        if operator in ("Exists", "DoesNotExist"):
            return (key in labels) is (operator == "Exists")
        assert operator in ("In", "NotIn"), expression
        values: list[str] = expression["values"]
        return (labels.get(key) in values) is (operator == "In")

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


def test_the_adapter_overlay_runs_agent_and_adapter_each_in_its_own_namespace() -> None:
    """The agent needs the `privileged` Pod Security level; the adapter, apart, runs under `restricted`."""
    objects = render("overlays/adapter")
    workloads = {o["kind"]: o for o in objects if o["kind"] in ("DaemonSet", "Deployment")}
    levels = {
        kind: namespace_of(objects, o)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        for kind, o in workloads.items()
    }
    assert levels == {"DaemonSet": "privileged", "Deployment": "restricted"}
    assert len([o for o in objects if o["kind"] == "APIService"]) == 2  # custom metrics only (see adapter-external)


@pytest.mark.parametrize(("overlay", "components"), VARIANTS)
def test_every_pod_passes_the_pod_security_level_its_namespace_enforces(
    overlay: str, components: tuple[str, ...]
) -> None:
    objects = render(overlay, components)
    workloads = [o for o in objects if o["kind"] in ("DaemonSet", "Deployment")]
    assert workloads
    for workload in workloads:
        level = namespace_of(objects, workload)["metadata"]["labels"]["pod-security.kubernetes.io/enforce"]
        pod = workload["spec"]["template"]["spec"]
        assert podsecurity.violations(pod, level) == [], (workload["metadata"]["name"], level)
        # The level is the least the pod needs: the agent's host PIDs and socket need `privileged`.
        if level != "restricted":
            stricter = podsecurity.LEVELS[podsecurity.LEVELS.index(level) + 1]
            assert podsecurity.violations(pod, stricter), (workload["metadata"]["name"], stricter)


def adapter_pod() -> dict[str, Any]:
    return copy.deepcopy(one(render("adapter"), "Deployment")["spec"]["template"]["spec"])


@pytest.mark.parametrize(
    ("change", "level"),
    [
        (lambda pod: pod.update(hostPID=True), "baseline"),
        (lambda pod: pod["volumes"].append({"name": "root", "hostPath": {"path": "/"}}), "baseline"),
        (lambda pod: pod["containers"][0]["securityContext"].update(privileged=True), "baseline"),
        (lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]), "baseline"),
        (lambda pod: pod["containers"][0]["ports"][0].update(hostPort=6443), "baseline"),
        (lambda pod: pod["securityContext"].update(seccompProfile={"type": "Unconfined"}), "baseline"),
        (lambda pod: pod["securityContext"].pop("runAsNonRoot"), "restricted"),
        (lambda pod: pod["securityContext"].pop("seccompProfile"), "restricted"),
        (lambda pod: pod["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "restricted"),
        (lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "restricted"),
        (lambda pod: pod["containers"][0]["securityContext"].update(runAsUser=0), "restricted"),
        (lambda pod: pod["volumes"].append({"name": "nfs", "nfs": {"server": "x", "path": "/"}}), "restricted"),
    ],
)
def test_the_pod_security_check_refuses_what_admission_refuses(change: Any, level: str) -> None:
    """The adapter's pod passes `restricted`; each change admission would refuse is caught at its level."""
    assert podsecurity.violations(adapter_pod(), "restricted") == []
    pod = adapter_pod()
    change(pod)
    assert podsecurity.violations(pod, level)


def test_a_namespace_set_with_kustomize_is_followed_or_refused() -> None:
    """A user's kustomization with `namespace:` over one of ours moves every object, the RBAC
    subjects and APIService routes that name our ServiceAccounts and Service, and what the
    ServiceMonitor selects, while the HPA controller's subject stays in kube-system; over an overlay
    holding both the agent's and the adapter's namespaces (two Pod Security levels) it fails."""
    for overlay in OVERLAYS:
        ours = render(overlay)
        if len([o for o in ours if o["kind"] == "Namespace"]) > 1:
            with pytest.raises(subprocess.CalledProcessError) as refused:
                render(overlay, namespace="team-gpu")
            assert "ID conflict" in refused.value.stderr, overlay
            continue
        objects = render(overlay, namespace="team-gpu")
        (namespace,) = [o for o in objects if o["kind"] == "Namespace"]
        assert namespace["metadata"]["name"] == "team-gpu"
        assert namespace["metadata"]["labels"] == one(ours, "Namespace")["metadata"]["labels"], overlay
        accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
        # What lived in our namespace moves; what lived elsewhere (kube-system) must not.
        ours_namespace = one(ours, "Namespace")["metadata"]["name"]
        was = {(o["kind"], o["metadata"]["name"]): o["metadata"].get("namespace") for o in ours}
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                before = was[obj["kind"], obj["metadata"]["name"]]
                expected = "team-gpu" if before == ours_namespace else before
                assert obj["metadata"]["namespace"] == expected, (overlay, obj["kind"], obj["metadata"]["name"])
            for subject in obj.get("subjects", []):
                expected = "team-gpu" if subject["name"] in accounts else "kube-system"
                assert subject["namespace"] == expected, (overlay, obj["metadata"]["name"], subject)
            if obj["kind"] == "APIService":
                assert obj["spec"]["service"]["namespace"] == "team-gpu"
            if obj["kind"] == "ServiceMonitor":
                assert selects_services_in(obj) == {"team-gpu"}
                # The operator reads an endpoint's credentials from the monitor's own namespace.
                secrets = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
                for endpoint in obj["spec"]["endpoints"]:
                    if "authorization" in endpoint:
                        assert endpoint["authorization"]["credentials"]["name"] in secrets, overlay


def test_the_cert_manager_names_follow_the_adapters_namespace(tmp_path: Path) -> None:
    """With the namespace set below the kustomization that adds the component (docs/install.md),
    the Certificate names the Service's DNS names there and cainjector reads that Certificate."""
    inner = tmp_path / "adapter"
    inner.mkdir()
    relative = os.path.relpath(ROOT / "daemonset", inner)
    (inner / "kustomization.yaml").write_text(
        yaml.safe_dump({"namespace": "team-gpu", "resources": [f"{relative}/overlays/adapter-prometheus-operator"]})
    )
    outer = tmp_path / "install"
    outer.mkdir()
    (outer / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "resources": ["../adapter"],
                "components": [f"{os.path.relpath(ROOT / 'daemonset', outer)}/components/cert-manager"],
            }
        )
    )
    text = subprocess.run([kubectl(), "kustomize", str(outer)], capture_output=True, text=True, check=True).stdout
    for objects, namespace in (
        (render(FULLEST, ("cert-manager",)), "gpu-metrics-adapter"),
        ([d for d in yaml.safe_load_all(text) if d], "team-gpu"),
    ):
        (service,) = [s for s in objects if s["kind"] == "Service" and s["metadata"]["name"] == "gpu-metrics-adapter"]
        assert service["metadata"]["namespace"] == namespace
        certificates = {c["metadata"]["name"]: c for c in objects if c["kind"] == "Certificate"}
        assert {c["metadata"]["namespace"] for c in certificates.values()} == {namespace}
        for api_service in (o for o in objects if o["kind"] == "APIService"):
            assert api_service["spec"]["service"] == {
                "name": "gpu-metrics-adapter",
                "namespace": namespace,
                "port": 443,
            }
            assert api_service["spec"]["insecureSkipTLSVerify"] is False and "caBundle" not in api_service["spec"]
            cert_namespace, name = api_service["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")
            assert cert_namespace == namespace
            # kube-apiserver dials <service>.<namespace>.svc and verifies that name.
            assert f"gpu-metrics-adapter.{namespace}.svc" in certificates[name]["spec"]["dnsNames"]
        # Prometheus verifies the adapter against the CA that issued its certificate, by the
        # Service's name (it dials pod IPs), instead of skipping verification.
        (monitor,) = [
            m for m in objects if m["kind"] == "ServiceMonitor" and m["metadata"]["name"] == service["metadata"]["name"]
        ]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["tlsConfig"] == {
            "ca": {"secret": {"name": certificates[name]["spec"]["secretName"], "key": "ca.crt"}},
            "serverName": f"gpu-metrics-adapter.{namespace}.svc",
        }
        assert endpoint["tlsConfig"]["serverName"] in certificates[name]["spec"]["dnsNames"]
        # The adapter serves the Secret cert-manager writes, from the files its flags name.
        deployment = one(objects, "Deployment")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        args = build_parser().parse_args(container["args"])
        (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v]
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert volume["secret"]["secretName"] == certificates[name]["spec"]["secretName"]
        assert {args.tls_cert_file, args.tls_private_key_file} == {
            f"{mount['mountPath']}/tls.crt",
            f"{mount['mountPath']}/tls.key",
        }
        # Every flag of the plain Deployment other than where the pair comes from is kept.
        (plain,) = one(render("adapter"), "Deployment")["spec"]["template"]["spec"]["containers"]
        assert {a for a in plain["args"] if not a.startswith("--cert-dir")} <= set(container["args"])


GPU_NODES = {
    # platform: (node labels, taints) of a GPU node as the platform makes it, without GPU/node feature discovery
    "eks": (
        {
            "karpenter.k8s.aws/instance-gpu-manufacturer": "nvidia",
            "eks.amazonaws.com/instance-gpu-manufacturer": "nvidia",
            "node.kubernetes.io/instance-type": "g5.xlarge",  # a managed node group: no GPU label of EKS's
        },
        [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}],
    ),
    "gke": (
        {"cloud.google.com/gke-accelerator": "nvidia-l4"},
        [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    ),
    "aks": ({"kubernetes.azure.com/accelerator": "nvidia"}, [{"key": "sku", "value": "gpu", "effect": "NoSchedule"}]),
    "gpu-operator": (
        {"nvidia.com/gpu.present": "true"},
        [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    ),
}


@pytest.mark.parametrize("platform", sorted(GPU_NODES))
def test_each_platforms_component_puts_the_agent_on_its_gpu_nodes_and_the_adapter_elsewhere(platform: str) -> None:
    labels, taints = GPU_NODES[platform]
    objects = render(FULLEST, (platform,))
    agent, _ = agent_pod(objects)
    adapter = one(objects, "Deployment")["spec"]["template"]["spec"]
    base_agent, _ = agent_pod(render(FULLEST))
    for label in labels.items():  # whichever of the platform's labels a node has
        assert schedulable(agent["spec"], dict([label]), taints), label
        assert not schedulable(adapter, dict([label]), []), label  # even untainted
        if platform != "gpu-operator":  # GPU feature discovery's label is the base's own
            assert not schedulable(base_agent["spec"], dict([label]), taints), label
    assert not schedulable(agent["spec"], {"kubernetes.io/os": "linux"}, [])
    assert schedulable(adapter, {"kubernetes.io/os": "linux"}, [])


@pytest.mark.parametrize("instance_type", ["m5.large", "g4ad.xlarge", "inf2.xlarge"])
def test_on_eks_nodes_without_an_nvidia_gpu_get_no_agent(instance_type: str) -> None:
    """The instance-type term names NVIDIA types only: CPU, AMD GPU and Inferentia nodes stay free."""
    agent, _ = agent_pod(render(FULLEST, ("eks",)))
    assert not schedulable(agent["spec"], {"node.kubernetes.io/instance-type": instance_type}, [])


def test_nvml_is_reachable_as_each_platform_needs() -> None:
    """The GPU Operator (and any non-default nvidia runtime) runs the agent under RuntimeClass nvidia;
    GKE has no NVIDIA runtime: the driver's host directory is mounted and on the loader's path."""
    for component in ("gpu-operator", "nvidia-runtimeclass"):
        template, _ = agent_pod(render(FULLEST, (component,)))
        assert template["spec"]["runtimeClassName"] == "nvidia"
    template, container = agent_pod(render(FULLEST, ("gke",)))
    host = {v["name"]: v["hostPath"]["path"] for v in template["spec"]["volumes"] if "hostPath" in v}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    (driver,) = [path for path, m in mounts.items() if host[m["name"]] == "/home/kubernetes/bin/nvidia"]
    assert mounts[driver]["readOnly"] is True
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LD_LIBRARY_PATH"] == f"{driver}/lib64"
    assert "runtimeClassName" not in template["spec"]


def test_kube_prometheus_stack_finds_the_monitor_and_rules_and_the_adapter_finds_its_prometheus() -> None:
    objects = render(FULLEST, ("kube-prometheus-stack",))
    selected = [o for o in objects if o["kind"] in ("ServiceMonitor", "PrometheusRule")]
    assert {o["metadata"]["name"] for o in selected if o["kind"] == "ServiceMonitor"} == {
        "gpu-pod-exporter",
        "gpu-metrics-adapter",
    }
    for obj in selected:
        assert obj["metadata"]["labels"]["release"] == "kube-prometheus-stack", obj["metadata"]["name"]
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    # The kubelet expands $(VAR) in args from the container's env.
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]
    assert (
        build_parser().parse_args(args).prometheus_url == "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
    )
