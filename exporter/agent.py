"""The node agent: read → attribute → snapshot → expose, as one loop in one direction.

The poll thread reads NVML, attributes with the latest answers of the kubelet and /proc (read on a
thread of their own, so device data never waits on them), and swaps in a new Snapshot. The render
thread turns the latest snapshot into exposition bytes after each poll and at least once per
interval, so a stuck poll still ages out its data (staleness); the age gauges are computed when
scraped.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from exporter.attribution import accounting
from exporter.attribution.attribute import attribute
from exporter.attribution.health import gpu_health
from exporter.backoff import Backoff
from exporter.catalogue import COST, DCGM, SAMPLED_EVERY
from exporter.config import Config, configure_logging, parse_config
from exporter.exposition.collector import AgeCollector, SnapshotCollector
from exporter.exposition.render import Exposition
from exporter.exposition.server import MetricsServer
from exporter.model import EMPTY_ATTRIBUTION, CostSeries, GpuSeries, Health, PodInfo, Snapshot
from exporter.sources.nvml import NvmlReader
from exporter.sources.podresources.client import PodResourcesClient
from exporter.sources.podsources import PodSources
from exporter.sources.procfs import ProcReader
from exporter.supervise import Loop, StateLog, describe, wait_for_signal

if TYPE_CHECKING:
    from exporter.sources.kube import PodWatcher
    from exporter.sources.resourceslices import SliceWatcher

log = logging.getLogger("exporter")


class Agent:
    """Owns the agent's threads: starts them in order and stops them in reverse.

    The poll thread reads NVML and attributes with the latest pod sources; the pod-sources thread
    asks the kubelet and /proc off the NVML path; the render thread turns the latest snapshot into
    exposition bytes after each poll and at least once per interval. Each survives any exception in
    one unit of work, and ``readiness`` says not ready when either has not finished one lately.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.nvml = NvmlReader(groups=config.metric_groups)
        self.sources = PodSources(
            PodResourcesClient(config.pod_resources_socket),
            ProcReader(config.proc_root),
            config.interval_s,
            pods_watched=config.kubernetes,
        )
        self.pods: PodWatcher | None = None
        self.slices: SliceWatcher | None = None  # DRA devices; the watch starts with the first DRA claim
        if config.kubernetes:
            # Imported here: with --no-kubernetes the watch and its HTTP client are not loaded at all.
            from exporter.sources.kube import PodWatcher
            from exporter.sources.resourceslices import SliceWatcher

            self.pods = PodWatcher(config.node_name, config.kubeconfig)
            self.slices = SliceWatcher(config.node_name, config.kubeconfig)
        self._snapshot: Snapshot | None = None
        self._pods_seen: Mapping[str, PodInfo] | None = None
        self._device_errors: Counter[tuple[str, str, str]] = Counter()
        self._last_success: float | None = None
        # Per-pod energy and GPU-time across polls (the cost group); None with the group off.
        self._ledger = accounting.Ledger() if COST in config.metric_groups else None
        self._costs: tuple[CostSeries, ...] | None = () if self._ledger is not None else None
        self._unaccounted: list[Sequence[GpuSeries]] = []  # polls' series the ledger has yet to take
        self._counter_readings: Mapping[str, float] = {}  # the energy counters when it last took them
        self._accounting_gaps: Counter[str] = Counter()
        self._accounting_state = StateLog(log, "cost accounting")

        # Each survives any exception in one poll or render: the failure is logged once per change
        # of state, readiness and the age gauges show it, and the next attempt comes a poll interval
        # later (no backoff growth: polling is the agent's job, and its cost is one poll).
        def every_interval() -> Backoff:
            return Backoff(initial_s=config.interval_s, cap_s=config.interval_s, jitter=0.0)

        self._next_poll = 0.0
        self._poll = Loop("poll", self._poll_step, StateLog(log, "polling"), every_interval())
        self._render = Loop(
            "render",
            self._render_step,
            StateLog(log, "rendering /metrics"),
            every_interval(),
            consequence="serving the last good rendering, which ages out; retrying",
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(
            SnapshotCollector(lambda: self._snapshot, config.max_staleness_s, dcgm=DCGM in config.metric_groups)
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.exposition = Exposition(
            self.registry, AgeCollector(lambda: self._snapshot), max_age_s=config.max_staleness_s
        )
        # Past this, a poll that has not finished, or a render loop that has not come round, means
        # the served data is not being renewed.
        self._liveness_bound_s = max(3 * config.interval_s, 2.0)
        self._render_loop_seen: float | None = None  # when the render loop last came round

    def poll_once(self) -> Snapshot:
        started = time.monotonic()
        nvml_poll = self.nvml.poll(self.config.interval_s, deadline_s=self.config.interval_s * 0.8)
        self.sources.want_owners(p.pid for device in nvml_poll.devices for p in device.processes or ())
        pods = self.pods.pods if self.pods is not None else None
        if pods is not self._pods_seen:  # republished only when this node's pods change
            self._pods_seen = pods
            self.sources.pods_changed()
        sources = self.sources.view()
        dra = self.slices.devices(sources.allocations) if self.slices is not None else None
        attribution = (
            attribute(nvml_poll.devices, sources.allocations, sources.owners, pods, dra)
            if nvml_poll.devices
            else EMPTY_ATTRIBUTION
        )
        self._device_errors.update(nvml_poll.errors)
        verdicts = (
            gpu_health(
                nvml_poll.devices,
                nvml_poll.lost,
                time.monotonic(),
                self.config.health_xid_window_s,
                self.config.max_staleness_s,
            )
            if "health" in self.config.metric_groups
            else ()
        )
        if self._ledger is not None:
            self._account(attribution.series)
        finished = time.monotonic()
        if self.nvml.initialised:
            self._last_success = time.time()
        snapshot = Snapshot(
            node=self.config.node_name,
            attribution=attribution,
            health=Health(
                nvml_up=self.nvml.initialised,
                nvml_status=self.nvml.status,
                pod_resources_up=sources.pod_resources_up,
                kubernetes_up=self.pods.up if self.pods is not None else None,
                poll_duration_seconds=finished - started,
                last_success_wall_time=self._last_success,
                device_errors=dict(self._device_errors),
                pod_resources_errors_total=dict(sources.pod_resources_errors),
                accounting_gaps_total=dict(self._accounting_gaps),
            ),
            completed_at=finished,
            gpu_health=verdicts,
            driver_version=self.nvml.driver_version,
            costs=self._costs,
        )
        self._snapshot = snapshot
        self.exposition.invalidate()
        return snapshot

    def _account(self, series: Sequence[GpuSeries]) -> None:
        """Adds this poll to the cost ledger. Its energy moves only when an energy counter does (read
        every SAMPLED_EVERY polls), so the polls in between are taken together then, on warm caches
        (half the CPU of a step each poll on cold ones): every scrape still sees the pods' energy add
        up to the counters it shows, and GPU-seconds lag by those polls at most. A fault in it costs
        the cost families their totals (they start again from 0, a counter reset to Prometheus),
        never the poll."""
        self._unaccounted.append(series)
        gaps: Counter[str] = Counter()
        try:
            readings = accounting.counter_readings(series)
            if readings == self._counter_readings and len(self._unaccounted) < SAMPLED_EVERY:
                return
            polls, self._unaccounted, self._counter_readings = self._unaccounted, [], readings
            ledger = self._ledger or accounting.Ledger()
            for poll in polls:
                ledger, skipped = accounting.step(ledger, poll)
                gaps.update(skipped)
        except Exception as error:
            self._ledger, self._costs, self._unaccounted = accounting.Ledger(), (), []
            self._accounting_state.failed(describe(error), "the cost families start again from 0", exc_info=error)
            return
        self._ledger, self._costs = ledger, ledger.costs()
        self._accounting_gaps.update(gaps)
        self._accounting_state.recovered()

    def readiness(self) -> tuple[bool, str]:
        """Computed from what is fresh now, not remembered from the last success."""
        snapshot = self._snapshot
        now = time.monotonic()
        if snapshot is None:
            return False, "no poll finished yet"
        if now - snapshot.completed_at > self._liveness_bound_s:
            return False, f"no poll finished in the last {now - snapshot.completed_at:.1f}s"
        seen = self._render_loop_seen
        if seen is None or now - seen > self._liveness_bound_s:
            return False, "the /metrics renderer has stopped"
        if self._render.state.failing is not None:
            return False, f"rendering /metrics fails ({self._render.state.failing})"
        if not snapshot.health.nvml_up:
            return False, snapshot.health.nvml_status
        read_at = {s.device.uuid: s.device.sampled_at for s in snapshot.attribution.series}
        newest_age = now - max(read_at.values(), default=now)
        if newest_age > self.config.max_staleness_s:
            return False, (
                f"no device read in the last {newest_age:.1f}s (all {len(read_at)} older than "
                f"--max-staleness {self.config.max_staleness_s:g}s): NVML reads are stalled"
            )
        return True, f"ready: {snapshot.health.nvml_status}"

    def _poll_step(self) -> float:
        """One poll; the seconds until the next tick (ticks missed by an overrun are skipped)."""
        self.poll_once()
        self._next_poll += self.config.interval_s
        delay = self._next_poll - time.monotonic()
        if delay < 0:
            self._next_poll = time.monotonic()
            return 0.0
        return delay

    def _render_step(self) -> float:
        """Renders when a scrape asks for data newer than the last rendering; comes round at least
        once per interval, so readiness can tell a live renderer from a dead one."""
        self._render_loop_seen = time.monotonic()
        if self.exposition.wait_for_demand(self.config.interval_s) and not self._render.stopping:
            self.exposition.render()
        return 0.0

    def start(self) -> None:
        self.sources.start()
        if self.pods is not None:
            self.pods.start()
        self._next_poll = time.monotonic()
        self._poll.start()
        self._render.start()

    def stop(self, timeout_s: float = 0.5) -> None:
        """Stops in reverse order of dependence: render and poll first, then what the poll reads
        (pod sources and the pod watch), NVML last. Threads stuck in a driver call are daemons and
        cannot hold up the exit."""
        self._poll.stop()
        self._render.stop()
        self.exposition.wake()
        deadline = time.monotonic() + timeout_s
        for loop in (self._poll, self._render):
            loop.join(max(0.0, deadline - time.monotonic()))
        self.sources.stop()
        if self.pods is not None:
            self.pods.stop()
        if self.slices is not None:
            self.slices.stop()
        self.sources.join(max(0.0, deadline - time.monotonic()))
        if self.pods is not None:
            self.pods.join(max(0.0, deadline - time.monotonic()))
        if self.slices is not None:
            self.slices.join(max(0.0, deadline - time.monotonic()))
        self.nvml.close()


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
        server = MetricsServer(
            (config.listen_host, config.listen_port),
            agent.exposition,
            agent.readiness,
            config.web,
            config.max_connections_per_client,
        )
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
