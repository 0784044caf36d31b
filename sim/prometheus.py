"""A real metrics store scraping given targets every second: Prometheus (Debian package
``prometheus``) or VictoriaMetrics (``victoria-metrics``), both serving the Prometheus query API."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from sim.processes import Process


def installed(binary_name: str) -> str:
    binary = shutil.which(binary_name)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{binary_name} is not installed: .ci/run must apt-get install it")
        pytest.skip(f"{binary_name} is not installed (apt-get install {binary_name})")
    return binary


class Prometheus:
    def __init__(
        self,
        directory: Path,
        targets: list[str],
        port: int,
        kind: str = "prometheus",
        target_labels: dict[str, str] | None = None,
        web_config: Path | None = None,
    ) -> None:
        """With ``target_labels`` (the agent's own namespace and pod, as Kubernetes service discovery
        attaches them) and no honor_labels, the agent's clashing labels come in renamed to
        ``exported_namespace``/``exported_pod``, as in a scrape config that forgot honor_labels.
        ``web_config`` (Prometheus only) is its TLS and basic auth, re-read on every request; ``url``
        stays http:// and ``query`` unauthenticated, so its user asks over its own session."""
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "prometheus.yml"
        honor = "" if target_labels else "  honor_labels: true  # keep the agent's namespace/pod labels\n"
        labels = f"    labels: {target_labels!r}\n" if target_labels else ""
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            f"scrape_configs:\n- job_name: gpu-pod-exporter\n{honor}"
            f"  static_configs:\n  - targets: {targets!r}\n{labels}"
        )
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = directory / "prometheus.log"
        if kind == "prometheus":
            command = [
                installed("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                *([f"--web.config.file={web_config}"] if web_config else []),
            ]
        else:
            # Samples become visible to queries at once (not after the default 30 s), as in Prometheus.
            command = [
                installed("victoria-metrics"),
                f"-promscrape.config={config}",
                f"-httpListenAddr=127.0.0.1:{port}",
                f"-storageDataPath={directory / 'vmdata'}",
                "-search.latencyOffset=0s",
                "-search.disableCache",
            ]
        self.process = Process(command, what=kind, output=self.log_path)

    def query(self, promql: str) -> list[dict[str, Any]]:
        body = requests.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5).json()
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def wait_for(self, promql: str, timeout_s: float = 60) -> list[dict[str, Any]]:
        """Queries until the result is non-empty; fails with Prometheus's log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                result = self.query(promql)
                if result:
                    return result
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        pytest.fail(f"{self.process.what} never had {promql}:\n{self.process.log()[-3000:]}")

    def stop(self) -> None:
        self.process.stop()
