"""The reflector and the pod watch against a server speaking the Kubernetes API's list/watch JSON
(sim/apiserver.py), over real sockets and, where credentials matter, real TLS."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from exporter.backoff import Backoff
from exporter.sources.kube import MIN_WATCH_S, PodWatcher, Reflector, pod_info
from exporter.sources.kubeclient import ConfigError, KubeClient, in_cluster_credentials, kubeconfig_credentials
from sim.apiserver import FakeApiServer, pod_json
from sim.certs import make_pki

NODE = "gpu-node-1"


def fast() -> Backoff:
    """A backoff short enough for tests that need many retries in a second."""
    return Backoff(initial_s=0.05, cap_s=0.2)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    yield server
    server.stop()


@pytest.fixture
def kubeconfig(api: FakeApiServer, tmp_path: Path) -> str:
    return str(api.write_kubeconfig(tmp_path / "kubeconfig"))


@pytest.fixture
def started() -> Iterator[Callable[[PodWatcher], PodWatcher]]:
    """Starts watchers and stops them at the end of the test, whatever happens."""
    watchers: list[PodWatcher] = []

    def start(watcher: PodWatcher) -> PodWatcher:
        watchers.append(watcher)
        watcher.start()
        return watcher

    yield start
    for watcher in watchers:
        watcher.stop()
        watcher.join(5)


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def names(watcher: PodWatcher) -> set[str]:
    return {p.name for p in (watcher.pods or {}).values()}


@pytest.fixture
def watcher(api: FakeApiServer, kubeconfig: str, started: Callable[[PodWatcher], PodWatcher]) -> Iterator[PodWatcher]:
    """A watcher on NODE holding pod bert-0, with its watch open."""
    api.apply(pod_json("uid-1", "default", "bert-0", NODE))
    pods = started(PodWatcher(NODE, kubeconfig, backoff=fast()))
    eventually(lambda: names(pods) == {"bert-0"} and len(api.watch_calls()) == 1)
    yield pods


def test_lists_then_follows_the_pods_of_this_node_only(
    api: FakeApiServer, kubeconfig: str, started: Callable[[PodWatcher], PodWatcher]
) -> None:
    api.apply(pod_json("uid-1", "default", "bert-0", NODE, containers={"server": "c" * 64}))
    api.apply(pod_json("uid-x", "default", "elsewhere", "other-node"))
    watcher = PodWatcher(NODE, kubeconfig)
    assert watcher.pods is None  # unknown before the first list, not "no pods"
    started(watcher)
    eventually(lambda: names(watcher) == {"bert-0"})
    pod = watcher.pods["uid-1"] if watcher.pods else None
    assert pod is not None
    assert (pod.namespace, pod.phase, dict(pod.container_names)) == ("default", "Running", {"c" * 64: "server"})
    assert watcher.up
    assert api.list_calls()[0].param("fieldSelector") == f"spec.nodeName={NODE}"

    api.apply(pod_json("uid-2", "default", "bert-1", NODE))
    eventually(lambda: names(watcher) == {"bert-0", "bert-1"})
    api.apply(pod_json("uid-2", "default", "bert-1", NODE, phase="Succeeded"))
    eventually(lambda: (watcher.pods or {})["uid-2"].finished)
    api.delete("uid-1")
    eventually(lambda: names(watcher) == {"bert-1"})
    watch = api.watch_calls()[0]
    assert watch.param("allowWatchBookmarks") == "true"
    assert 300 <= int(watch.param("timeoutSeconds") or 0) < 600


def test_a_broken_watch_resumes_from_the_last_version_without_relisting(
    api: FakeApiServer, watcher: PodWatcher
) -> None:
    api.apply(pod_json("uid-2", "default", "bert-1", NODE))
    eventually(lambda: names(watcher) == {"bert-0", "bert-1"})
    api.break_watches()
    api.apply(pod_json("uid-3", "default", "bert-2", NODE))  # happens while no watch is open
    eventually(lambda: names(watcher) == {"bert-0", "bert-1", "bert-2"})
    assert len(api.list_calls()) == 1
    assert api.watch_calls()[1].param("resourceVersion") == "102"  # the last event seen before the break


def test_a_bookmark_moves_the_version_a_watch_resumes_from(api: FakeApiServer, watcher: PodWatcher) -> None:
    api.apply(pod_json("uid-y", "default", "elsewhere", "other-node"))  # version 102, not sent to this node
    api.bookmark()
    time.sleep(0.2)  # the bookmark is in flight; nothing observable changes until the watch breaks
    api.break_watches()
    eventually(lambda: len(api.watch_calls()) == 2)
    assert api.watch_calls()[1].param("resourceVersion") == "102"
    assert len(api.list_calls()) == 1


def test_an_expired_watch_relists(api: FakeApiServer, watcher: PodWatcher) -> None:
    api.compact()  # history gone: resuming would get 410 Gone
    api.delete("uid-1")
    api.apply(pod_json("uid-2", "default", "bert-1", NODE))
    api.compact()
    eventually(lambda: names(watcher) == {"bert-1"})
    assert len(api.list_calls()) == 2


def test_paged_lists_end_equal_to_the_server(
    api: FakeApiServer, kubeconfig: str, started: Callable[[PodWatcher], PodWatcher]
) -> None:
    for i in range(23):
        api.apply(pod_json(f"uid-{i:02d}", "default", f"pod-{i:02d}", NODE))
    watcher = PodWatcher(NODE, kubeconfig)
    watcher.reflector._page_size = 5
    started(watcher)
    eventually(lambda: watcher.pods is not None)
    lists = api.list_calls()
    assert [c.param("limit") for c in lists] == ["5"] * 5
    assert [c.param("continue") is not None for c in lists] == [False, True, True, True, True]
    assert dict(watcher.pods or {}).keys() == api.objects().keys()
    api.delete("uid-07")
    api.apply(pod_json("uid-99", "default", "pod-99", NODE))
    eventually(lambda: (watcher.pods or {}).keys() == api.objects().keys())


def test_an_expired_continue_token_starts_the_list_again(
    api: FakeApiServer, kubeconfig: str, started: Callable[[PodWatcher], PodWatcher]
) -> None:
    for i in range(12):
        api.apply(pod_json(f"uid-{i:02d}", "default", f"pod-{i:02d}", NODE))
    api.expire_next_continues = 1
    watcher = PodWatcher(NODE, kubeconfig)
    watcher.reflector._page_size = 5
    started(watcher)
    eventually(lambda: watcher.pods is not None)
    assert dict(watcher.pods or {}).keys() == api.objects().keys()
    # page 1, page 2 (410 Expired), then pages 1-3 from scratch, at once and not as a failure
    assert [c.param("continue") is not None for c in api.list_calls()] == [False, True, False, True, True]
    assert watcher.up


def test_a_410_storm_costs_a_few_requests_with_growing_backoff_and_one_log_line(
    api: FakeApiServer, kubeconfig: str, started: Callable[[PodWatcher], PodWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    """Every watch answers 410 Gone. Before the backoff the pod watch re-listed ~700 times a second."""
    caplog.set_level(logging.INFO, logger="exporter.sources.kube")
    api.apply(pod_json("uid-1", "default", "bert-0", NODE))
    api.watch_gone = True
    watcher = started(PodWatcher(NODE, kubeconfig))  # the real backoff: ~1 s doubling to 30 s
    eventually(lambda: len(api.watch_calls()) == 1 and not watcher.up)  # the first watch failed
    began = time.monotonic()
    up_seen: list[bool] = []
    while time.monotonic() - began < 5.0:
        up_seen.append(watcher.up)
        time.sleep(0.05)
    calls = api.calls
    assert 4 <= len(calls) <= 8, [(round(c.at - began, 2), c.is_watch) for c in calls]
    list_times = [c.at for c in api.list_calls()]
    gaps = [b - a for a, b in itertools.pairwise(list_times)]
    assert len(gaps) >= 2 and all(later > earlier for earlier, later in itertools.pairwise(gaps)), gaps
    assert 0.9 <= gaps[0] <= 1.6, gaps
    assert not any(up_seen)
    assert names(watcher) == {"bert-0"}  # what was last seen is kept
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "410" in warnings[0].getMessage()


def test_failing_then_healthy_is_one_line_each_and_up_follows(
    api: FakeApiServer, watcher: PodWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.sources.kube")
    api.apply(pod_json("uid-2", "default", "bert-1", NODE))
    eventually(lambda: watcher.up and names(watcher) == {"bert-0", "bert-1"})  # a watch that delivers
    time.sleep(MIN_WATCH_S)  # ... and has been open long enough to be healthy: its end is no failure
    api.fail_status = 500
    api.break_watches()
    eventually(lambda: not watcher.up)
    failing_since = len(api.calls)
    eventually(lambda: len(api.calls) >= failing_since + 5)  # retrying, backing off
    assert not watcher.up
    assert names(watcher) == {"bert-0", "bert-1"}
    api.fail_status = None
    api.apply(pod_json("uid-3", "default", "bert-2", NODE))
    eventually(lambda: watcher.up and names(watcher) == {"bert-0", "bert-1", "bert-2"})
    assert len(api.list_calls()) == 1  # errors retry the watch from where it was; only a 410 relists
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["WARNING", "INFO"], lines
    assert "HTTP 500" in lines[0][1] and "recovered" in lines[1][1]


def test_a_quiet_healthy_watch_is_up_again_without_any_event(api: FakeApiServer, watcher: PodWatcher) -> None:
    api.fail_status = 503
    api.break_watches()
    eventually(lambda: not watcher.up)
    api.fail_status = None
    eventually(lambda: watcher.up, timeout_s=5)


def test_an_unreachable_api_is_down_unknown_and_said_once(
    tmp_path: Path, started: Callable[[PodWatcher], PodWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.sources.kube")
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        server = FakeApiServer()
        server.url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        watcher = started(PodWatcher(NODE, str(kubeconfig), backoff=fast()))
        eventually(lambda: len(caplog.records) >= 1)
        time.sleep(0.5)  # several more attempts
        assert watcher.pods is None and not watcher.up
        assert [r.getMessage() for r in caplog.records if "ConnectionRefusedError" in r.getMessage()] == [
            caplog.records[0].getMessage()
        ]
        assert len(caplog.records) == 1


def assert_backs_off(times: list[float], initial_s: float, cap_s: float) -> None:
    """Attempts at ``times``, apart by delays doubling from ``initial_s``, then held at ``cap_s``."""
    gaps = [round(later - earlier, 3) for earlier, later in itertools.pairwise(times)]
    assert len(gaps) >= 4, gaps
    assert initial_s * 0.8 <= gaps[0] <= initial_s * 1.5, gaps
    assert gaps[0] < gaps[1] < gaps[2], gaps  # growing ...
    assert all(cap_s * 0.8 <= gap <= cap_s * 1.5 for gap in gaps[2:]), gaps  # ... up to the cap


@pytest.mark.parametrize("fault", ["HTTP 500", "connection refused"])
def test_api_errors_back_off_growing_up_to_a_cap(api: FakeApiServer, tmp_path: Path, fault: str) -> None:
    """Not only 410s: before this test, retrying every 0.5 s, or without a cap, passed the suite."""
    connects: list[float] = []
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        if fault == "HTTP 500":
            api.fail_status = 500
            kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        else:
            nowhere = FakeApiServer()
            nowhere.url = f"http://127.0.0.1:{closed.getsockname()[1]}"
            kubeconfig = nowhere.write_kubeconfig(tmp_path / "kubeconfig")
        credentials = kubeconfig_credentials(kubeconfig)

        def connect() -> KubeClient:  # called again after each connection error: credentials may change
            connects.append(time.monotonic())
            return KubeClient(credentials)

        reflector = Reflector(
            "pods", "/api/v1/pods", pod_info, connect, backoff=Backoff(initial_s=0.2, cap_s=0.8, jitter=0.0)
        )
        reflector.start()
        try:
            time.sleep(3.3)
            assert not reflector.up and reflector.items is None
        finally:
            reflector.stop()
            reflector.join(5)
    assert_backs_off([c.at for c in api.calls] if fault == "HTTP 500" else connects, 0.2, 0.8)


def test_watches_ending_after_their_first_event_are_backed_off_and_said_so(
    api: FakeApiServer, kubeconfig: str, started: Callable[[PodWatcher], PodWatcher], caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy ending every stream after its first flush: before, a watch a few milliseconds, up and silent."""
    caplog.set_level(logging.INFO, logger="exporter.sources.kube")
    api.apply(pod_json("uid-1", "default", "bert-0", NODE))
    api.end_watches_after = 1
    churning = threading.Event()

    def churn() -> None:  # a pod changing every 10 ms: every watch has an event at once
        change = 0
        while not churning.wait(0.01):
            change += 1
            api.apply(pod_json("uid-2", "default", "bert-1", NODE, labels={"change": str(change)}))

    thread = threading.Thread(target=churn, daemon=True)
    thread.start()
    try:
        watcher = started(PodWatcher(NODE, kubeconfig))  # the real backoff: ~1 s doubling to 30 s
        eventually(lambda: len(api.watch_calls()) >= 2)
        began = time.monotonic()
        up_seen: list[bool] = []
        while time.monotonic() - began < 4.0:
            up_seen.append(watcher.up)
            time.sleep(0.05)
    finally:
        churning.set()
        thread.join(5)
    watches = [round(c.at - began, 2) for c in api.watch_calls() if c.at >= began]
    assert len(watches) <= 4, watches  # a few, not one per event
    assert not any(up_seen)
    assert names(watcher) == {"bert-0", "bert-1"}  # what the short watches delivered is kept
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "long before their timeout" in warnings[0], warnings


@pytest.mark.parametrize("break_watch", ["cut connection", "unparsable line"])
def test_a_broken_watch_resumes_from_the_last_event_applied(
    api: FakeApiServer, watcher: PodWatcher, break_watch: str
) -> None:
    """Before, a watch that broke (rather than ended) resumed from the version it had started from,
    and the server replayed every event since (or, once compacted, forced a re-list)."""
    for i in range(2, 5):
        api.apply(pod_json(f"uid-{i}", "default", f"bert-{i}", NODE))  # versions 102 to 104
    eventually(lambda: len(names(watcher)) == 4)
    if break_watch == "cut connection":
        api.cut_watches()
    else:
        api.inject(b"{this is not json")
    eventually(lambda: len(api.watch_calls()) == 2)
    assert [c.param("resourceVersion") for c in api.watch_calls()] == ["101", "104"]  # nothing replayed
    assert len(api.list_calls()) == 1


def test_undecodable_names_and_bad_events_do_not_stop_the_watch(
    api: FakeApiServer, kubeconfig: str, started: Callable[[PodWatcher], PodWatcher]
) -> None:
    api.apply(pod_json("uid-raw", "default", "raw-\udcff", NODE))  # a 0xff byte on the wire
    watcher = started(PodWatcher(NODE, kubeconfig, backoff=fast()))
    eventually(lambda: len(api.watch_calls()) == 1 and watcher.pods is not None)
    api.apply(pod_json("uid-esc", "default", "escaped-\ud800", NODE))  # a lone surrogate's JSON escape
    api.inject(b"[1, 2]")  # an event that is not an object
    api.inject(b'{"type": "ADDED", "object": {"metadata": "nonsense"}}')  # an object that is not a pod
    api.apply(pod_json("uid-ok", "default", "fine", NODE))
    eventually(lambda: "fine" in names(watcher))
    assert names(watcher) == {"raw-\ufffd", "escaped-\ufffd", "fine"}
    for name in names(watcher):
        name.encode("utf-8")  # every kept name can be written out
    assert watcher.reflector.errors == {"bad_event": 1, "bad_object": 1}
    assert len(api.watch_calls()) == 1  # none of it broke the watch

    api.inject(b"{this is not json")  # a broken stream: resume from the last good version
    api.apply(pod_json("uid-after", "default", "after", NODE))
    eventually(lambda: "after" in names(watcher))
    assert len(api.list_calls()) == 1 and len(api.watch_calls()) == 2
    eventually(lambda: watcher.up)  # once the new watch has stayed open its minimum


def test_json_nested_too_deeply_is_one_line_without_a_traceback(
    api: FakeApiServer, watcher: PodWatcher, caplog: pytest.LogCaptureFixture
) -> None:
    """It raised RecursionError, logged as unexpected with a traceback."""
    caplog.set_level(logging.INFO, logger="exporter.sources.kube")
    api.inject(b"[" * 100_000 + b"]" * 100_000)
    api.apply(pod_json("uid-after", "default", "after", NODE))
    eventually(lambda: "after" in names(watcher))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "not JSON" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert not warnings[0].exc_info  # no traceback


def test_metadata_only_lists_and_watches_keep_compact_records(api: FakeApiServer, kubeconfig: str) -> None:
    for i in range(3):
        api.apply(pod_json(f"uid-{i}", "ns", f"pod-{i}", f"node-{i}", labels={"app": "bert"}))
    seen_keys: list[set[str]] = []

    def record(raw: Mapping[str, Any]) -> tuple[str, str]:
        seen_keys.append(set(raw))
        return raw["metadata"]["namespace"], raw["metadata"]["name"]

    reflector: Reflector[tuple[str, str]] = Reflector(
        "pod metadata",
        "/api/v1/pods",
        record,
        connect=lambda: KubeClient(kubeconfig_credentials(Path(kubeconfig))),
        label_selector="app=bert",
        metadata_only=True,
    )
    reflector.start()
    try:
        eventually(lambda: reflector.items is not None and len(api.watch_calls()) == 1)
        api.apply(pod_json("uid-3", "ns", "pod-3", "node-3", labels={"app": "bert"}))
        api.apply(pod_json("uid-4", "ns", "other", "node-3", labels={"app": "other"}))
        eventually(lambda: len(reflector.items or {}) == 4)
        assert set((reflector.items or {}).values()) == {("ns", f"pod-{i}") for i in range(4)}
        assert all(keys == {"kind", "apiVersion", "metadata"} for keys in seen_keys)  # no spec, no status
        assert "as=PartialObjectMetadataList;g=meta.k8s.io;v=v1" in api.list_calls()[0].accept
        assert "as=PartialObjectMetadata;g=meta.k8s.io;v=v1" in api.watch_calls()[0].accept
        assert api.list_calls()[0].param("labelSelector") == "app=bert"
    finally:
        reflector.stop()
        reflector.join(5)


def test_stop_ends_the_thread_at_once_whether_watching_or_backing_off(api: FakeApiServer, kubeconfig: str) -> None:
    watching = PodWatcher(NODE, kubeconfig)
    watching.start()
    eventually(lambda: len(api.watch_calls()) == 1)
    api.fail_status = 500
    backing_off = PodWatcher(NODE, kubeconfig, backoff=Backoff(initial_s=60))
    backing_off.start()
    eventually(lambda: len(api.list_calls()) == 2)
    began = time.monotonic()
    for watcher in (watching, backing_off):
        watcher.stop()
        watcher.join(5)
    assert time.monotonic() - began < 1.0
    assert not watching.reflector._loop.is_alive() and not backing_off.reflector._loop.is_alive()


def test_in_cluster_credentials_over_tls_with_a_rotating_token(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    api = FakeApiServer(tls=pki, token="first").start()
    try:
        api.apply(pod_json("uid-1", "default", "bert-0", NODE))
        account = tmp_path / "serviceaccount"
        account.mkdir()
        (account / "ca.crt").write_bytes(pki.ca.read_bytes())
        (account / "token").write_text("first\n")
        port = api.url.rsplit(":", 1)[1]
        environ = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
        credentials = in_cluster_credentials(environ, account)
        reflector: Reflector[str] = Reflector(
            "pods", "/api/v1/pods", lambda raw: raw["metadata"]["name"], lambda: KubeClient(credentials)
        )
        reflector.start()
        try:
            eventually(lambda: reflector.items is not None and len(api.watch_calls()) == 1)
            assert set((reflector.items or {}).values()) == {"bert-0"}
            # The kubelet rotates the projected token: a new file swapped in, the old one gone.
            (account / "token.new").write_text("second")
            os.replace(account / "token.new", account / "token")
            api.token = "second"
            api.break_watches()
            api.apply(pod_json("uid-2", "default", "bert-1", NODE))
            eventually(lambda: set((reflector.items or {}).values()) == {"bert-0", "bert-1"})
            assert {c.authorization for c in api.calls} == {"Bearer first", "Bearer second"}
            eventually(lambda: reflector.up)  # once the new watch has stayed open its minimum
        finally:
            reflector.stop()
            reflector.join(5)
    finally:
        api.stop()


@pytest.mark.parametrize("inline", [False, True], ids=["files", "inline data"])
def test_kubeconfig_with_a_ca_and_client_certificate(tmp_path: Path, inline: bool) -> None:
    pki = make_pki(tmp_path / "pki")
    api = FakeApiServer(tls=pki).start()
    try:
        api.apply(pod_json("uid-1", "default", "bert-0", NODE))
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", client_cert=True, inline=inline)
        client = KubeClient(kubeconfig_credentials(kubeconfig))
        pods = client.get_json("/api/v1/pods", {}, "application/json", 10)
        assert [p["metadata"]["name"] for p in pods["items"]] == ["bert-0"]
        assert api.calls[-1].client_cn == "prometheus"  # the test PKI's client certificate
    finally:
        api.stop()


def test_kubeconfig_auth_we_cannot_do_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:6443'}}]\n"
        "users: [{name: u, user: {exec: {command: aws}}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    with pytest.raises(ConfigError, match="exec"):
        kubeconfig_credentials(path)
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster_credentials({}, tmp_path)


def test_a_kubeconfig_username_and_password_are_basic_auth_to_both_clients(tmp_path: Path) -> None:
    """The agent's client and the adapter's (the kubernetes package's) read one loader: a user it
    accepts is the same user to both."""
    from kubernetes import client as kubernetes

    from exporter.adapter.kubeapi import api_client  # the adapter's client, on the same credentials

    api = FakeApiServer().start()
    try:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        user = '"user": {"username": "ops", "password": "p@ss:w"}'
        kubeconfig.write_text(kubeconfig.read_text().replace('"user": {}', user))
        credentials = kubeconfig_credentials(kubeconfig)
        KubeClient(credentials).get_json("/api/v1/pods", {}, "application/json", 10)
        kubernetes.CoreV1Api(api_client(credentials)).list_pod_for_all_namespaces(_request_timeout=10)
        assert [call.authorization for call in api.calls] == ["Basic b3BzOnBAc3M6dw=="] * 2  # ops:p@ss:w
    finally:
        api.stop()
