"""TLS and basic auth on /metrics from an exporter-toolkit web config, over real TLS sockets."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import selectors
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import bcrypt
import pytest
import requests
from cryptography import x509

from sim.certs import Pki, issue_client, make_pki
from sim.scenario import Gpu, Scenario, gpu_uuid

PASSWORD = "s3cret-scrape"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def web_config(tmp_path: Path, pki: Pki, extra_tls: str = "") -> Path:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    path = tmp_path / "web.yml"
    # Relative paths resolve against the config file's folder, as in exporter-toolkit.
    path.write_text(
        f"tls_server_config:\n  cert_file: {pki.server_cert.name}\n  key_file: {pki.server_key.name}\n{extra_tls}"
        f"basic_auth_users:\n  prometheus: {hashed}\n"
    )
    return path


def scenario(tmp_path: Path) -> Path:
    path = tmp_path / "scenario.txt"
    Scenario(gpus=[Gpu(gpu_uuid(0), util=33)]).write(path)
    return path


def args(tmp_path: Path, config: Path) -> list[str]:
    return ["--no-kubernetes", "--pod-resources-socket", str(tmp_path / "none.sock"), "--web-config", str(config)]


def test_scrapes_need_credentials_over_tls(tmp_path: Path, pki: Pki, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(args(tmp_path, web_config(tmp_path, pki)), scenario(tmp_path), ca=pki.ca)
    assert agent.url.startswith("https://")
    refused = requests.get(agent.url + "/metrics", verify=agent.verify, timeout=5)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic")
    wrong = requests.get(agent.url + "/metrics", verify=agent.verify, auth=("prometheus", "nope"), timeout=5)
    assert wrong.status_code == 401
    ok = requests.get(agent.url + "/metrics", verify=agent.verify, auth=("prometheus", PASSWORD), timeout=5)
    assert ok.status_code == 200 and "gpu_exporter_nvml_up" in ok.text
    # Probes stay reachable without credentials (Kubernetes probes carry none).
    assert requests.get(agent.url + "/healthz", verify=agent.verify, timeout=5).status_code == 200
    # Plain HTTP on the TLS port gets no metrics.
    with pytest.raises(requests.ConnectionError):
        requests.get(agent.url.replace("https", "http") + "/metrics", timeout=5)
    # A client that connects and never handshakes does not block others.
    with socket.create_connection(("127.0.0.1", agent.port)):
        again = requests.get(agent.url + "/metrics", verify=agent.verify, auth=("prometheus", PASSWORD), timeout=5)
        assert again.status_code == 200


def test_client_certificates_when_required(tmp_path: Path, pki: Pki, start_agent) -> None:  # type: ignore[no-untyped-def]
    config = web_config(tmp_path, pki, f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n")
    agent = start_agent(args(tmp_path, config), scenario(tmp_path), ca=pki.ca)
    with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
        requests.get(agent.url + "/metrics", verify=agent.verify, auth=("prometheus", PASSWORD), timeout=5)
    ok = requests.get(
        agent.url + "/metrics",
        verify=agent.verify,
        auth=("prometheus", PASSWORD),
        cert=(str(pki.client_cert), str(pki.client_key)),
        timeout=5,
    )
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n", "cannot load cert_file"),
        ("tls_server_config:\n  cert_file: a.crt\n", "needs both cert_file and key_file"),
        ("tls_servr_config: {}\n", "unknown field(s) tls_servr_config"),
        ("basic_auth_users:\n  prometheus: plaintext\n", "bcrypt"),
        ("tls_server_config: [\n", "not valid YAML"),
        # Malformed fields: one line naming the field, never a traceback.
        ("tls_server_config:\n  cert_file: [a.crt]\n  key_file: a.key\n", "cert_file wants a string, not a list"),
        ("tls_server_config:\n  cert_file: 5\n  key_file: a.key\n", "cert_file wants a string, not a number"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: [x]\n", "client_auth_type wants"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: 1.2\n", "min_version wants a string"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_allowed_sans: x.svc\n", "a list of strings"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  cipher_suites: {a: 1}\n", "cipher_suites wants"),
        ("tls_server_config: 5\n", "tls_server_config wants a mapping, not a number"),
        ("basic_auth_users:\n  prometheus: [a]\n", "basic_auth_users.prometheus wants a bcrypt hash"),
        ("basic_auth_users:\n  123: x\n", "user names are strings"),
        ("basic_auth_users: [prometheus]\n", "basic_auth_users wants a mapping, not a list"),
        ("http_server_config:\n  http2: 7\n", "http_server_config.http2 wants true or false"),
        ("http_server_config:\n  headers:\n    X-Frame-Options: deny\n", "headers is not supported"),
        ("- tls_server_config\n", "not a list"),
        (b"basic_auth_users:\n  pr\xf6metheus: x\n", "not UTF-8"),
        ('tls_server_config:\n  cert_file: "a\\0.crt"\n  key_file: a.key\n', "cannot load cert_file"),  # a NUL byte
        # Cost 31 once hung start-up for about a day and a half, hashing the dummy.
        ("basic_auth_users:\n  prometheus: $2y$31$" + "a" * 53 + "\n", "bcrypt cost 31 is above 16"),
    ],
)
def test_bad_web_config_exits_2_naming_it(tmp_path: Path, content: str | bytes, complaint: str) -> None:
    config = tmp_path / "web.yml"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--web-config", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--web-config" in lines[0] and complaint in lines[0], lines


def test_unknown_tls_version_exits_2(tmp_path: Path, pki: Pki) -> None:
    config = web_config(tmp_path, pki, "  min_version: SSL3\n")
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--web-config", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "min_version wants one of TLS10, TLS11, TLS12, TLS13" in result.stderr


def test_a_nul_in_client_ca_file_and_deep_nesting_exit_2(tmp_path: Path, pki: Pki) -> None:
    """Each once ended in a traceback (ValueError, RecursionError) instead of one line."""
    nul_ca = web_config(
        tmp_path, pki, '  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: "ca\\0.crt"\n'
    )
    deep = tmp_path / "deep.yml"
    deep.write_text("basic_auth_users: " + "[" * 5000 + "]" * 5000 + "\n")
    for config, complaint in ((nul_ca, "cannot load client_ca_file"), (deep, "nested too deeply")):
        result = subprocess.run(
            [sys.executable, "-m", "exporter", "--web-config", str(config)], capture_output=True, text=True, timeout=30
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and complaint in lines[0], lines


def test_a_tls_version_range_that_admits_nothing_exits_2(tmp_path: Path, pki: Pki) -> None:
    """OpenSSL takes min_version TLS13 with max_version TLS12 and then fails every handshake."""
    for versions, floor in (
        ("  min_version: TLS13\n  max_version: TLS12\n", "TLS13"),
        ("  max_version: TLS11\n", "TLS12"),
    ):
        config = web_config(tmp_path, pki, versions)
        result = subprocess.run(
            [sys.executable, "-m", "exporter", "--web-config", str(config)], capture_output=True, text=True, timeout=30
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and f"is below min_version {floor}" in lines[0], lines


def test_unreadable_web_config_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--web-config", str(tmp_path / "absent.yml")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "cannot read" in result.stderr


def test_tls_version_floor(tmp_path: Path, pki: Pki, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(
        args(tmp_path, web_config(tmp_path, pki, "  min_version: TLS13\n")), scenario(tmp_path), ca=pki.ca
    )
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", agent.port)) as raw, pytest.raises(ssl.SSLError):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


def negotiated(port: int, ca: Path, openssl_ciphers: str) -> str | None:
    """The TLS 1.2 suite a client offering only ``openssl_ciphers`` gets, or None if refused."""
    context = ssl.create_default_context(cafile=str(ca))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(openssl_ciphers)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            suite = tls.cipher()
            return suite[0] if suite else None
    except ssl.SSLError:
        return None


def test_cipher_suites_limit_tls12_to_the_listed_ones(tmp_path: Path, pki: Pki, start_agent) -> None:  # type: ignore[no-untyped-def]
    """exporter-toolkit's cipher_suites, by Go's names: a CBC suite (which OpenSSL would otherwise
    choose for a client offering only that) is refused when the file allows one AEAD suite. TLS 1.3
    is unaffected, as in Go."""
    config = web_config(tmp_path, pki, "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\n")
    agent = start_agent(args(tmp_path, config), scenario(tmp_path), ca=pki.ca)
    cbc = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384"
    assert negotiated(agent.port, pki.ca, cbc) is None
    assert negotiated(agent.port, pki.ca, f"{cbc}:ECDHE-ECDSA-AES256-GCM-SHA384") is None
    assert negotiated(agent.port, pki.ca, f"{cbc}:ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
    scrape = requests.get(agent.url + "/metrics", verify=agent.verify, auth=("prometheus", PASSWORD), timeout=5)
    assert scrape.status_code == 200  # over TLS 1.3


def test_cipher_suites_can_name_a_suite_python_leaves_out(tmp_path: Path, pki: Pki, start_agent) -> None:  # type: ignore[no-untyped-def]
    """Python's defaults leave out SHA-1 suites; a file listing one gets it, as with exporter-toolkit."""
    config = web_config(tmp_path, pki, "  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA]\n")
    agent = start_agent(args(tmp_path, config), scenario(tmp_path), ca=pki.ca)
    assert negotiated(agent.port, pki.ca, "ECDHE-ECDSA-AES128-SHA") == "ECDHE-ECDSA-AES128-SHA"
    assert negotiated(agent.port, pki.ca, "ECDHE-ECDSA-AES128-GCM-SHA256") is None


@pytest.mark.parametrize(
    ("extra_tls", "complaint"),
    [
        (
            "  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, ECDHE-RSA-AES128-SHA]\n",
            "unknown ECDHE-RSA-AES128",
        ),
        ("  cipher_suites: [TLS_RSA_WITH_RC4_128_SHA]\n", "cipher_suites: unknown TLS_RSA_WITH_RC4_128_SHA"),
        ("  cipher_suites: [TLS_AES_128_GCM_SHA256]\n  max_version: TLS12\n", "lists only TLS 1.3 suites"),
        ("  client_auth_type: RequireAnyClientCert\n", "RequireAnyClientCert (a client certificate asked for, not"),
        ("  client_auth_type: RequireClientCert\n  client_ca_file: CA\n", "use RequireAndVerifyClientCert"),
        ("  client_auth_type: RequestClientCert\n", "use VerifyClientCertIfGiven with client_ca_file"),
    ],
)
def test_tls_settings_python_cannot_serve_as_go_does_exit_2(
    tmp_path: Path, pki: Pki, extra_tls: str, complaint: str
) -> None:
    """Refused at start, one line, rather than served differently from exporter-toolkit: Python's
    TLS verifies every client certificate it asks for."""
    config = web_config(tmp_path, pki, extra_tls.replace("CA", str(pki.ca)))
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--web-config", str(config)], capture_output=True, text=True, timeout=30
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and complaint in lines[0], lines


def test_client_allowed_sans_admit_only_listed_certificates(tmp_path: Path, pki: Pki, start_agent) -> None:  # type: ignore[no-untyped-def]
    """As exporter-toolkit: a verified client certificate gets in only if one of its DNS, IP, email
    or URI names is listed; IP addresses match however the certificate spells them."""
    clients: dict[str, list[x509.GeneralName]] = {
        "dns": [x509.DNSName("prometheus.monitoring.svc")],
        "uri": [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/monitoring/sa/prometheus")],
        "email": [x509.RFC822Name("scraper@example.com")],
        "ipv6": [x509.IPAddress(ipaddress.ip_address("2001:db8::7"))],
        "other": [x509.DNSName("intruder.default.svc"), x509.IPAddress(ipaddress.ip_address("10.0.0.9"))],
    }
    certs = {name: issue_client(pki, name, sans) for name, sans in clients.items()}
    allowed = ["prometheus.monitoring.svc", "spiffe://cluster.local/ns/monitoring/sa/prometheus", "scraper@example.com"]
    sans = "".join(f"    - {name}\n" for name in [*allowed, "2001:DB8:0::7"])
    config = web_config(
        tmp_path,
        pki,
        f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n  client_allowed_sans:\n{sans}",
    )
    agent = start_agent(args(tmp_path, config), scenario(tmp_path), ca=pki.ca)

    def scrape(cert: tuple[Path, Path]) -> int:
        reply = requests.get(
            agent.url + "/metrics",
            verify=agent.verify,
            auth=("prometheus", PASSWORD),
            cert=(str(cert[0]), str(cert[1])),
            timeout=5,
        )
        return reply.status_code

    for name in ("dns", "uri", "email", "ipv6"):
        assert scrape(certs[name]) == 200, name
    for refused in (certs["other"], (pki.client_cert, pki.client_key), certs["other"]):
        with pytest.raises(requests.ConnectionError):
            scrape(refused)
    assert scrape(certs["dns"]) == 200
    # Logged once when refusals start, once when an allowed certificate comes back: not per connection.
    assert agent.log().count("refused the client certificate") == 1


def test_client_allowed_sans_need_a_required_client_certificate(tmp_path: Path, pki: Pki) -> None:
    config = web_config(
        tmp_path,
        pki,
        f"  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: {pki.ca}\n"
        "  client_allowed_sans: [prometheus.monitoring.svc]\n",
    )
    result = subprocess.run(
        [sys.executable, "-m", "exporter", "--web-config", str(config)], capture_output=True, text=True, timeout=30
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "client_allowed_sans needs client_auth_type" in lines[0]


def basic(user: str, password: str, scheme: str = "Basic") -> dict[str, str]:
    return {"Authorization": f"{scheme} " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_basic_auth_edges(tmp_path: Path, pki: Pki, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(args(tmp_path, web_config(tmp_path, pki)), scenario(tmp_path), ca=pki.ca)

    def status(headers: dict[str, str]) -> int:
        return requests.get(agent.url + "/metrics", verify=agent.verify, headers=headers, timeout=10).status_code

    # The scheme is case-insensitive (RFC 7617), as Go's Request.BasicAuth reads it.
    assert status(basic("prometheus", PASSWORD, "basic")) == 200
    assert status(basic("prometheus", PASSWORD, "BASIC")) == 200
    # bcrypt never hashed a password over 72 bytes: 401, not a dropped connection, for any user.
    assert status(basic("prometheus", "p" * 100)) == 401
    assert status(basic("nobody", "p" * 100)) == 401
    assert status(basic("prometheus", PASSWORD + "\0")) == 401
    assert status({"Authorization": "Basic not-base64!"}) == 401
    assert status({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}) == 401


def test_unknown_users_take_as_long_as_known_ones(tmp_path: Path, pki: Pki, start_agent) -> None:  # type: ignore[no-untyped-def]
    """A wrong password for a known user costs a bcrypt check; an unknown user must cost the same
    (a dummy hash), or a quick 401 tells which user names exist. A ratio with a wide margin: today
    the two differ about 200-fold, equal costs give about 1."""
    agent = start_agent(args(tmp_path, web_config(tmp_path, pki)), scenario(tmp_path), ca=pki.ca)
    session = requests.Session()  # one connection: the time is the server's check, not handshakes

    def seconds(user: str) -> float:
        started = time.perf_counter()
        assert (
            session.get(
                agent.url + "/metrics", verify=agent.verify, headers=basic(user, "wrong"), timeout=10
            ).status_code
            == 401
        )
        return time.perf_counter() - started

    seconds("warm-up")
    known, unknown = [], []
    for _ in range(7):
        known.append(seconds("prometheus"))
        unknown.append(seconds("mallory"))
    assert statistics.median(unknown) > 0.3 * statistics.median(known)


def guess_flood(port: int, connections: int, stop: threading.Event, refusals: list[int]) -> None:
    """Keeps ``connections`` clients each with 8 wrong-password requests in flight (pipelined), as
    long as ``stop`` is not set; counts the 401s that come back."""
    guess = (
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
        + base64.b64encode(b"prometheus:guess")
        + b"\r\n\r\n"
    )
    selector = selectors.DefaultSelector()
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(guess * 8)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    while not stop.is_set():
        for key, _ in selector.select(0.1):
            client = key.fileobj
            assert isinstance(client, socket.socket)
            with contextlib.suppress(BlockingIOError):
                answered = client.recv(65536).count(b"HTTP/1.1 401")
                refusals[0] += answered
                with contextlib.suppress(BlockingIOError):
                    client.send(guess * answered)
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    selector.close()


def test_wrong_passwords_delay_neither_probes_nor_cached_scrapes(tmp_path: Path, start_agent) -> None:  # type: ignore[no-untyped-def]
    """bcrypt checks run one at a time: a flood of wrong passwords once queued behind that lock on
    every worker, and /healthz waited seconds behind them, past the kubelet's 1 s probe timeout (a
    restart of a healthy agent). Probes are answered by the server's loop; guesses beyond a few
    waiting are refused at once; a credential already verified never waits for bcrypt."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    agent = start_agent(args(tmp_path, config), scenario(tmp_path))
    assert requests.get(agent.url + "/metrics", auth=("prometheus", PASSWORD), timeout=10).status_code == 200
    stop, refusals = threading.Event(), [0]
    flood = threading.Thread(target=guess_flood, args=(agent.port, 48, stop, refusals), daemon=True)
    flood.start()
    try:
        time.sleep(1)
        for _ in range(5):
            # The kubelet's default probe timeout is 1 s: a slower answer counts as a failed probe.
            assert requests.get(agent.url + "/healthz", timeout=1).status_code == 200
            assert requests.get(agent.url + "/readyz", timeout=1).status_code == 200
            scrape = requests.get(agent.url + "/metrics", auth=("prometheus", PASSWORD), timeout=2)
            assert scrape.status_code == 200 and "gpu_exporter_nvml_up" in scrape.text
        assert requests.get(agent.url + "/metrics", auth=("prometheus", "nope"), timeout=5).status_code == 401
        assert refusals[0] > 48  # the flood was answered (refused), not merely queued
    finally:
        stop.set()
        flood.join()
