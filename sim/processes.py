"""Starting programs as real processes for tests, demos and benchmarks: ours (the agent, the adapter,
the simulated node) and peers (Prometheus, hey, nvitop-exporter, inference replicas), one way.

A :class:`Process` is a ``subprocess.Popen`` that knows where its output goes, waits until a
readiness condition holds (failing with its log if it exits first or time runs out), and stops with
SIGTERM, then SIGKILL after a grace period; as a context manager it stops on leaving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import requests

from sim.certs import Pki
from sim.fakelib import build_fake_nvml

ROOT = Path(__file__).resolve().parents[1]

Output = Path | IO[Any] | int | None
"""Where a process's stdout and stderr go: a log file (Path, or one already open), the caller's own
output (None), or nowhere (subprocess.DEVNULL)."""


class Process(subprocess.Popen[bytes]):
    def __init__(
        self,
        argv: Sequence[str],
        *,
        what: str,
        output: Output = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = ROOT,
    ) -> None:
        self.what = what
        self.log_path: Path | None = None
        self._log: IO[bytes] | None = None
        stdout: IO[Any] | int | None
        if isinstance(output, Path):
            self.log_path, self._log = output, output.open("wb")
            stdout = self._log
        else:
            stdout = output
        super().__init__(
            list(argv), env=env, cwd=cwd, stdout=stdout, stderr=subprocess.STDOUT if stdout is not None else None
        )

    def log(self) -> str:
        """What it has written so far, when it writes to a log file."""
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_until(self, ready: Callable[[], bool], timeout_s: float = 15, what: str = "ready") -> Process:
        """Until ``ready()`` holds (an OSError from it, a refused connection say, means not yet).
        Raises RuntimeError, with the log's end, if the process exits first or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.poll() is not None:
                raise RuntimeError(f"{self.what} exited with {self.returncode} before {what}{self._tail()}")
            try:
                if ready():
                    return self
            except OSError:  # requests' errors are OSErrors too
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.what} was not {what} within {timeout_s} s{self._tail()}")
            time.sleep(0.05)

    def wait_for_port(self, port: int, timeout_s: float = 15) -> Process:
        """Until something accepts connections on 127.0.0.1:``port``."""
        return self.wait_until(lambda: _accepts(port), timeout_s, f"listening on {port}")

    def stop(self, grace_s: float = 10, signum: int = signal.SIGTERM) -> float:
        """``signum`` (SIGTERM), then SIGKILL if it has not exited within ``grace_s``; returns the
        seconds it took. Stopping a stopped process only closes its log."""
        started = time.monotonic()
        if self.poll() is None:
            self.send_signal(signum)
            try:
                self.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill()
                self.wait()
        if self._log is not None:
            self._log.close()
        return time.monotonic() - started

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _tail(self) -> str:
        text = self.log()
        return f"; its log ({self.log_path}) ends:\n{text[-3000:]}" if text else ""


def _accepts(port: int) -> bool:
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    return True


def spawn_agent(
    port: int,
    scenario: Path | None,
    *args: str,
    library_dir: Path | None = None,
    output: Output = subprocess.DEVNULL,
) -> Process:
    """``python -m exporter`` on 127.0.0.1:``port`` with the fake NVML library (``library_dir``, by
    default the built one; pass an empty folder for "no driver") driven by ``scenario``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_EXPORTER_")}
    env["LD_LIBRARY_PATH"] = str(library_dir if library_dir is not None else build_fake_nvml().parent)
    env["PYTHONUNBUFFERED"] = "1"
    if scenario is not None:
        env["FAKE_NVML_SCENARIO"] = str(scenario)
    return Process(
        [sys.executable, "-m", "exporter", "--listen", f"127.0.0.1:{port}", *args],
        what="the agent",
        output=output,
        env=env,
    )


def spawn_adapter(
    port: int, *args: str, output: Output = subprocess.DEVNULL, what: str = "the adapter", cwd: Path = ROOT
) -> Process:
    """``python -m exporter.adapter`` on https://127.0.0.1:``port``, of the checkout at ``cwd``."""
    return Process(
        [sys.executable, "-m", "exporter.adapter", "--secure-port", str(port), "--bind-address", "127.0.0.1", *args],
        what=what,
        output=output,
        cwd=cwd,
    )


def adapter_args(pki: Pki, kubeconfig: Path, prometheus_url: str, *, front_proxy_ca: bool = True) -> list[str]:
    """The adapter's usual flags: ``pki``'s serving certificate, the front proxy's CA from ``pki``
    (without ``front_proxy_ca``, the adapter reads it from the cluster's ConfigMap), the cluster of
    ``kubeconfig`` and the Prometheus at ``prometheus_url``."""
    return [
        "--tls-cert-file",
        str(pki.server_cert),
        "--tls-private-key-file",
        str(pki.server_key),
        *(["--requestheader-client-ca-file", str(pki.ca)] if front_proxy_ca else []),
        "--kubeconfig",
        str(kubeconfig),
        "--prometheus-url",
        prometheus_url,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_adapter(
    directory: Path, pki: Pki, kubeconfig: Path, prometheus_url: str, *extra: str, ready: bool = True
) -> tuple[Process, str]:
    """The adapter as a process, once it listens (and, with ``ready``, once /readyz says so)."""
    port = free_port()
    process = spawn_adapter(
        port, *adapter_args(pki, kubeconfig, prometheus_url), *extra, output=directory / f"adapter-{port}.log"
    )
    url = f"https://127.0.0.1:{port}"
    try:
        process.wait_for_port(port)
        if ready:
            readyz = url + "/readyz"
            process.wait_until(
                lambda: requests.get(readyz, verify=str(pki.ca), timeout=5).status_code == 200, 30, "ready"
            )
    except RuntimeError:
        process.stop()
        raise
    return process, url
