"""The adapter's pod index: compact records of (namespace, name, labels) from a paged, metadata-only
list and watch (exporter.sources.kube's reflector), read per namespace and label selector.

The cluster is played by sim/apiserver.py, which pages lists, serves PartialObjectMetadata
and watches with bookmarks as kube-apiserver does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

import requests

from exporter.adapter.pods import PodIndex, PodMeta, pod_meta
from exporter.adapter.selector import parse_selector
from sim.apiserver import FakeApiServer, pod_json
from sim.certs import make_pki
from sim.processes import adapter_args, free_port, spawn_adapter


class Source:
    def __init__(self) -> None:
        self.items: Mapping[str, PodMeta] | None = None


def meta(namespace: str, name: str, **labels: str) -> PodMeta:
    record = pod_meta({"metadata": {"namespace": namespace, "name": name, "labels": labels}})
    assert record is not None
    return record


def test_names_by_namespace_and_selector_and_none_until_synced() -> None:
    source = Source()
    index = PodIndex(source)
    assert index.names("default", parse_selector("app=bert")) is None and not index.synced
    source.items = {
        "u1": meta("default", "bert-b", app="bert"),
        "u2": meta("default", "bert-a", app="bert", tier="gpu"),
        "u3": meta("speech", "bert-c", app="bert"),
        "u4": meta("default", "asr-0", app="asr"),
    }
    assert index.names("default", parse_selector("app=bert")) == ["bert-a", "bert-b"]
    assert index.names("default", parse_selector("app=bert,tier=gpu")) == ["bert-a"]
    assert index.names("speech", parse_selector("")) == ["bert-c"]
    assert index.names("nowhere", parse_selector("")) == []  # synced and empty, not unknown


def test_changes_are_read_at_most_once_per_refresh() -> None:
    now = [100.0]
    source = Source()
    source.items = {"u1": meta("default", "a", app="x")}
    index = PodIndex(source, refresh_s=1.0, clock=lambda: now[0])
    assert index.names("default", parse_selector("app=x")) == ["a"]
    source.items = {"u1": meta("default", "a", app="x"), "u2": meta("default", "b", app="x")}
    now[0] += 0.5
    assert index.names("default", parse_selector("app=x")) == ["a"]  # within the refresh: as it was
    now[0] += 0.6
    assert index.names("default", parse_selector("app=x")) == ["a", "b"]


def test_records_keep_only_what_selectors_need_and_share_repeated_strings() -> None:
    raw = {
        "apiVersion": "meta.k8s.io/v1",
        "kind": "PartialObjectMetadata",
        "metadata": {
            "name": "bert-7d9f-aaaa",
            "namespace": "default",
            "uid": "u1",
            "labels": {"app.kubernetes.io/name": "bert", "pod-template-hash": "7d9f"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x" * 10_000},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:metadata": {}}}],
        },
    }
    one, other = (pod_meta(json.loads(json.dumps(raw))) for _ in range(2))  # parsed apart, as two events are
    assert one is not None and other is not None
    assert one == PodMeta("default", "bert-7d9f-aaaa", {"app.kubernetes.io/name": "bert", "pod-template-hash": "7d9f"})
    assert (
        one.namespace is other.namespace
        and one.labels["app.kubernetes.io/name"] is other.labels["app.kubernetes.io/name"]
    )
    assert pod_meta({"metadata": {"namespace": "default"}}) is None


def test_the_adapter_lists_pods_in_pages_of_metadata_and_watches_with_bookmarks(tmp_path: Path) -> None:
    api = FakeApiServer().start()
    for i in range(1201):
        api.apply(pod_json(f"uid-{i}", f"team-{i % 7}", f"pod-{i}", "node", labels={"app": f"app-{i % 3}"}))
    pki = make_pki(tmp_path)
    port = free_port()
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    adapter = spawn_adapter(port, *adapter_args(pki, kubeconfig, f"http://127.0.0.1:{free_port()}"))
    try:
        adapter.wait_for_port(port)
        ready = requests.get(f"https://127.0.0.1:{port}/readyz", verify=str(pki.ca), timeout=5)
        for _ in range(100):
            if ready.status_code == 200:
                break
            ready = requests.get(f"https://127.0.0.1:{port}/readyz", verify=str(pki.ca), timeout=5)
        assert ready.status_code == 200
        lists = api.list_calls()
        assert [c.param("limit") for c in lists] == ["500", "500", "500"]  # 1201 pods: three pages
        assert [bool(c.param("continue")) for c in lists] == [False, True, True]
        assert all("as=PartialObjectMetadataList" in c.accept for c in lists)  # never whole pods
        # Ready once the list is in; the watch that follows it may still be on its way.
        deadline = time.monotonic() + 10
        while not (watches := api.watch_calls()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watches and watches[0].param("allowWatchBookmarks") == "true"
        assert "as=PartialObjectMetadata" in watches[0].accept
    finally:
        adapter.stop()
        api.stop()
