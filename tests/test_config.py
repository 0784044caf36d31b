"""Flags, their environment variables, and bad settings (exit code 2, one line naming the setting)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.config import DEFAULT_SOCKET, parse_config


def test_defaults() -> None:
    config = parse_config([], environ={"NODE_NAME": "gpu-node-7"})
    assert (config.listen_host, config.listen_port) == ("", 9400)
    assert config.interval_s == 1.0 and config.max_staleness_s == 3.0
    assert config.pod_resources_socket == DEFAULT_SOCKET
    assert config.proc_root == "/proc"
    assert config.node_name == "gpu-node-7"
    assert config.kubernetes and config.kubeconfig is None and config.log_level == "info"
    assert config.max_connections_per_client == 64


def test_environment_variables_and_flags_override_them(tmp_path: Path) -> None:
    environ = {
        "GPU_EXPORTER_LISTEN": "127.0.0.1:9500",
        "GPU_EXPORTER_INTERVAL": "2.5",
        "GPU_EXPORTER_PROC_ROOT": str(tmp_path),
        "GPU_EXPORTER_NO_KUBERNETES": "true",
        "NODE_NAME": "env-node",
    }
    config = parse_config([], environ=environ)
    assert (config.listen_host, config.listen_port, config.interval_s) == ("127.0.0.1", 9500, 2.5)
    assert config.max_staleness_s == 7.5 and config.proc_root == str(tmp_path) and not config.kubernetes
    config = parse_config(["--interval", "5", "--node-name", "flag-node", "--max-staleness", "6"], environ=environ)
    assert (config.interval_s, config.node_name, config.max_staleness_s) == (5.0, "flag-node", 6.0)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--listen", ":70000"], "--listen"),
        (["--listen", "nohost"], "--listen"),
        (["--interval", "-1"], "--interval"),
        (["--interval", "often"], "--interval"),
        (["--max-staleness", "0"], "--max-staleness"),
        (["--interval", "1e300"], "--interval"),  # the threads' waits overflow
        (["--interval", "1e-9"], "--interval"),  # a core spent polling
        (["--interval", "nan"], "--interval"),
        (["--interval", "2", "--max-staleness", "1"], "--max-staleness"),  # fresher than a poll
        (["--max-stale", "9"], "--max-stale"),  # no abbreviations: not taken as --max-staleness
        (["--pod-resources-socket", "/"], "--pod-resources-socket"),
        (["--proc-root", "/nonexistent/proc"], "--proc-root"),
        (["--kubeconfig", "/nonexistent/kubeconfig"], "--kubeconfig"),
        (["--kubeconfig", "/"], "--kubeconfig"),  # a directory
        (["--kubeconfig", "/dev/null"], "--kubeconfig"),  # not a mapping
        (["--log-level", "loud"], "--log-level"),
        (["--max-connections-per-client", "0"], "--max-connections-per-client"),
        (["--max-connections-per-client", "513"], "--max-connections-per-client"),  # more than are served
        (["--max-connections-per-client", "many"], "--max-connections-per-client"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_settings_exit_2_with_one_line_naming_them(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv, environ={})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err


@pytest.mark.parametrize(
    ("user", "complaint"),
    [
        ({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "aws"}}, "exec not supported"),
        ({"tokenFile": "absent-token"}, "cannot read token file"),
        ({"client-certificate": "absent.crt", "client-key": "absent.key"}, "cannot set up TLS"),
    ],
    ids=["exec-plugin", "token-file-missing", "client-cert-missing"],
)
def test_kubeconfig_credentials_are_checked_at_start(
    tmp_path: Path, user: dict[str, object], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Accepted at start, they once failed only later, in the pod watch's thread, over and over."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--kubeconfig", str(kubeconfig)], environ={})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--kubeconfig" in err and complaint in err, err


def test_bad_environment_value_is_named_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_config([], environ={"GPU_EXPORTER_INTERVAL": "0"})
    assert exit_info.value.code == 2
    assert "--interval (env GPU_EXPORTER_INTERVAL)" in capsys.readouterr().err


def test_console_script_help_documents_every_flag() -> None:
    result = subprocess.run([sys.executable, "-m", "exporter", "--help"], capture_output=True, text=True, check=True)
    for flag in (
        "--listen",
        "--interval",
        "--max-staleness",
        "--pod-resources-socket",
        "--proc-root",
        "--node-name",
        "--kubeconfig",
        "--no-kubernetes",
        "--log-level",
    ):
        assert flag in result.stdout
    assert "GPU_EXPORTER_INTERVAL" in result.stdout and "NODE_NAME" in result.stdout


def test_bad_flag_from_the_command_line_exits_2() -> None:
    result = subprocess.run([sys.executable, "-m", "exporter", "--listen", ":0"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "gpu-pod-exporter: error: --listen (env GPU_EXPORTER_LISTEN): want host:port with a port from 1 to 65535, "
        "got ':0'"
    ]
