"""A real Prometheus server (Debian package ``prometheus``) scraping given targets every second."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: .ci/run must apt-get install it")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    return binary


class Prometheus:
    def __init__(self, directory: Path, targets: list[str], port: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n- job_name: gpu-pod-exporter\n"
            "  honor_labels: true  # keep the agent's namespace/pod labels, not the scrape target's\n"
            f"  static_configs:\n  - targets: {targets!r}\n"
        )
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = directory / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        body = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5).json()
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Queries until the result is non-empty; fails with Prometheus's log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                result = self.query(promql)
                if result:
                    return result
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        pytest.fail(f"Prometheus never had {promql}:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self._log.close()
