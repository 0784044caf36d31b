"""Shared fixtures: the fake NVML library, scenarios, and an agent run as a real process."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from sim.apiserver import FakeApiServer, pod_json
from sim.fakelib import build_fake_nvml
from sim.kubelet import FakeKubelet, PodDevices
from sim.processes import free_port, spawn_agent
from sim.procfs import FakeProc, systemd_v2
from sim.scenario import Gpu, Proc, Scenario, gpu_uuid

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def fake_nvml() -> Path:
    """Builds the fake library and loads it by path, so pynvml's CDLL("libnvidia-ml.so.1") in this
    process resolves to it by soname (as it would to the driver's on a GPU node)."""
    path = build_fake_nvml()
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    return path


@pytest.fixture
def scenario_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_nvml: Path) -> Path:
    path = tmp_path / "scenario.txt"
    Scenario().write(path)
    monkeypatch.setenv("FAKE_NVML_SCENARIO", str(path))
    return path


@pytest.fixture
def nvml_reader(scenario_file: Path) -> Iterator:  # type: ignore[type-arg]
    """Makes NvmlReaders over the fake library and closes them after the test (their threads and
    NVML event sets would otherwise outlive it)."""
    from exporter.sources.nvml import NvmlReader

    readers: list[NvmlReader] = []

    def make(**kwargs: object) -> NvmlReader:
        readers.append(NvmlReader(**kwargs))  # type: ignore[arg-type]
        return readers[-1]

    yield make
    for reader in readers:
        reader.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    """Samples by name and label set; a series exposed twice fails the test (Prometheus would
    reject the scrape, and a dict would hide it)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{sample.name}{sample.labels} is exposed twice"
            samples[key] = sample.value
    return samples


def find(samples: Samples, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return [(dict(lbls), v) for (n, lbls), v in samples.items() if n == name and wanted <= lbls]


class AgentProcess:
    """``python -m exporter`` as users run it, with the fake NVML library on its library path."""

    def __init__(
        self, args: list[str], scenario: Path | None, lib_dir: Path | None, log_path: Path, ca: Path | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.port}"
        self.verify: str | bool = str(ca) if ca else True
        self.log_path = log_path
        self.process = spawn_agent(
            self.port, scenario, *args, library_dir=lib_dir or Path("/nonexistent"), output=log_path
        )
        self.process.wait_for_port(self.port)

    def log(self) -> str:
        return self.process.log()

    def scrape(self) -> Samples:
        response = requests.get(self.url + "/metrics", timeout=5)
        response.raise_for_status()
        return parse_samples(response.text)

    def wait_for(self, condition, timeout_s: float = 10.0, what: str = "condition") -> Samples:  # type: ignore[no-untyped-def]
        """Scrapes until ``condition(samples)`` holds; fails with the last scrape and the log."""
        deadline = time.monotonic() + timeout_s
        samples: Samples = {}
        while time.monotonic() < deadline:
            samples = self.scrape()
            if condition(samples):
                return samples
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}; last scrape:\n{samples}\nlog:\n{self.log()}")

    def stop(self) -> float:
        """SIGTERM; returns how long the agent took to exit."""
        return self.process.stop()


@pytest.fixture
def start_agent(tmp_path: Path, fake_nvml: Path) -> Iterator:  # type: ignore[type-arg]
    agents: list[AgentProcess] = []

    def start(
        args: list[str],
        scenario: Path | None,
        with_library: bool = True,
        ca: Path | None = None,
        library_dir: Path | None = None,
    ) -> AgentProcess:
        """``library_dir`` overrides where the agent looks for libnvidia-ml.so.1."""
        lib_dir = library_dir or (fake_nvml.parent if with_library else None)
        agent = AgentProcess(args, scenario, lib_dir, tmp_path / f"agent{len(agents)}.log", ca)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()


NODE = "gpu-node-1"
BERT = "bert-intent-detection-6d5f8b7c9-x2x4q"
BERT_UID = "0f8fad5b-d9cb-469f-a165-70867728950e"
BERT_CID = "1" * 64


class Node:
    """A simulated GPU node: NVML scenario, kubelet, /proc and the pods API."""

    def __init__(self, tmp_path: Path) -> None:
        self.scenario_path = tmp_path / "scenario.txt"
        self.scenario = Scenario(
            gpus=[Gpu(gpu_uuid(0), util=42, used=9_000_000_000, temp=65, power=250_000), Gpu(gpu_uuid(1), util=3)],
            procs=[Proc(gpu=0, pid=4242, mem=8_000_000_000, sm=40)],
        )
        self.scenario.write(self.scenario_path)
        self.kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
        self.kubelet.set_pods([PodDevices("default", BERT, {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]})])
        self.proc = FakeProc(tmp_path / "proc")
        self.proc.add(4242, systemd_v2(BERT_UID, BERT_CID))
        self.api = FakeApiServer().start()
        self.api.apply(pod_json(BERT_UID, "default", BERT, NODE, containers={"server": BERT_CID}))
        self.kubeconfig = self.api.write_kubeconfig(tmp_path / "kubeconfig")

    def args(self) -> list[str]:
        return [
            "--node-name",
            NODE,
            "--interval",
            "0.2",
            "--pod-resources-socket",
            self.kubelet.socket_path,
            "--proc-root",
            str(self.proc.root),
            "--kubeconfig",
            str(self.kubeconfig),
        ]

    def stop(self) -> None:
        self.kubelet.stop()
        self.api.stop()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    simulated = Node(tmp_path)
    yield simulated
    simulated.stop()
