"""The adapter's default ``sm_active_current`` rule: a pod's average GPM SM activity, in percent,
over the GPUs it holds alone; absent for a pod on a shared GPU (the device's activity is not its
own) and on GPUs without GPM. The rule's query runs on a real Prometheus scraping the agent on a
simulated node; the adapter's plumbing around a rule is tested in tests/adapter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.adapter.prometheus import pods_query
from exporter.adapter.rules import DEFAULT_RULES
from sim.fakelib import build_fake_nvml
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import free_port
from sim.prometheus import Prometheus
from sim.scenario import Gpu, Scenario, gpu_uuid
from tests.conftest import AgentProcess


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    directory = tmp_path_factory.mktemp("sm-active")
    scenario = directory / "scenario.txt"
    Scenario(
        gpus=[
            Gpu(gpu_uuid(0), util=90, sm_active=63.5),
            Gpu(gpu_uuid(1), util=90, sm_active=20.0),
            Gpu(gpu_uuid(2), util=90, sm_active=80.0),  # shared by two pods
            Gpu(gpu_uuid(3), util=90, sm_active=40.0),
            Gpu(gpu_uuid(4), name="NVIDIA A100-SXM4-80GB", util=90, sm_active=50.0),  # no GPM
        ]
    ).write(scenario)
    kubelet = FakeKubelet(str(directory / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            PodDevices("default", "bert-a", {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]}),
            PodDevices("default", "bert-b", {"server": [("nvidia.com/gpu", [gpu_uuid(1), gpu_uuid(3)])]}),
            PodDevices("default", "asr-0", {"asr": [("nvidia.com/gpu.shared", [gpu_uuid(2) + "::0"])]}),
            PodDevices("default", "asr-1", {"asr": [("nvidia.com/gpu.shared", [gpu_uuid(2) + "::1"])]}),
            PodDevices("default", "old", {"server": [("nvidia.com/gpu", [gpu_uuid(4)])]}),
        ]
    )
    agent = AgentProcess(
        ["--no-kubernetes", "--node-name", "gpu-node-1", "--pod-resources-socket", kubelet.socket_path],
        scenario,
        build_fake_nvml().parent,
        directory / "agent.log",
    )
    store = Prometheus(directory / "prometheus", [f"127.0.0.1:{agent.port}"], free_port())
    try:
        store.wait_for('count(gpu_sm_active_ratio) == 4 and count(gpu_pod_info{pod!=""}) == 6')
        yield store
    finally:
        store.stop()
        agent.stop()
        kubelet.stop()


def sm_active_current(prometheus: Prometheus, namespace: str) -> dict[str, float]:
    """The rule's value per pod of a namespace, by the very query the adapter sends for it (each
    pod's value and its newest sample's time, told apart by a label)."""
    rule = DEFAULT_RULES.custom_rule("sm_active_current")
    assert rule is not None
    return {
        r["metric"]["pod"]: float(r["value"][1])
        for r in prometheus.query(pods_query(rule, namespace))
        if r["metric"].get("gpu_adapter_field") == "value"
    }


def test_a_pods_sm_activity_over_the_gpus_it_holds_alone(prometheus: Prometheus) -> None:
    # bert-b: (20 + 40) / 2. asr-0/asr-1 share GPU 2: absent, not the device's 80. old: no GPM.
    assert sm_active_current(prometheus, "default") == pytest.approx({"bert-a": 63.5, "bert-b": 30.0})
    assert sm_active_current(prometheus, "speech") == {}


def test_the_timestamp_series_carries_the_pod_labels(prometheus: Prometheus) -> None:
    """The adapter dates an answer by ``timestamp(<seriesQuery>{namespace=...,pod=...})``."""
    rule = DEFAULT_RULES.custom_rule("sm_active_current")
    assert rule is not None
    found = prometheus.query(f'timestamp({rule.series_query}{{namespace="default",pod="bert-a"}})')
    assert len(found) == 1


def test_the_example_hpa_scales_bert_on_it() -> None:
    import yaml

    path = Path(__file__).resolve().parents[2] / "daemonset" / "adapter" / "examples" / "hpa-sm-active.yaml"
    hpa = yaml.safe_load(path.read_text())
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "bert-intent-detection"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "sm_active_current"
    assert DEFAULT_RULES.custom_rule("sm_active_current") is not None
