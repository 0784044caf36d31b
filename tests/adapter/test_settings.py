"""Settings are checked at start: a bad flag or rules file stops ``gpu-metrics-adapter`` with exit
code 2 and one line naming the flag, the rule and the field; never a traceback, and never a start
that fails every request later."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

GOOD_RULES = "rules:\n- seriesQuery: duty_cycle_current\n"


def run_adapter(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter.adapter", "--cert-dir", str(tmp_path / "certs"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )


@pytest.fixture
def kubeconfig(tmp_path: Path) -> Path:
    """A valid kubeconfig; nothing needs to answer at its address for the checks to run."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'http://127.0.0.1:1'}\n"
        "users:\n- name: u\n  user: {}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n"
    )
    return path


def rules_file(tmp_path: Path, content: str | bytes) -> str:
    path = tmp_path / "rules.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return str(path)


CASES = [
    (["--prometheus-timeout", "nan"], "--prometheus-timeout"),
    (["--prometheus-timeout", "inf"], "--prometheus-timeout"),
    (["--prometheus-timeout", "0"], "--prometheus-timeout"),
    (["--prometheus-url", "prometheus:9090"], "--prometheus-url"),
    (["--bind-address", "localhost:6443"], "--bind-address"),
    (["--secure-port", "0"], "--secure-port"),
    (["--max-connections-per-client", "0"], "--max-connections-per-client"),
    (["--max-connections-per-client", "lots"], "--max-connections-per-client"),
    (["--requestheader-username-headers", ","], "--requestheader-username-headers"),
    (["--authorization-always-allow-paths", "healthz"], "--authorization-always-allow-paths"),
    (["--tls-cert-file", "/nonexistent/tls.crt"], "--tls-cert-file and --tls-private-key-file go together"),
    (["--requestheader-client-ca-file", "/nonexistent/ca.crt"], "--requestheader-client-ca-file"),
    (["--kubeconfig", "/nonexistent/kubeconfig"], "--kubeconfig: cannot use '/nonexistent/kubeconfig'"),
    (["--authentication-kubeconfig", "/nonexistent/kc"], "--authentication-kubeconfig"),
    (["--config", "RULES:rules: 5\n"], "rules: want a list of rules"),
    (["--config", "RULES:rules:\n- seriesQuery: x\n  resources: {namespace: []}\n"], "(x).resources.namespace"),
    (["--config", "RULES:rules: []\n"], "defines no metric"),
    (["--config", "RULES:\xff\xfe rules"], "is not UTF-8"),
    (["--config", "/nonexistent/rules.yaml"], "--config: cannot read"),
    # Empty list entries are refused, as k8s.io/apiserver refuses them, never dropped.
    (["--requestheader-group-headers", "X-Remote-Group,,X-Groups"], "--requestheader-group-headers: empty value"),
    (["--requestheader-uid-headers", "X-Remote-Uid,"], "--requestheader-uid-headers: empty value"),
    (["--requestheader-extra-headers-prefix", " "], "--requestheader-extra-headers-prefix: empty value"),
    (["--requestheader-allowed-names", "front-proxy,,aggregator"], "--requestheader-allowed-names: empty value"),
    (["--metrics-window", "15"], "--metrics-window"),  # a duration has a unit
    (["--metrics-window", "2h"], "--metrics-window"),
    (["--service-name", "Gpu_Adapter"], "--service-name"),
]


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(a)[:40] for a, _ in CASES])
def test_a_bad_setting_is_one_line_and_exit_code_2(
    tmp_path: Path, kubeconfig: Path, args: list[str], named: str
) -> None:
    args = [rules_file(tmp_path, a[6:].encode("latin-1")) if a.startswith("RULES:") else a for a in args]
    if "--kubeconfig" not in args:
        args = ["--kubeconfig", str(kubeconfig), *args]
    result = run_adapter(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("gpu-metrics-adapter: error: ") and named in line, line


def test_outside_a_cluster_without_a_kubeconfig_is_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    result = run_adapter(tmp_path, env=env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--kubeconfig not given and not running in a cluster" in line


def test_an_unwritable_cert_dir_is_one_line(tmp_path: Path, kubeconfig: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = run_adapter(tmp_path, "--kubeconfig", str(kubeconfig), "--cert-dir", str(tmp_path / "a-file" / "certs"))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--cert-dir: cannot write a self-signed pair" in line


@pytest.mark.parametrize("flag", ["--kubeconfig", "--authentication-kubeconfig", "--authorization-kubeconfig"])
def test_a_kubeconfig_the_loader_refuses_is_one_line_for_every_kubeconfig_flag(
    tmp_path: Path, kubeconfig: Path, flag: str
) -> None:
    """One loader reads all three: an exec plugin (which the pod watch cannot use) is refused at start
    whichever flag names it, never accepted by the reviews' client and failed by the watch's."""
    exec_plugin = tmp_path / "exec-kubeconfig"
    exec_plugin.write_text(
        kubeconfig.read_text().replace(
            "user: {}", "user: {exec: {apiVersion: client.authentication.k8s.io/v1, command: /bin/true}}"
        )
    )
    args = ["--kubeconfig", str(kubeconfig)] if flag != "--kubeconfig" else []
    result = run_adapter(tmp_path, *args, flag, str(exec_plugin))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"gpu-metrics-adapter: error: {flag}: cannot use") and "exec" in line, line
