"""The pod-resources client against a real gRPC server on a unix socket."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from exporter.model import Allocation, ClaimAllocation, ProcessOwner
from exporter.sources.podresources.client import PodResourcesClient
from exporter.sources.podsources import PodSources
from exporter.sources.procfs import ProcReader
from sim.kubelet import Claim, ClaimDevice, FakeKubelet, PodDevices
from sim.scenario import gpu_uuid

BERT = PodDevices("default", "bert-intent-detection-7c9f", {"server": [("nvidia.com/gpu", [gpu_uuid(0)])]})


def test_lists_device_allocations(tmp_path: Path) -> None:
    kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            BERT,
            PodDevices(
                "ml",
                "trainer",
                {
                    "a": [("nvidia.com/gpu", [gpu_uuid(1), gpu_uuid(2)]), ("cpu", [])],
                    "b": [("example.com/nic", ["eth1"])],
                },
            ),
        ]
    )
    client = PodResourcesClient(kubelet.socket_path)
    try:
        assert client.list_allocations() == [
            Allocation("default", "bert-intent-detection-7c9f", "server", "nvidia.com/gpu", gpu_uuid(0)),
            Allocation("ml", "trainer", "a", "nvidia.com/gpu", gpu_uuid(1)),
            Allocation("ml", "trainer", "a", "nvidia.com/gpu", gpu_uuid(2)),
            Allocation("ml", "trainer", "b", "example.com/nic", "eth1"),
        ]
        assert client.up
    finally:
        kubelet.stop()


def test_lists_dynamic_resource_allocation_claims_beside_device_plugin_devices(tmp_path: Path) -> None:
    gpu0 = ClaimDevice("gpu.nvidia.com", "node-1", "gpu-0")
    shared = ClaimDevice("gpu.nvidia.com", "node-1", "gpu-1", share_id="7f3c")
    kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
    kubelet.set_pods(
        [
            BERT,
            PodDevices(
                "ml",
                "llm",
                claims={"server": [Claim("ml", "llm-gpu", (gpu0,)), Claim("shared", "pool-claim", (shared,))]},
            ),
        ]
    )
    client = PodResourcesClient(kubelet.socket_path)
    try:
        assert client.list_allocations() == [
            Allocation("default", "bert-intent-detection-7c9f", "server", "nvidia.com/gpu", gpu_uuid(0)),
            ClaimAllocation("ml", "llm", "server", "gpu.nvidia.com", "gpu-0", "ml", "llm-gpu", "node-1", None),
            ClaimAllocation("ml", "llm", "server", "gpu.nvidia.com", "gpu-1", "shared", "pool-claim", "node-1", "7f3c"),
        ]
        kubelet.dynamic_resources = False  # a kubelet before 1.34, or with the gate off: devices only, as before
        assert client.list_allocations() == [
            Allocation("default", "bert-intent-detection-7c9f", "server", "nvidia.com/gpu", gpu_uuid(0))
        ]
    finally:
        kubelet.stop()


def test_answers_larger_than_grpcs_default_4mib_limit(tmp_path: Path) -> None:
    kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
    # ~6 MiB of allocations, as on a large node with many pods and devices.
    kubelet.set_pods(
        [
            PodDevices("ns", f"pod-{i:05d}-" + "x" * 200, {"c": [("nvidia.com/gpu", [gpu_uuid(i) + "::" + "9" * 100])]})
            for i in range(20_000)
        ]
    )
    client = PodResourcesClient(kubelet.socket_path)
    try:
        allocations = client.list_allocations()
        assert allocations is not None and len(allocations) == 20_000
    finally:
        kubelet.stop()


def test_missing_socket_then_kubelet_starts(tmp_path: Path) -> None:
    path = str(tmp_path / "kubelet.sock")
    client = PodResourcesClient(path, timeout_s=1.0)
    assert client.list_allocations() is None
    assert not client.up and client.errors["UNAVAILABLE"] == 1
    kubelet = FakeKubelet(path).start()
    kubelet.set_pods([BERT])
    try:
        deadline = time.monotonic() + 10
        while (allocations := client.list_allocations()) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert allocations is not None and allocations[0].pod == "bert-intent-detection-7c9f"
    finally:
        kubelet.stop()


def test_a_kubelet_restarted_on_the_same_socket_is_reached_again(tmp_path: Path) -> None:
    path = str(tmp_path / "kubelet.sock")
    kubelet = FakeKubelet(path).start()
    kubelet.set_pods([BERT])
    client = PodResourcesClient(path, timeout_s=1.0)
    try:
        assert client.list_allocations()
        kubelet.stop()
        assert client.list_allocations() is None and not client.up
        kubelet = FakeKubelet(path).start()
        kubelet.set_pods([BERT])
        deadline = time.monotonic() + 10
        while not client.list_allocations() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.up
    finally:
        kubelet.stop()


def test_a_failing_kubelet_is_asked_with_backoff_not_every_poll(tmp_path: Path) -> None:
    kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
    kubelet.exhausted = True  # the kubelet's rate limit answers RESOURCE_EXHAUSTED
    sources = PodSources(PodResourcesClient(kubelet.socket_path), ProcReader(str(tmp_path)), interval_s=0.1)
    sources.start()
    try:
        time.sleep(3.0)  # thirty intervals
        # Doubling from one interval: about six calls, where asking every interval made thirty.
        assert 2 <= kubelet.calls <= 8, kubelet.calls
        assert not sources.view().pod_resources_up
        kubelet.exhausted = False
        kubelet.set_pods([BERT])
        deadline = time.monotonic() + 15
        while not sources.view().allocations and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sources.view().pod_resources_up and sources.view().allocations
    finally:
        sources.stop()
        sources.join(2.0)
        kubelet.stop()


def test_slow_kubelet_times_out(tmp_path: Path) -> None:
    kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
    kubelet.delay_s = 2.0
    client = PodResourcesClient(kubelet.socket_path, timeout_s=0.3)
    try:
        started = time.monotonic()
        assert client.list_allocations() is None
        assert time.monotonic() - started < 1.5
        assert client.errors["DEADLINE_EXCEEDED"] == 1
    finally:
        kubelet.stop()


class _FailingProc(ProcReader):
    """/proc as read on a node where reading it raises what nobody expected, until ``healed``."""

    healed = False

    def owners(self, pids: Iterable[int]) -> dict[int, ProcessOwner | None]:
        if not self.healed:
            raise UnicodeDecodeError("utf-8", b"\xfe", 0, 1, "invalid start byte")
        return super().owners(pids)


def test_a_refresh_that_keeps_failing_logs_once_and_once_more_when_it_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet = FakeKubelet(str(tmp_path / "kubelet.sock")).start()
    procs = _FailingProc(str(tmp_path))
    sources = PodSources(PodResourcesClient(kubelet.socket_path), procs, interval_s=0.05)
    caplog.set_level(logging.INFO, logger="exporter.sources.podsources")
    sources.start()
    try:
        time.sleep(1.0)  # twenty intervals, every one failing
        failed = [r for r in caplog.records if "failing" in r.getMessage()]
        assert len(failed) == 1
        procs.healed = True
        deadline = time.monotonic() + 5
        while not any("recovered" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    finally:
        sources.stop()
        sources.join(2.0)
        kubelet.stop()
