"""The node agent: read → attribute → snapshot → expose, as one loop in one direction.

The poll thread reads NVML, the kubelet and /proc, attributes, and swaps in a new Snapshot. The
render thread turns the latest snapshot into exposition bytes after each poll and at least once
per interval, so a stuck poll still ages out its data (staleness) and the age gauges move on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from exporter.attribute import attribute
from exporter.collector import SnapshotCollector
from exporter.config import Config, configure_logging, parse_config
from exporter.httpserver import wait_for_signal
from exporter.model import EMPTY_ATTRIBUTION, Allocation, Health, Snapshot
from exporter.nvml import NvmlReader
from exporter.podresources.client import PodResourcesClient
from exporter.procfs import ProcReader
from exporter.server import Exposition, MetricsServer

if TYPE_CHECKING:
    from exporter.kube import PodWatcher

log = logging.getLogger("exporter")


class Agent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.nvml = NvmlReader()
        self.kubelet = PodResourcesClient(config.pod_resources_socket)
        self.procs = ProcReader(config.proc_root)
        self.pods: PodWatcher | None = None
        if config.kubernetes:
            # Imported here: the kubernetes client costs ~50 MB of memory, not paid with --no-kubernetes.
            from exporter.kube import PodWatcher

            self.pods = PodWatcher(config.node_name, config.kubeconfig)
        self._snapshot: Snapshot | None = None
        self._device_errors: Counter[tuple[str, str, str]] = Counter()
        self._last_success: float | None = None
        self._last_allocations: tuple[float, Sequence[Allocation]] = (float("-inf"), ())
        self._polled = threading.Event()
        self._stop = threading.Event()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(lambda: self._snapshot, config.max_staleness_s))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.exposition = Exposition(registry)

    def poll_once(self) -> Snapshot:
        started = time.monotonic()
        nvml_poll = self.nvml.poll(self.config.interval_s, deadline_s=self.config.interval_s * 0.8)
        allocations = self._allocations(started)
        pids = {p.pid for device in nvml_poll.devices for p in device.processes or ()}
        owners = self.procs.owners(pids)
        pods = self.pods.pods if self.pods is not None else None
        attribution = (
            attribute(nvml_poll.devices, allocations, owners, pods) if nvml_poll.devices else EMPTY_ATTRIBUTION
        )
        self._device_errors.update(nvml_poll.errors)
        finished = time.monotonic()
        if self.nvml.initialised:
            self._last_success = time.time()
        snapshot = Snapshot(
            node=self.config.node_name,
            attribution=attribution,
            health=Health(
                nvml_up=self.nvml.initialised,
                nvml_status=self.nvml.status,
                pod_resources_up=self.kubelet.up,
                kubernetes_up=self.pods.up if self.pods is not None else None,
                poll_duration_seconds=finished - started,
                last_success_wall_time=self._last_success,
                device_errors=dict(self._device_errors),
                pod_resources_errors_total=dict(self.kubelet.errors),
            ),
            completed_at=finished,
        )
        self._snapshot = snapshot
        self._polled.set()
        return snapshot

    def _allocations(self, now: float) -> Sequence[Allocation]:
        """The kubelet's allocations; the last good answer bridges a failed call for up to the
        staleness bound, so one rate-limited or slow call does not strip the pod labels for a poll."""
        allocations = self.kubelet.list_allocations()
        if allocations is not None:
            self._last_allocations = (now, allocations)
            return allocations
        when, last = self._last_allocations
        return last if now - when <= self.config.max_staleness_s else ()

    def readiness(self) -> tuple[bool, str]:
        snapshot = self._snapshot
        if snapshot is None:
            return False, "no poll finished yet"
        if not snapshot.health.nvml_up:
            return False, snapshot.health.nvml_status
        return True, f"ready: {snapshot.health.nvml_status}"

    def _poll_loop(self) -> None:
        next_poll = time.monotonic()
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a bug in one poll must not end polling; the age gauge shows it
                log.exception("poll failed")
            next_poll += self.config.interval_s
            delay = next_poll - time.monotonic()
            if delay < 0:  # overran: skip the missed ticks rather than poll back to back
                next_poll = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def _render_loop(self) -> None:
        while not self._stop.is_set():
            self._polled.wait(timeout=self.config.interval_s)
            self._polled.clear()
            self.exposition.render()

    def start(self) -> None:
        if self.pods is not None:
            self.pods.start()
        threading.Thread(target=self._poll_loop, name="poll", daemon=True).start()
        threading.Thread(target=self._render_loop, name="render", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._polled.set()
        if self.pods is not None:
            self.pods.stop()
        self.kubelet.close()


def _web_mode(config: Config) -> str:
    if config.web is None:
        return "plain HTTP, no auth"
    return ("TLS" if config.web.tls else "plain HTTP") + (", basic auth" if config.web.auth else ", no auth")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(argv)
    configure_logging(config.log_level)
    log.info(
        "gpu-pod-exporter starting: node %s, listening on %s:%d (%s), polling every %gs, pod-resources %s, "
        "proc root %s, Kubernetes API %s",
        config.node_name,
        config.listen_host or "*",
        config.listen_port,
        _web_mode(config),
        config.interval_s,
        config.pod_resources_socket,
        config.proc_root,
        "on" if config.kubernetes else "off",
    )
    agent = Agent(config)
    try:
        server = MetricsServer((config.listen_host, config.listen_port), agent.exposition, agent.readiness, config.web)
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", config.listen_host or "*", config.listen_port, error)
        return 1
    agent.exposition.render()
    agent.start()
    server.start()
    wait_for_signal(log)
    server.shutdown()
    server.server_close()
    agent.stop()
    return 0
