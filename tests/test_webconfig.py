"""TLS and basic auth on /metrics from an exporter-toolkit web config, over real TLS sockets."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
import requests

from tests.sim.certs import Pki, make_pki
from tests.sim.scenario import Gpu, Scenario, gpu_uuid

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
    ],
)
def test_bad_web_config_exits_2_naming_it(tmp_path: Path, content: str, complaint: str) -> None:
    config = tmp_path / "web.yml"
    config.write_text(content)
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
