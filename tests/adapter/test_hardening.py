"""What a hostile client or a failing Prometheus can make the adapter do: bounded work per request,
a Status for every answer, and probes that keep answering. The adapter runs as a process over real
TLS; kube-apiserver is sim/apiserver.py (there is no kube-apiserver binary here), and the slow
Prometheus is a socket server below: a real Prometheus cannot be made to drip its answer."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from sim.apiserver import FakeApiServer
from sim.certs import Pki, make_pki
from sim.processes import Process, adapter_args, free_port, spawn_adapter

EXTERNAL = "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/gpu_duty_cycle"
PODS = "/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/pods/%2A/duty_cycle_current"


@dataclass
class Adapter:
    process: Process
    url: str
    pki: Pki
    log: Path

    def get(self, path: str, timeout: float = 10, authenticated: bool = True) -> requests.Response:
        return requests.get(
            self.url + path,
            headers={"X-Remote-User": "dev", "X-Remote-Group": "system:authenticated"} if authenticated else {},
            verify=str(self.pki.ca),
            cert=(str(self.pki.client_cert), str(self.pki.client_key)) if authenticated else None,
            timeout=timeout,
        )


@contextlib.contextmanager
def _adapter(directory: Path, prometheus_url: str, *extra: str) -> Iterator[Adapter]:
    api = FakeApiServer().start()
    pki = make_pki(directory / "pki")
    port = free_port()
    log = directory / f"adapter-{port}.log"
    kubeconfig = api.write_kubeconfig(directory / "kubeconfig")
    process = spawn_adapter(port, *adapter_args(pki, kubeconfig, prometheus_url), *extra, output=log)
    adapter = Adapter(process, f"https://127.0.0.1:{port}", pki, log)
    try:
        process.wait_for_port(port)
        process.wait_until(lambda: adapter.get("/readyz", authenticated=False).status_code == 200, 30, "ready")
        yield adapter
    finally:
        process.stop()
        api.stop()


@pytest.fixture
def adapter(tmp_path: Path) -> Iterator[Adapter]:
    with _adapter(tmp_path, f"http://127.0.0.1:{free_port()}") as adapter:
        yield adapter  # selectors are refused before Prometheus


def test_a_pathological_selector_is_refused_at_once_and_the_probes_keep_answering(adapter: Adapter) -> None:
    """``a`` + 30 000 blanks + ``x`` took 22 s of regex backtracking under the GIL, and /livez waited 21 s."""
    attack: dict[str, requests.Response] = {}
    thread = threading.Thread(
        target=lambda: attack.update(answer=adapter.get(EXTERNAL + "?labelSelector=a" + "+" * 30_000 + "x", 30))
    )
    thread.start()
    livez = adapter.get("/livez", timeout=10, authenticated=False)
    thread.join(30)
    assert livez.status_code == 200
    answer = attack["answer"]
    assert answer.status_code == 400 and answer.json()["reason"] == "BadRequest"
    assert "4096 characters" in answer.json()["message"]
    assert answer.elapsed.total_seconds() < 10


@pytest.mark.parametrize("path", [PODS, EXTERNAL])
def test_a_selector_of_too_many_requirements_is_refused_on_every_route(adapter: Adapter, path: str) -> None:
    response = adapter.get(path + "?labelSelector=" + "%2C".join(f"k{i}" for i in range(60)))
    assert response.status_code == 400 and "at most 50 requirements" in response.json()["message"]


def _raw_request(adapter: Adapter, target: bytes) -> bytes:
    port = int(adapter.url.rsplit(":", 1)[1])
    context = ssl.create_default_context(cafile=str(adapter.pki.ca))
    with context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="127.0.0.1"
    ) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_a_target_no_url_parser_takes_is_400_without_a_traceback(adapter: Adapter) -> None:
    for _ in range(3):
        answer = _raw_request(adapter, b"http://[::1/apis")
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b'"kind": "Status"' in answer
    assert "Traceback" not in adapter.log.read_text()


class DrippingPrometheus:
    """Answers every request with a promised 100 kB body, one byte every half second: never quiet
    long enough for a per-read timeout to fire."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(connection,), daemon=True).start()

    def _drip(self, connection: socket.socket) -> None:
        with connection:
            try:
                connection.settimeout(5)
                connection.recv(65536)
                connection.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
                )
                while not self.stopped.wait(0.5):
                    connection.sendall(b" ")
            except OSError:
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()


def test_a_dripping_prometheus_is_given_up_on_after_the_timeout_as_a_whole(tmp_path: Path) -> None:
    """--prometheus-timeout bounds each query as a whole, not each read: every request (those that
    wait for another's identical query too) is a 503 Status soon after it, workers come free, and
    /livez answers even while every worker waits on Prometheus."""
    prometheus = DrippingPrometheus()
    try:
        with _adapter(tmp_path, prometheus.url, "--prometheus-timeout", "4") as adapter:
            paths = [
                f"/apis/custom.metrics.k8s.io/v1beta2/namespaces/ns{i % 10}/metrics/duty_cycle_current"
                for i in range(20)
            ]
            with ThreadPoolExecutor(20) as pool:
                pending = [pool.submit(adapter.get, path, 30) for path in paths]
                time.sleep(1)  # every worker is waiting on Prometheus now
                assert adapter.get("/livez", timeout=2.5, authenticated=False).status_code == 200
                answers = [future.result() for future in pending]
            assert [a.status_code for a in answers] == [503] * 20
            assert {a.json()["reason"] for a in answers} == {"ServiceUnavailable"}
            assert max(a.elapsed.total_seconds() for a in answers) < 20  # 4 s each, 16 workers; not minutes
            assert "Traceback" not in adapter.log.read_text()
    finally:
        prometheus.stop()
