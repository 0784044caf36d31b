"""Starting the project's programs as real processes for tests, demos and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from tests.sim.fakelib import build_fake_nvml

ROOT = Path(__file__).resolve().parents[2]


def spawn_agent(
    port: int,
    scenario: Path | None,
    *args: str,
    library_dir: Path | None = None,
    output: IO[Any] | int = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    """``python -m exporter`` on 127.0.0.1:``port`` with the fake NVML library (``library_dir``, by
    default the built one; pass an empty folder for "no driver") driven by ``scenario``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_EXPORTER_")}
    env["LD_LIBRARY_PATH"] = str(library_dir if library_dir is not None else build_fake_nvml().parent)
    env["PYTHONUNBUFFERED"] = "1"
    if scenario is not None:
        env["FAKE_NVML_SCENARIO"] = str(scenario)
    return subprocess.Popen(
        [sys.executable, "-m", "exporter", "--listen", f"127.0.0.1:{port}", *args],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def spawn_adapter(port: int, *args: str, output: IO[Any] | int = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """``python -m exporter.adapter`` on https://127.0.0.1:``port``."""
    return subprocess.Popen(
        [sys.executable, "-m", "exporter.adapter", "--secure-port", str(port), "--bind-address", "127.0.0.1", *args],
        stdout=output,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 15, what: str = "") -> None:
    """Until something accepts connections on ``port``; fails if ``process`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what or process.args} exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what or process.args} did not listen on {port} in time")
