"""The adapter's manifests (daemonset/adapter): they fit together and match the adapter's flags."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests
import yaml

from exporter.adapter import main as adapter_main
from exporter.adapter.main import build_parser
from exporter.adapter.server import METRICS_PATH
from sim.apiserver import Call, FakeApiServer
from sim.certs import Pki, make_pki
from sim.processes import free_port, spawn_adapter
from tests.adapter.test_trust import CONFIG_MAP, published

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


def container_port(container: dict[str, Any], port: str | int) -> int:
    """The number a probe's or Service's port (a name or a number) reaches in the container."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


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
    # What "ready" means is test_the_adapter_started_as_deployed_is_probed_routed_and_authorized's.


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
    listening = build_parser().parse_args(container["args"]).secure_port
    assert [container_port(container, p["targetPort"]) for p in service["spec"]["ports"]] == [listening]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container_port(container, container[probe]["httpGet"]["port"]) == listening, probe


def test_deployment_runs_the_adapter_with_flags_it_accepts() -> None:
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    # The image's command is the console script that runs the adapter (setup.cfg's entry points).
    setup = configparser.ConfigParser()
    setup.read(DAEMONSET.parent / "setup.cfg")
    scripts = dict(line.split(" = ") for line in setup["options.entry_points"]["console_scripts"].strip().splitlines())
    (command,) = container["command"]
    assert scripts[command] == f"{adapter_main.__name__}:{adapter_main.main.__name__}"
    build_parser().parse_args(container["args"])  # exits 2 on a flag the adapter does not know
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    cert_dir = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--cert-dir="))
    assert cert_dir in mounts  # the self-signed pair needs somewhere writable


# Kubernetes' bootstrap roles the manifests bind to (plugin/pkg/auth/authorizer/rbac/bootstrappolicy):
# (namespace or "" for cluster-wide, API group, resource, verb) each grants.
BUILT_IN = {
    ("ClusterRole", "system:auth-delegator"): {
        ("", "authentication.k8s.io", "tokenreviews", "create"),
        ("", "authorization.k8s.io", "subjectaccessreviews", "create"),
    },
}


def requested(calls: list[Call]) -> set[tuple[str, str, str, str]]:
    """(namespace, API group, resource, verb) of each resource request, as the authorizer sees it."""
    found = set()
    for call in calls:
        parts = call.path.strip("/").split("/")
        group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
        namespace = ""
        if rest[0] == "namespaces" and len(rest) > 2:
            namespace, rest = rest[1], rest[2:]
        reads = "watch" if call.is_watch else ("list" if len(rest) == 1 else "get")
        verb = "create" if call.method == "POST" else reads
        found.add((namespace, group, rest[0], verb))
    return found


def granted(objects: list[dict[str, Any]], subject: dict[str, str]) -> dict[str, set[tuple[str, str, str, str]]]:
    """Role name -> what it grants the subject through the bindings; our roles from the manifests,
    the bootstrap ones from BUILT_IN."""
    ours = {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] in ("ClusterRole", "Role")}
    grants = {}
    for binding in objects:
        if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding") or subject not in binding["subjects"]:
            continue
        ref = (binding["roleRef"]["kind"], binding["roleRef"]["name"])
        where = binding["metadata"].get("namespace", "") if binding["kind"] == "RoleBinding" else ""
        if ref in BUILT_IN:
            rules = BUILT_IN[ref]
        else:
            rules = {
                (where, group, resource, verb)
                for rule in ours[ref]["rules"]
                for group in rule["apiGroups"]
                for resource in rule["resources"]
                for verb in rule["verbs"]
            }
        grants[ref[1]] = {(where, g, r, v) for (_, g, r, v) in rules}
    return grants


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[tuple[str, FakeApiServer, Pki]]:
    """The adapter run with the Deployment's args (its port, serving-cert folder and Prometheus
    moved here) against the API stand-in, which publishes the front proxy's CA as kube-apiserver
    does."""
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    moved = ("--secure-port", "--cert-dir", "--prometheus-url")
    args = [a for a in container["args"] if not a.startswith(moved)]
    api = FakeApiServer().start()
    pki = make_pki(tmp_path / "pki")
    api.config_maps[CONFIG_MAP] = published(pki)
    port = free_port()
    process = spawn_adapter(
        port,
        *args,
        f"--cert-dir={tmp_path / 'serving-cert'}",
        f"--prometheus-url=http://127.0.0.1:{free_port()}",  # discovery needs no Prometheus
        # In a pod the adapter reads its namespace from its service account's files.
        f"--service-namespace={deployment['metadata']['namespace']}",
        "--kubeconfig",
        str(api.write_kubeconfig(tmp_path / "kubeconfig")),
        output=tmp_path / "adapter.log",
    )
    try:
        process.wait_for_port(port)
        yield f"https://127.0.0.1:{port}", api, pki
    finally:
        process.stop()
        api.stop()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # as the kubelet
def test_the_adapter_started_as_deployed_is_probed_routed_and_authorized(
    deployed: tuple[str, FakeApiServer, Pki],
) -> None:
    """The kubelet probes without credentials and without verifying the self-signed certificate;
    kube-apiserver's front proxy and a bearer token reach the API; the RBAC grants every request the
    adapter makes, and the roles the manifests define grant nothing it never asks for."""
    url, api, pki = deployed
    (deployment,) = by_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["scheme"] == "HTTPS"
        deadline = time.monotonic() + 20
        while (status := requests.get(url + get["path"], verify=False, timeout=5).status_code) != 200:
            assert status == 503 and time.monotonic() < deadline, (probe, status)  # 503 until the pods are synced
            time.sleep(0.2)
    hpa = "system:serviceaccount:kube-system:horizontal-pod-autoscaler"
    api.tokens["hpa-token"] = (hpa, ["system:serviceaccounts"])
    discovery = url + "/apis/custom.metrics.k8s.io/v1beta2"
    proxied = requests.get(
        discovery,
        headers={"X-Remote-User": hpa},
        cert=(str(pki.client_cert), str(pki.client_key)),
        verify=False,
        timeout=10,
    )
    bearer = requests.get(discovery, headers={"Authorization": "Bearer hpa-token"}, verify=False, timeout=10)
    assert (proxied.status_code, bearer.status_code) == (200, 200)

    account = {
        "kind": "ServiceAccount",
        "name": deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "namespace": deployment["metadata"]["namespace"],
    }
    grants = granted(rendered(), account)
    made = requested(api.calls)
    every = set().union(*grants.values())
    # A ClusterRoleBinding's grant (namespace "") holds in every namespace.
    assert all(request in every or ("", *request[1:]) in every for request in made), made - every
    for role, rules in grants.items():
        if all(name != role for _, name in BUILT_IN):
            unused = {rule for rule in rules if not any(rule[0] in ("", m[0]) and rule[1:] == m[1:] for m in made)}
            assert not unused, (role, unused)  # never more than it uses


@pytest.mark.parametrize(
    "directory", [DIRECTORY, DAEMONSET / "overlays/adapter", DAEMONSET / "overlays/adapter-external"]
)
def test_the_hpa_may_read_exactly_the_metrics_apis_routed_to_the_adapter(directory: Path) -> None:
    roles = {d["metadata"]["name"]: d for d in by_kind("ClusterRole", directory)}
    bindings = {d["roleRef"]["name"]: d for d in by_kind("ClusterRoleBinding", directory)}
    (service,) = [s for s in by_kind("Service", directory) if s["metadata"]["name"] == "gpu-metrics-adapter"]
    routed = {
        d["spec"]["group"]
        for d in by_kind("APIService", directory)
        if d["spec"]["service"]["name"] == service["metadata"]["name"]
    }
    for name, binding in bindings.items():
        hpa = {"kind": "ServiceAccount", "name": "horizontal-pod-autoscaler", "namespace": "kube-system"}
        if hpa in binding["subjects"]:
            (rule,) = roles[name]["rules"]
            assert set(rule["apiGroups"]) == routed and {"get", "list"} <= set(rule["verbs"])
            break
    else:
        pytest.fail("no role binds the HPA controller to the metrics APIs")


def test_the_example_hpa_targets_an_average_duty_cycle_of_20() -> None:
    hpa = yaml.safe_load((DIRECTORY / "examples" / "hpa-v2.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "duty_cycle_current"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "20"}


def test_every_example_uses_an_api_the_claimed_kubernetes_versions_serve() -> None:
    """The README requires Kubernetes 1.29+: no example in an API version removed before it
    (autoscaling/v2beta1 and v2beta2 were gone by 1.26)."""
    removed = {"autoscaling/v2beta1", "autoscaling/v2beta2"}
    for path in sorted((DIRECTORY / "examples").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["apiVersion"] not in removed, path.name


def test_the_servicemonitor_scrapes_the_adapters_own_metrics_over_https() -> None:
    """The adapter with its Prometheus Operator objects: the ServiceMonitor reaches the adapter's
    Service and presents a token the adapter's SubjectAccessReview allows `get /metrics` for."""
    overlay = DAEMONSET / "overlays" / "adapter-prometheus-operator"
    objects = rendered(overlay)
    assert not [d for d in rendered() if d["apiVersion"].startswith("monitoring.coreos.com/")]  # no operator CRDs
    (monitor,) = [d for d in objects if d["kind"] == "ServiceMonitor"]
    schema = DAEMONSET.parent / "tests" / "schemas" / "servicemonitor.json"
    jsonschema.validate(monitor, json.loads(schema.read_text()))
    (service,) = [d for d in objects if d["kind"] == "Service"]
    assert matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert "namespaceSelector" not in monitor["spec"]  # its own namespace: it moves with the Service
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert (endpoint["scheme"], endpoint["path"]) == ("https", METRICS_PATH)
    # /metrics is authorized by a SubjectAccessReview, as kube-apiserver's: the bearer token is a
    # ServiceAccount's, from a Secret in the monitor's namespace, bound to `get` on that path.
    assert endpoint["authorization"].get("type", "Bearer") == "Bearer"
    credentials = endpoint["authorization"]["credentials"]
    (secret,) = [
        d
        for d in objects
        if d["kind"] == "Secret"
        and d["metadata"]["name"] == credentials["name"]
        and d["metadata"]["namespace"] == monitor["metadata"]["namespace"]
    ]
    assert secret["type"] == "kubernetes.io/service-account-token" and credentials["key"] == "token"
    subject = {
        "kind": "ServiceAccount",
        "name": secret["metadata"]["annotations"]["kubernetes.io/service-account.name"],
        "namespace": secret["metadata"]["namespace"],
    }
    assert subject["name"] in {d["metadata"]["name"] for d in objects if d["kind"] == "ServiceAccount"}
    roles = {d["metadata"]["name"]: d for d in objects if d["kind"] == "ClusterRole"}
    allowed = {
        (url, verb)
        for binding in objects
        if binding["kind"] == "ClusterRoleBinding" and subject in binding["subjects"]
        for rule in roles[binding["roleRef"]["name"]]["rules"]
        for url in rule.get("nonResourceURLs", [])
        for verb in rule["verbs"]
    }
    assert allowed == {(METRICS_PATH, "get")}
