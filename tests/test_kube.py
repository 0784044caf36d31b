"""The pod watch against a server speaking the Kubernetes API's pods list/watch JSON."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from exporter.kube import PodWatcher
from tests.sim.apiserver import FakeApiServer, pod_json

NODE = "gpu-node-1"


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    yield server
    server.stop()


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.fixture
def watcher(api: FakeApiServer, tmp_path: Path) -> Iterator[PodWatcher]:
    """A watcher on NODE through the fake API, already holding pod bert-0 and with its watch open."""
    api.apply(pod_json("uid-1", "default", "bert-0", NODE))
    pods = PodWatcher(NODE, str(api.write_kubeconfig(tmp_path / "kubeconfig")), retry_s=0.1)
    pods.start()
    eventually(lambda: names(pods) == {"bert-0"})
    eventually(lambda: len(api.watch_requests()) == 1)
    yield pods
    pods.stop()


def names(watcher: PodWatcher) -> set[str]:
    return {p.name for p in (watcher.pods or {}).values()}


def test_lists_then_follows_the_pods_of_this_node_only(api: FakeApiServer, tmp_path: Path) -> None:
    api.apply(pod_json("uid-1", "default", "bert-0", NODE, containers={"server": "c" * 64}))
    api.apply(pod_json("uid-x", "default", "elsewhere", "other-node"))
    watcher = PodWatcher(NODE, str(api.write_kubeconfig(tmp_path / "kubeconfig")), retry_s=0.1)
    assert watcher.pods is None  # unknown before the first list, not "no pods"
    watcher.start()
    try:
        eventually(lambda: names(watcher) == {"bert-0"})
        pod = (watcher.pods or {})["uid-1"]
        assert (pod.namespace, pod.phase, dict(pod.container_names)) == ("default", "Running", {"c" * 64: "server"})
        assert watcher.up
        assert api.requests[0]["fieldSelector"] == [f"spec.nodeName={NODE}"]

        api.apply(pod_json("uid-2", "default", "bert-1", NODE))
        eventually(lambda: names(watcher) == {"bert-0", "bert-1"})
        api.apply(pod_json("uid-2", "default", "bert-1", NODE, phase="Succeeded"))
        eventually(lambda: (watcher.pods or {})["uid-2"].finished)
        api.delete("uid-1")
        eventually(lambda: names(watcher) == {"bert-1"})
    finally:
        watcher.stop()


def test_a_broken_watch_resumes_from_the_last_version_without_relisting(
    api: FakeApiServer, watcher: PodWatcher
) -> None:
    api.apply(pod_json("uid-2", "default", "bert-1", NODE))
    eventually(lambda: names(watcher) == {"bert-0", "bert-1"})
    api.break_watches()
    api.apply(pod_json("uid-3", "default", "bert-2", NODE))  # happens while no watch is open
    eventually(lambda: names(watcher) == {"bert-0", "bert-1", "bert-2"})
    lists = [q for q in api.requests if "watch" not in q]
    assert len(lists) == 1
    resumed = api.watch_requests()[1]["resourceVersion"][0]
    assert int(resumed) == 102  # the version of the last event seen before the break


def test_an_expired_watch_relists(api: FakeApiServer, watcher: PodWatcher) -> None:
    api.compact()  # history gone: resuming would get 410 Gone
    api.delete("uid-1")
    api.apply(pod_json("uid-2", "default", "bert-1", NODE))
    api.compact()
    eventually(lambda: names(watcher) == {"bert-1"})
    assert len([q for q in api.requests if "watch" not in q]) >= 2


def test_unreachable_api_is_reported_down_and_pods_stay_unknown(tmp_path: Path) -> None:
    server = FakeApiServer().start()
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    server.stop()  # nothing listens on its port any more
    watcher = PodWatcher(NODE, str(kubeconfig), retry_s=0.1)
    watcher.start()
    try:
        time.sleep(0.5)
        assert watcher.pods is None and not watcher.up
    finally:
        watcher.stop()
