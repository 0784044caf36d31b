"""The adapter reaches Prometheus the ways real clusters put it: a real Prometheus behind its own web
config (TLS with its own CA, then basic auth, then client certificates; the file is re-read on every
request, so one Prometheus serves every stage), a real VictoriaMetrics under a path prefix, and a
front end in the style of Thanos and Mimir (a reverse proxy on real sockets) that admits only the
right bearer token and tenant, whose token rotates while the adapter runs. Credentials never show in
what the adapter logs or answers; bad settings stop it with one line naming the flag."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bcrypt
import pytest
import requests

from exporter.adapter.promauth import PrometheusAccess, SettingError, prometheus_session, redacted
from exporter.adapter.prometheus import PrometheusClient, PrometheusUnavailableError
from sim.apiserver import FakeApiServer
from sim.certs import Pki, make_pki
from sim.processes import free_port, start_adapter
from sim.prometheus import Prometheus
from tests.adapter import test_settings
from tests.adapter.test_settings import run_adapter

PASSWORD = "correct-horse-battery-staple"
TENANT = "team-gpu"
EXTERNAL = "/apis/external.metrics.k8s.io/v1beta1/namespaces/default/gpu_duty_cycle"


def client(url: str, verb: str = "POST", **access: object) -> PrometheusClient:
    return PrometheusClient(url, 5, prometheus_session(PrometheusAccess(url, **access)), verb)  # type: ignore[arg-type]


def one(prometheus: PrometheusClient) -> float:
    (sample,) = prometheus.query("vector(1)")
    return sample.value


@dataclass
class Secured:
    url: str
    pki: Pki
    web_config: Path

    def serve(self, extra: str = "") -> None:
        """TLS with the test CA's certificate, and ``extra`` (YAML) for the next requests."""
        self.web_config.write_text(
            f"tls_server_config:\n  cert_file: {self.pki.server_cert}\n  key_file: {self.pki.server_key}\n{extra}"
        )


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    directory = tmp_path_factory.mktemp("secured")
    port = free_port()
    stage = Secured(f"https://127.0.0.1:{port}", make_pki(directory / "pki"), directory / "web.yml")
    stage.serve()
    prometheus = Prometheus(directory, [], port, web_config=stage.web_config)
    try:
        prometheus.process.wait_for_port(port)
        ready = f"{stage.url}/-/ready"
        prometheus.process.wait_until(lambda: requests.get(ready, verify=str(stage.pki.ca), timeout=5).ok, 30)
        yield stage
    finally:
        prometheus.stop()


def test_tls_with_its_own_ca(secured: Secured) -> None:
    secured.serve()
    assert one(client(secured.url, ca_file=str(secured.pki.ca))) == 1
    with pytest.raises(PrometheusUnavailableError, match="SSLError"):
        client(secured.url).query("vector(1)")  # the system's CAs never signed it


def test_basic_auth_from_an_auth_config_or_the_url(secured: Secured, tmp_path: Path) -> None:
    """The auth config is a kubeconfig, as prometheus-adapter reads it: its CA and its user's
    username/password; its cluster has no server, the URL is --prometheus-url's."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    secured.serve(f"basic_auth_users:\n  adapter: {hashed}\n")
    auth_config = tmp_path / "auth.yaml"

    def user(password: str) -> Path:
        auth_config.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: p\n  cluster: {{certificate-authority: {secured.pki.ca}}}\n"
            f"users:\n- name: u\n  user: {{username: adapter, password: {password}}}\n"
            "contexts:\n- name: c\n  context: {cluster: p, user: u}\ncurrent-context: c\n"
        )
        return auth_config

    assert one(client(secured.url, auth_config=str(user(PASSWORD)))) == 1
    with pytest.raises(PrometheusUnavailableError, match=r"refused the adapter's credentials \(HTTP 401\)"):
        client(secured.url, auth_config=str(user("wrong-" + PASSWORD))).query("vector(1)")

    in_url = secured.url.replace("https://", f"https://adapter:{PASSWORD}@")
    assert one(client(in_url, ca_file=str(secured.pki.ca))) == 1
    wrong = client(in_url.replace(PASSWORD, "wrong-" + PASSWORD), ca_file=str(secured.pki.ca))
    with pytest.raises(PrometheusUnavailableError, match="HTTP 401") as refused:
        wrong.query("vector(1)")
    assert PASSWORD not in str(refused.value) and "adapter:" not in str(refused.value)


def test_client_certificate(secured: Secured) -> None:
    pki = secured.pki
    secured.serve(f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n")
    pair = {"client_cert_file": str(pki.client_cert), "client_key_file": str(pki.client_key)}
    assert one(client(secured.url, ca_file=str(pki.ca), **pair)) == 1
    with pytest.raises(PrometheusUnavailableError):
        client(secured.url, ca_file=str(pki.ca)).query("vector(1)")


class ConnectProxy:
    """An egress proxy (``HTTPS_PROXY``): CONNECT, then bytes both ways; it records each target."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.targets: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                downstream, _ = self.listener.accept()
                head = b""
                while b"\r\n\r\n" not in head:
                    head += downstream.recv(4096)
                target = head.split()[1].decode()
                self.targets.append(target)
                host, port = target.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                downstream.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                for source, sink in ((downstream, upstream), (upstream, downstream)):
                    threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError), source, sink:
        while data := source.recv(65536):
            sink.sendall(data)


def test_tls_and_client_certificate_through_an_egress_proxy(secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CA and client pair hold through a tunnel too (requests builds a proxy's pools apart)."""
    pki = secured.pki
    secured.serve(f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n")
    proxy = ConnectProxy()
    for name in ("https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    pair = {"client_cert_file": str(pki.client_cert), "client_key_file": str(pki.client_key)}
    try:
        assert one(client(secured.url, ca_file=str(pki.ca), **pair)) == 1
    finally:
        proxy.listener.close()
    assert proxy.targets == [secured.url.removeprefix("https://")]


@pytest.fixture(scope="module")
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    store = Prometheus(tmp_path_factory.mktemp("vm"), [], port, kind="victoria-metrics")
    try:
        store.process.wait_for_port(port)
        yield store.url
    finally:
        store.stop()


@pytest.mark.parametrize("verb", ["GET", "POST"])
def test_victoria_metrics_under_a_path_prefix(victoria: str, verb: str) -> None:
    assert one(client(f"{victoria}/prometheus/", verb)) == 1


@dataclass
class Gate:
    """A Thanos or Mimir front end: the API under ``/select/0/prometheus`` (forwarded to
    VictoriaMetrics's ``/prometheus``), only for the current ``token`` and ``tenant``."""

    upstream: str
    token: str
    tenant: str = TENANT
    methods: list[str] = field(default_factory=list)  # of the requests it let through

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, b"unauthorized"
        if headers.get("x-scope-orgid") != self.tenant:
            return 403, b"no such tenant"
        prefix = "/select/0/prometheus/"
        if not path.startswith(prefix):
            return 404, b"not found"
        self.methods.append(method)
        forwarded = requests.request(
            method,
            f"{self.upstream}/prometheus/{path[len(prefix) :]}",
            data=body,
            headers={"Content-Type": headers.get("content-type", "")},
            timeout=5,
        )
        return forwarded.status_code, forwarded.content


@pytest.fixture(scope="module")
def gate(victoria: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gate, str, Path]]:
    """The front end over TLS (its CA is the third item): credentials never travel in plain text."""
    front = Gate(victoria, "first-token")
    pki = make_pki(tmp_path_factory.mktemp("gate"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, content = front.answer(self.command, self.path, headers, body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_POST = do_GET  # noqa: N815 (http.server's name)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki.server_cert, pki.server_key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield front, f"https://127.0.0.1:{server.server_address[1]}/select/0/prometheus", pki.ca
    server.shutdown()
    server.server_close()


def write_token(path: Path, token: str) -> None:
    """As the kubelet rotates a projected token: a new file moved into place."""
    staged = path.with_suffix(".new")
    staged.write_text(token + "\n")
    os.replace(staged, path)


def test_a_token_and_a_tenant_through_a_front_end_with_the_token_rotated(
    gate: tuple[Gate, str, Path], tmp_path: Path
) -> None:
    front, url, ca = gate
    front.token = "first-token"
    token_file = tmp_path / "token"
    write_token(token_file, front.token)
    tenant = (f"X-Scope-OrgID={TENANT}",)
    prometheus = client(url, "GET", token_file=str(token_file), headers=tenant, ca_file=str(ca))
    assert one(prometheus) == 1 and front.methods[-1] == "GET"

    front.token = "second-token"  # the issuer rotated it; the file has not caught up yet
    with pytest.raises(PrometheusUnavailableError, match="HTTP 401") as refused:
        prometheus.query("vector(1)")
    assert "first-token" not in str(refused.value)
    write_token(token_file, front.token)
    assert one(prometheus) == 1  # read again, without a restart

    wrong_tenant = client(url, token_file=str(token_file), headers=("X-Scope-OrgID=another-team",), ca_file=str(ca))
    with pytest.raises(PrometheusUnavailableError, match="HTTP 403"):
        wrong_tenant.query("vector(1)")


def test_the_adapter_behind_the_front_end_answers_503_while_refused_and_never_shows_a_credential(
    gate: tuple[Gate, str, Path], tmp_path: Path
) -> None:
    """The HPA gets a 503 while the front end refuses the adapter's token; the log says so once for
    the whole outage and once on recovery, and no token is in a log line, an answer or /readyz."""
    front, url, ca = gate
    front.token = "adapter-token-one"
    token_file = tmp_path / "token"
    write_token(token_file, front.token)
    pki = make_pki(tmp_path / "pki")
    api = FakeApiServer().start()
    process, adapter = start_adapter(
        tmp_path,
        pki,
        api.write_kubeconfig(tmp_path / "kubeconfig"),
        url,
        "--prometheus-token-file",
        str(token_file),
        "--prometheus-header",
        f"X-Scope-OrgID={TENANT}",
        "--prometheus-ca-file",
        str(ca),
    )
    answers: list[str] = []

    def ask(phase: int) -> int:  # each phase its own selector: answers are shared for a second
        answer = requests.get(
            f"{adapter}{EXTERNAL}?labelSelector=phase%3D{phase}",
            headers={"X-Remote-User": "hpa", "X-Remote-Group": "system:authenticated"},
            verify=str(pki.ca),
            cert=(str(pki.client_cert), str(pki.client_key)),
            timeout=10,
        )
        answers.append(answer.text)
        return answer.status_code

    try:
        assert ask(1) == 200
        front.token = "adapter-token-two"
        assert [ask(2), ask(3), ask(4)] == [503, 503, 503]
        answers.append(requests.get(f"{adapter}/readyz?verbose", verify=str(pki.ca), timeout=10).text)
        write_token(token_file, front.token)
        assert ask(5) == 200
    finally:
        process.stop()
        api.stop()
    log = process.log()
    assert log.count("refused the adapter's credentials (HTTP 401)") == 1, log
    assert "recovered after 3 failed attempts" in log, log
    for text in [log, *answers]:
        assert "adapter-token" not in text, text


def test_the_pods_service_account_token_and_ca_reach_the_front_end_with_the_token_rotated(
    gate: tuple[Gate, str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--prometheus-auth-incluster: the token and CA the kubelet mounts (here a directory laid out as
    it lays it out) are what the front end sees and what TLS trusts."""
    front, url, ca = gate
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "ca.crt").write_bytes(ca.read_bytes())
    front.token = "pod-token-one"
    write_token(account / "token", front.token)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # as in a pod
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    tenant = (f"X-Scope-OrgID={TENANT}",)
    prometheus = client(url, auth_in_cluster=True, service_account_dir=account, headers=tenant)
    assert one(prometheus) == 1
    front.token = "pod-token-two"
    write_token(account / "token", front.token)  # the kubelet rotated it
    assert one(prometheus) == 1

    (account / "ca.crt").write_bytes(make_pki(tmp_path / "other").ca.read_bytes())  # the pod's CA did not sign it
    with pytest.raises(PrometheusUnavailableError, match="SSLError"):
        client(url, auth_in_cluster=True, service_account_dir=account, headers=tenant).query("vector(1)")


def test_credentials_go_to_an_http_url_only_when_allowed_on_purpose(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    write_token(token_file, "s3cret")
    with pytest.raises(SettingError, match=r"^--prometheus-token-file: credentials would cross the network"):
        prometheus_session(PrometheusAccess("http://prometheus:9090", token_file=str(token_file)))
    allowed = PrometheusAccess("http://prometheus:9090", token_file=str(token_file), allow_insecure_credentials=True)
    assert prometheus_session(allowed).auth is not None
    prometheus_session(PrometheusAccess("http://prometheus:9090", headers=("X-Scope-OrgID=a",)))  # no credentials


@pytest.mark.parametrize(
    "url", ["https://adapter:s3cr/et@prom:9090", "https://adapter:1234/s3cret@prom:9090", "http://a:b@c:d@prom/x?y#z"]
)
def test_a_password_holding_a_slash_is_redacted(url: str) -> None:
    assert redacted(url) == url[: url.index("//") + 2] + url[url.rindex("@") + 1 :]


kubeconfig = test_settings.kubeconfig  # its fixture: a kubeconfig the checks accept
TOKEN_KUBECONFIG = (
    "BAD:{apiVersion: v1, kind: Config, clusters: [{name: p, cluster: {}}], users: [{name: u, user: {token: s3cret}}],"
    " contexts: [{name: c, context: {cluster: p, user: u}}], current-context: c}"
)
BAD_PEM = "BAD:-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"
CASES = [
    (["--prometheus-ca-file", "/nonexistent/ca.crt"], "--prometheus-ca-file: cannot read"),
    (["--prometheus-ca-file", BAD_PEM], "--prometheus-ca-file: no usable CA certificate"),
    (["--prometheus-ca-file", "BAD:"], "--prometheus-ca-file: no usable CA certificate"),
    (["--prometheus-client-tls-cert-file", BAD_PEM], "--prometheus-client-tls-cert-file/"),
    (["--prometheus-client-tls-cert-file", BAD_PEM, "--prometheus-client-tls-key-file", BAD_PEM], "not a PEM"),
    (["--prometheus-client-tls-key-file", "/nonexistent/k", "--prometheus-client-tls-cert-file", BAD_PEM], "-key-file"),
    (["--prometheus-token-file", "/nonexistent/token"], "--prometheus-token-file: cannot read"),
    (["--prometheus-token-file", "BAD:\n"], "--prometheus-token-file: "),
    (["--prometheus-token-file", "BAD:two\nlines"], "--prometheus-token-file: "),
    (["--prometheus-header", "X-Scope-OrgID"], "--prometheus-header: want Name=Value"),
    (["--prometheus-header", "X Scope=a"], "--prometheus-header: 'X Scope' is not a header name"),
    (["--prometheus-header", "A=1", "--prometheus-header", "a=2"], "--prometheus-header: a given twice"),
    (["--prometheus-verb", "PUT"], "--prometheus-verb"),
    (["--prometheus-auth-config", "/nonexistent/kc"], "--prometheus-auth-config: cannot read"),
    (["--prometheus-auth-config", "BAD:users: [{user: {token: s3cret}}"], "--prometheus-auth-config: "),
    (["--prometheus-auth-config", "/x", "--prometheus-auth-incluster"], "not together with --prometheus-auth-inc"),
    (["--prometheus-auth-incluster"], "--prometheus-auth-incluster: "),
    (["--prometheus-url", "http://u:s3cret@[::1/"], "--prometheus-url: want an http:// or https:// URL"),
    (["--prometheus-url", "http://u:s3cret@h:99999"], "--prometheus-url: want an http:// or https:// URL"),
    (["--prometheus-url", "https://adapter:s3cret/x@prom:9090"], "--prometheus-url: want an http:// or https://"),
    (["--prometheus-url", "https://adapter:1234/s3cret@prom:9090"], "--prometheus-url: an '@' outside the user"),
    (["--prometheus-token-file", "BAD:s3cret"], "--prometheus-token-file: credentials would cross the network"),
    (["--prometheus-url", "http://u:s3cret@prom:9090"], "--prometheus-url: credentials would cross the network"),
    (["--prometheus-header", "Authorization=Bearer s3cret"], "--prometheus-header: credentials would cross"),
    (["--prometheus-auth-config", TOKEN_KUBECONFIG], "--prometheus-auth-config: credentials would cross"),
]


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(a)[:40] for a, _ in CASES])
def test_a_bad_prometheus_setting_is_one_line_and_exit_code_2(
    tmp_path: Path,
    kubeconfig: Path,
    args: list[str],
    named: str,
) -> None:
    args = list(args)
    for index, arg in enumerate(args):
        if arg.startswith("BAD:"):
            path = tmp_path / f"file-{index}"
            path.write_text(arg[4:])
            args[index] = str(path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    result = run_adapter(tmp_path, "--kubeconfig", str(kubeconfig), *args, env=env)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gpu-metrics-adapter: error: ") and named in line, line
    assert "s3cret" not in line
