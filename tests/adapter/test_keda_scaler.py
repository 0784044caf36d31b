"""The adapter as KEDA's external scaler: a gRPC client made from KEDA's own proto (the stubs the build
generates from exporter/adapter/keda/externalscaler.proto) calls the adapter over TLS with client
certificates, on the simulated node scraped by a real Prometheus, as KEDA's operator would.

The HPA that KEDA makes from the answers wants the replicas the seed's HPA (a Pods metric, target
average 20) wants for the same pods: the arithmetic of both comes from the controller's own code
(exporter.adapter.hpa, sim.autoscaler)."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import requests
import yaml
from cryptography import x509

from exporter.adapter.hpa import Pod, pods_metric_replicas
from exporter.adapter.keda import externalscaler_pb2 as pb
from exporter.adapter.keda import externalscaler_pb2_grpc as pb_grpc
from exporter.adapter.keda.scaler import GpuScaler
from exporter.adapter.keda.server import ScalerServer, ScalerTls
from exporter.adapter.keda.trigger import INT64_MAX, parse_trigger
from exporter.adapter.main import build_parser
from exporter.adapter.provider import MetricInfo, MetricValue
from exporter.adapter.rules import DEFAULT_RULES
from exporter.adapter.selector import Selector
from exporter.backoff import Backoff
from sim.apiserver import FakeApiServer, pod_json
from sim.autoscaler import external_average_value_replicas
from sim.certs import Pki, issue_client, make_pki
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import adapter_args, free_port, spawn_adapter, spawn_agent, start_adapter
from sim.prometheus import Prometheus
from sim.scenario import Gpu, Scenario, gpu_uuid
from tests.adapter.test_manifests import DAEMONSET, by_kind, container_port
from tests.adapter.test_settings import run_adapter
from tests.adapter.test_trust import until

PODS = {  # name -> (namespace, app label, GPU index or None)
    "bert-a": ("default", "bert", 0),
    "bert-b": ("default", "bert", 1),
    "idle-0": ("default", "idle", None),  # a pod without a GPU: never a value
    "whisper-0": ("speech", "whisper", 2),  # another team's namespace
}
UTILISATION = {0: 22, 1: 18, 2: 45}
TRIGGER = {"metricName": "duty_cycle_current", "podSelector": "app=bert", "targetAverageValue": "20"}


@dataclass
class Node:
    scenario: Path
    prometheus: Prometheus
    adapter_url: str
    scaler_port: int
    pki: Pki
    kubeconfig: Path

    def stub(self, cert: tuple[Path, Path] | None = None, ca: Path | None = None) -> pb_grpc.ExternalScalerStub:
        client_cert, client_key = cert or (self.pki.client_cert, self.pki.client_key)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(ca or self.pki.ca).read_bytes(),
            private_key=client_key.read_bytes(),
            certificate_chain=client_cert.read_bytes(),
        )
        return pb_grpc.ExternalScalerStub(grpc.secure_channel(f"127.0.0.1:{self.scaler_port}", credentials))

    def set_utilisation(self, utilisation: dict[int, int]) -> None:
        Scenario(gpus=[Gpu(gpu_uuid(g), util=u) for g, u in sorted(utilisation.items())]).write(self.scenario)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    directory = tmp_path_factory.mktemp("keda-scaler")
    scenario = directory / "scenario.txt"
    Scenario(gpus=[Gpu(gpu_uuid(g), util=u) for g, u in sorted(UTILISATION.items())]).write(scenario)
    with ExitStack() as running:  # stopped in the reverse order
        kubelet = FakeKubelet(str(directory / "kubelet.sock")).start()
        running.callback(kubelet.stop)
        kubelet.set_pods(
            [
                PodDevices(namespace, name, {"server": [("nvidia.com/gpu", [gpu_uuid(gpu)])]})
                for name, (namespace, _, gpu) in PODS.items()
                if gpu is not None
            ]
        )
        agent_port = free_port()
        running.enter_context(
            spawn_agent(agent_port, scenario, "--no-kubernetes", "--pod-resources-socket", kubelet.socket_path)
        )
        prometheus = Prometheus(directory / "store", [f"127.0.0.1:{agent_port}"], free_port())
        running.callback(prometheus.stop)
        api = FakeApiServer().start()
        running.callback(api.stop)
        for i, (name, (namespace, app, _)) in enumerate(PODS.items()):
            api.apply(pod_json(f"uid-{i}", namespace, name, "gpu-node-1", labels={"app": app}))
        pki = make_pki(directory)
        scaler_port = free_port()
        flags = ("--keda-scaler-port", str(scaler_port), "--keda-scaler-client-ca-file", str(pki.ca))
        kubeconfig = api.write_kubeconfig(directory / "kubeconfig")
        adapter, url = start_adapter(directory, pki, kubeconfig, prometheus.url, *flags)
        running.enter_context(adapter)
        prometheus.wait_for('count(duty_cycle_current{pod!=""}) == 3')
        yield Node(scenario, prometheus, url, scaler_port, pki, kubeconfig)


def ref(namespace: str = "default", **metadata: str) -> pb.ScaledObjectRef:
    """The ScaledObjectRef KEDA sends: the ScaledObject's name and namespace, the trigger's metadata
    (with KEDA's own scalerAddress in it)."""
    given = {"scalerAddress": "gpu-metrics-adapter.gpu-monitoring:7443", **TRIGGER, **metadata}
    return pb.ScaledObjectRef(name="bert", namespace=namespace, scalerMetadata={k: v for k, v in given.items() if v})


def total(stub: pb_grpc.ExternalScalerStub, wanted: float | None = None, **metadata: str) -> float:
    """GetMetrics' value, as KEDA reads it (the float field when above 0); with ``wanted``, retried
    until Prometheus has scraped the GPUs' new utilisation."""
    deadline = time.monotonic() + 20
    while True:
        request = pb.GetMetricsRequest(scaledObjectRef=ref(**metadata), metricName="duty_cycle_current")
        (value,) = stub.GetMetrics(request, timeout=10).metricValues
        assert value.metricName == "duty_cycle_current"
        found = value.metricValueFloat if value.metricValueFloat > 0 else float(value.metricValue)
        if wanted is None or found == wanted or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def seed_hpa_replicas(node: Node, current: int) -> int:
    """The seed's HPA (duty_cycle_current, a Pods metric with an average target of 20) on the values
    the adapter's custom metrics API serves for the same pods."""
    response = requests.get(
        node.adapter_url + "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/%2A/duty_cycle_current",
        params={"labelSelector": "app=bert"},
        headers={"X-Remote-User": "system:serviceaccount:kube-system:horizontal-pod-autoscaler"},
        cert=(str(node.pki.client_cert), str(node.pki.client_key)),
        verify=str(node.pki.ca),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    milli = {item["describedObject"]["name"]: int(float(item["value"]) * 1000) for item in response.json()["items"]}
    return pods_metric_replicas(current, 20_000, [Pod(name) for name in milli], milli).replicas


def keda_hpa_replicas(stub: pb_grpc.ExternalScalerStub, current: int, value: float) -> int:
    """What the HPA KEDA makes (metricType AverageValue) wants, on the target KEDA read from GetMetricSpec."""
    (spec,) = stub.GetMetricSpec(ref(), timeout=10).metricSpecs
    assert spec.metricName == "duty_cycle_current"
    # KEDA hands the HPA milli-quantities: resource.NewMilliQuantity(int64(value * 1000)).
    return external_average_value_replicas(current, int(value * 1000), int(spec.targetSizeFloat * 1000))


def test_kedas_hpa_wants_the_replicas_the_seeds_hpa_wants(node: Node) -> None:
    stub = node.stub()
    try:
        value = total(stub, 40.0)  # pods at 22 and 18: the average 20 times 2 pods
        assert value == 40.0
        assert keda_hpa_replicas(stub, 2, value) == seed_hpa_replicas(node, 2) == 2
        assert stub.IsActive(ref(), timeout=10).result is True
        assert stub.IsActive(ref(activationThreshold="20"), timeout=10).result is False  # the average is not above
        node.set_utilisation({**UTILISATION, 0: 44, 1: 40})
        value = total(stub, 84.0)
        assert keda_hpa_replicas(stub, 2, value) == seed_hpa_replicas(node, 2) == 5
        assert stub.IsActive(ref(activationThreshold="20"), timeout=10).result is True
    finally:
        node.set_utilisation(UTILISATION)


def test_stream_is_active_sends_the_state_at_once(node: Node) -> None:
    stream = node.stub().StreamIsActive(ref(activationThreshold="1000"), timeout=10)
    assert next(stream).result is False
    stream.cancel()


def test_another_namespaces_pods_are_never_read(node: Node) -> None:
    stub = node.stub()
    assert total(stub, 45.0, namespace="speech", podSelector="app=whisper") == 45.0  # its own namespace's pods
    with pytest.raises(grpc.RpcError) as error:
        stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(podSelector="app=whisper")), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND  # from "default": none of its pods is picked
    for key in ("namespace", "podNamespace"):
        with pytest.raises(grpc.RpcError) as error:
            asks_elsewhere = pb.ScaledObjectRef(
                name="bert", namespace="default", scalerMetadata={**TRIGGER, key: "speech"}
            )
            stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=asks_elsewhere), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(error.value.details()).startswith(f"{key}:")


@pytest.mark.parametrize("selector", ["app=idle", "app=nothing-runs-here"])
def test_no_pod_reporting_is_an_error_never_zero(node: Node, selector: str) -> None:
    stub = node.stub()
    for call in (
        lambda: stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref(podSelector=selector)), timeout=10),
        lambda: stub.IsActive(ref(podSelector=selector), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "has a value of duty_cycle_current" in str(error.value.details())


BAD_METADATA = [
    ({"metricName": ""}, "metricName"),
    ({"metricName": "gpu_duty_cycle"}, "metricName"),  # an external metric, not a Pods one
    ({"podSelector": ""}, "podSelector"),
    ({"podSelector": "app in (bert"}, "podSelector"),
    ({"targetAverageValue": "twenty"}, "targetAverageValue"),
    ({"targetAverageValue": "0"}, "targetAverageValue"),
    ({"targetAverageValue": "nan"}, "targetAverageValue"),
    ({"activationThreshold": "-1"}, "activationThreshold"),
    ({"targetAverageValue": "1e300"}, "targetAverageValue"),  # no int64 targetSize carries it
    ({"activationThreshold": "1e19"}, "activationThreshold"),
]


def test_bad_metadata_is_invalid_argument_naming_the_key(node: Node) -> None:
    stub = node.stub()
    calls: tuple[Callable[[pb.ScaledObjectRef], object], ...] = (
        lambda r: stub.GetMetricSpec(r, timeout=10),
        lambda r: stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=r), timeout=10),
        lambda r: stub.IsActive(r, timeout=10),
    )
    for metadata, key in BAD_METADATA:
        for call in calls:
            with pytest.raises(grpc.RpcError) as error:
                call(ref(**metadata))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, metadata
            assert str(error.value.details()).startswith(f"{key}:"), str(error.value.details())
    assert total(stub) > 0  # and the server answers on


def test_a_client_without_a_certificate_of_the_ca_is_refused(node: Node, tmp_path: Path) -> None:
    stranger = make_pki(tmp_path / "stranger")  # a certificate of another CA
    stub = node.stub(cert=(stranger.client_cert, stranger.client_key))
    with pytest.raises(grpc.RpcError) as error:
        stub.GetMetricSpec(ref(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    plain = pb_grpc.ExternalScalerStub(grpc.insecure_channel(f"127.0.0.1:{node.scaler_port}"))
    with pytest.raises(grpc.RpcError) as error:
        plain.GetMetricSpec(ref(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--keda-scaler-port", "7443"], "--keda-scaler-insecure"),  # no client CA: refused unless said
        (["--keda-scaler-port", "70000", "--keda-scaler-insecure"], "--keda-scaler-port"),
        (["--keda-scaler-port", "7443", "--keda-scaler-client-ca-file", "/nonexistent/ca.crt"], "client-ca-file"),
        (["--keda-scaler-insecure"], "want --keda-scaler-port"),
        (["--keda-scaler-allowed-names", "keda-operator"], "want --keda-scaler-port"),
        (["--keda-scaler-port", "7443", "--keda-scaler-insecure", "--keda-scaler-allowed-names", "k"], "allowed-n"),
    ],
)
def test_a_bad_scaler_setting_is_one_line_and_exit_code_2(
    node: Node, tmp_path: Path, args: list[str], named: str
) -> None:
    result = run_adapter(tmp_path, "--kubeconfig", str(node.kubeconfig), *args)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gpu-metrics-adapter: error: ") and named in line, line


class _Provider:
    """A provider whose pods' values block until released, or raise what it is given."""

    def __init__(self, value: float = 30.0) -> None:
        self.fail: Exception | None = None
        self.release = threading.Event()
        self.value = value

    def list_all_metrics(self) -> list[MetricInfo]:
        return [MetricInfo("pods", "duty_cycle_current", True)]

    def get_metric_by_name(self, namespace: str, name: str, info: MetricInfo) -> MetricValue | None:
        return None

    def get_metric_by_selector(self, namespace: str, selector: Selector, info: MetricInfo) -> list[MetricValue]:
        if self.fail is not None:
            raise self.fail
        self.release.wait(5)
        return [MetricValue("Pod", namespace, "bert-a", info.metric, self.value, time.time())]


def test_a_failing_call_is_a_status_and_a_stuck_one_a_deadline_and_the_server_serves_on() -> None:
    provider = _Provider()
    scaler = GpuScaler(provider, lambda namespace, selector: ["bert-a"], deadline_s=0.5, max_streams=1)
    server = ScalerServer(("127.0.0.1", 0), scaler, None)
    server.start()
    try:
        stub = pb_grpc.ExternalScalerStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        provider.fail = ZeroDivisionError("a bug")
        with pytest.raises(grpc.RpcError) as error:
            stub.IsActive(ref(), timeout=5)
        assert error.value.code() == grpc.StatusCode.INTERNAL and "bug" not in str(error.value.details())
        provider.fail = None
        # The first call waits on the backend; an identical one waits for it no longer than the deadline.
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(stub.IsActive, ref(), timeout=5)
            time.sleep(0.2)
            with pytest.raises(grpc.RpcError) as error:
                stub.IsActive(ref(), timeout=5)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            provider.release.set()
            assert first.result().result is True
        # One stream at most: a second is refused at once, not queued behind the first.
        stream = stub.StreamIsActive(ref(), timeout=5)
        assert next(stream).result is True
        with pytest.raises(grpc.RpcError) as error:
            next(stub.StreamIsActive(ref(), timeout=5))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        stream.cancel()
        assert stub.IsActive(ref(), timeout=5).result is True
        with pytest.raises(grpc.RpcError) as error:  # optional in the protocol: KEDA polls GetMetricSpec instead
            next(stub.StreamMetricSpec(ref(), timeout=5))
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop()


def test_a_value_past_int64_is_clamped_not_an_error() -> None:
    """Two pods at the float range's edge: their total is past it, and past int64 by far."""
    provider = _Provider(value=1.5e308)
    provider.release.set()
    scaler = GpuScaler(provider, lambda namespace, selector: ["bert-a", "bert-b"], deadline_s=1, max_streams=1)
    server = ScalerServer(("127.0.0.1", 0), scaler, None)
    server.start()
    try:
        stub = pb_grpc.ExternalScalerStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        (value,) = stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref()), timeout=5).metricValues
        assert (value.metricValue, value.metricValueFloat) == (INT64_MAX, float(INT64_MAX))
        (spec,) = stub.GetMetricSpec(ref(targetAverageValue="9.2e18"), timeout=5).metricSpecs
        assert spec.targetSize == 9_200_000_000_000_000_000
    finally:
        server.stop()


def test_only_client_certificates_with_an_allowed_name_are_served(tmp_path: Path) -> None:
    """Two client certificates from the one CA: KEDA's, named by its CN or by a subject alternative
    name, is served; another team's is refused on every call."""
    pki = make_pki(tmp_path)
    provider = _Provider()
    provider.release.set()
    scaler = GpuScaler(
        provider,
        lambda namespace, selector: ["bert-a"],
        deadline_s=1,
        max_streams=2,
        allowed_names=frozenset({"keda-operator", "keda-operator.keda.svc"}),
    )
    server = ScalerServer(("127.0.0.1", 0), scaler, ScalerTls(str(pki.server_cert), str(pki.server_key), str(pki.ca)))
    server.start()

    def stub(cert: tuple[Path, Path]) -> pb_grpc.ExternalScalerStub:
        credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes(), cert[1].read_bytes(), cert[0].read_bytes())
        return pb_grpc.ExternalScalerStub(grpc.secure_channel(f"127.0.0.1:{server.port}", credentials))

    try:
        for keda in (
            issue_client(pki, "keda-operator", []),
            issue_client(pki, "keda-by-san", [x509.DNSName("keda-operator.keda.svc")]),
        ):
            assert stub(keda).GetMetricSpec(ref(), timeout=5).metricSpecs[0].targetSize == 20
        other = stub(issue_client(pki, "another-team", [x509.DNSName("another-team.svc")]))
        calls: tuple[Callable[[], object], ...] = (
            lambda: other.GetMetricSpec(ref(), timeout=5),
            lambda: other.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref()), timeout=5),
            lambda: other.IsActive(ref(), timeout=5),
            lambda: next(other.StreamIsActive(ref(), timeout=5)),
        )
        for call in calls:
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "CN another-team" in str(error.value.details())
    finally:
        server.stop()


def publish(volume: Path, files: dict[str, Path]) -> None:
    """Writes ``files`` as kubelet updates a Secret volume: a new directory, then ``..data`` swapped to it."""
    version = volume / f"..{time.monotonic_ns()}"
    version.mkdir(parents=True)
    for name, source in files.items():
        shutil.copy(source, version / name)
        if not (volume / name).is_symlink():
            (volume / name).symlink_to(Path("..data") / name)
    (volume / "..data_tmp").symlink_to(version.name)
    (volume / "..data_tmp").replace(volume / "..data")


def test_the_scaler_reloads_its_pair_and_client_ca_and_a_bad_pair_keeps_the_old(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    volume = tmp_path / "secret"
    publish(volume, {"tls.crt": old.server_cert, "tls.key": old.server_key, "ca.crt": old.ca})
    tls = ScalerTls(
        str(volume / "tls.crt"),
        str(volume / "tls.key"),
        str(volume / "ca.crt"),
        refresh_s=0.05,
        backoff=Backoff(initial_s=0.05, cap_s=0.1),
    )
    scaler = GpuScaler(_Provider(), lambda namespace, selector: ["bert-a"], deadline_s=5, max_streams=1)
    server = ScalerServer(("127.0.0.1", 0), scaler, tls)
    server.start()

    def admitted(trusting: Pki, client: Pki) -> bool:
        """Whether a new connection, trusting ``trusting``'s CA, with ``client``'s certificate, is answered."""
        credentials = grpc.ssl_channel_credentials(
            trusting.ca.read_bytes(), client.client_key.read_bytes(), client.client_cert.read_bytes()
        )
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own, never one before
        with grpc.secure_channel(f"127.0.0.1:{server.port}", credentials, options) as channel:
            try:
                pb_grpc.ExternalScalerStub(channel).GetMetricSpec(ref(), timeout=5)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
                return False
            return True

    try:
        assert admitted(old, old)
        # A bad pair (a new certificate with the old key): the old one serves on, logged once.
        publish(volume, {"tls.crt": new.server_cert, "tls.key": old.server_key, "ca.crt": old.ca})
        assert until(lambda: tls.files.loop.state.failures >= 3, 10)
        assert admitted(old, old) and not admitted(new, old)
        # The pair rotated: new connections get the new certificate.
        publish(volume, {"tls.crt": new.server_cert, "tls.key": new.server_key, "ca.crt": old.ca})
        assert until(lambda: admitted(new, old), 10)
        assert not admitted(old, old)
        # The client CA rotated: a client of the new CA is admitted, one of the old CA only is refused.
        publish(volume, {"tls.crt": new.server_cert, "tls.key": new.server_key, "ca.crt": new.ca})
        assert until(lambda: admitted(new, new), 10)
        assert not admitted(new, old)
        messages = [r.getMessage() for r in caplog.records if "reloading the KEDA scaler" in r.getMessage()]
        assert [m for m in messages if "failing" in m] == [messages[0]]
        assert "different pairs" in messages[0] and any("recovered" in m for m in messages)
    finally:
        server.stop()


def test_plain_text_only_when_asked_for_and_then_with_a_warning(node: Node, tmp_path: Path) -> None:
    https_port, port = free_port(), free_port()
    with spawn_adapter(
        https_port,
        *adapter_args(node.pki, node.kubeconfig, node.prometheus.url),
        "--keda-scaler-port",
        str(port),
        "--keda-scaler-insecure",
        output=tmp_path / "adapter.log",
    ) as adapter:
        readyz = f"https://127.0.0.1:{https_port}/readyz"
        adapter.wait_until(lambda: requests.get(readyz, verify=str(node.pki.ca), timeout=5).status_code == 200)
        assert "serves plain text to any client" in adapter.log()
        stub = pb_grpc.ExternalScalerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        assert total(stub, 40.0) == 40.0
        adapter.stop()
        assert adapter.returncode == 0  # SIGTERM stops the scaler too: a clean exit, not a kill


def test_a_scaler_port_in_use_is_one_line_and_exit_code_1(node: Node, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        adapter = spawn_adapter(
            free_port(),
            *adapter_args(node.pki, node.kubeconfig, node.prometheus.url),
            "--keda-scaler-port",
            str(port),
            "--keda-scaler-client-ca-file",
            str(node.pki.ca),
            output=tmp_path / "adapter.log",
        )
        assert adapter.wait(30) == 1
    adapter.stop()  # closes its log
    assert f"cannot serve the KEDA scaler: cannot listen on 127.0.0.1:{port}" in adapter.log()
    assert "Traceback" not in adapter.log()


OVERLAY = DAEMONSET / "overlays" / "adapter-keda-scaler"
EXAMPLE = DAEMONSET / "adapter" / "examples" / "keda-external-scaledobject.yaml"


def adapter_service() -> list[dict[str, Any]]:
    return [s for s in by_kind("Service", OVERLAY) if s["metadata"]["name"] == "gpu-metrics-adapter"]


def test_the_scaler_is_off_unless_the_overlay_serves_it_on_the_services_port() -> None:
    (plain,) = by_kind("Deployment")
    (plain_container,) = plain["spec"]["template"]["spec"]["containers"]
    assert build_parser().parse_args(plain_container["args"]).keda_scaler_port is None
    (deployment,) = by_kind("Deployment", OVERLAY)
    (service,) = adapter_service()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = build_parser().parse_args(container["args"])
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == "keda-scaler"]
    assert container_port(container, port["targetPort"]) == args.keda_scaler_port
    # The serving pair KEDA checks and the CA of KEDA's client certificate, from one mounted Secret.
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "keda-scaler-tls"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "keda-scaler-tls"]
    assert volume["secret"]["secretName"] == "gpu-metrics-adapter-keda-tls"
    for path in (args.keda_scaler_client_ca_file, args.tls_cert_file, args.tls_private_key_file):
        assert Path(path).parent == Path(mount["mountPath"]), path
    assert not args.keda_scaler_insecure


def test_the_example_reaches_the_overlays_scaler_with_a_client_certificate() -> None:
    authentication, scaled = yaml.safe_load_all(EXAMPLE.read_text())
    jsonschema.validate(scaled, json.loads((Path(__file__).parent / "schemas" / "scaledobject.json").read_text()))
    assert (authentication["kind"], authentication["apiVersion"]) == ("TriggerAuthentication", "keda.sh/v1alpha1")
    assert authentication["metadata"]["namespace"] == scaled["metadata"]["namespace"]
    parameters = {ref["parameter"] for ref in authentication["spec"]["secretTargetRef"]}
    assert parameters == {"caCert", "tlsClientCert", "tlsClientKey"}  # KEDA's names for the external scaler
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["authenticationRef"] == {"name": authentication["metadata"]["name"]}
    assert (trigger["type"], trigger["metricType"]) == ("external", "AverageValue")
    (service,) = adapter_service()
    (port,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "keda-scaler"]
    metadata = trigger["metadata"]
    assert metadata["scalerAddress"] == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port}"
    pod_metrics = frozenset(rule.name for rule in DEFAULT_RULES.custom)
    served = parse_trigger(scaled["metadata"]["namespace"], metadata, pod_metrics)
    assert (served.metric, served.target) == ("duty_cycle_current", 20)
    assert served.pod_selector.matches({"app": scaled["spec"]["scaleTargetRef"]["name"]})
    assert scaled["spec"]["minReplicaCount"] >= 1  # no pods, no values: never woken from zero by them
