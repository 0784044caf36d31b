"""Whether Prometheus answers, as a condition people see, never as a readiness failure: taking
the API down would turn every HPA's metric into a discovery error, and the adapter's answers
already say 503 while Prometheus is out of reach.

The state is the latest outcome of the HPA's own queries (the provider reports them) or of a cheap
probe (``vector(1)``, answered without touching stored series) every ``interval_s``, which keeps
it current while no one asks. A change is logged once (the queries and the probe log a failure
the same way, so both failing is one state), and read by the ``gpu_adapter_prometheus_up`` gauge
and ``/readyz?verbose``.
"""

from __future__ import annotations

import logging

from exporter.adapter.prometheus import PrometheusClient, PrometheusUnavailableError, unreachable_state
from exporter.backoff import Backoff
from exporter.supervise import Loop, StateLog

log = logging.getLogger(__name__)

PROBE_QUERY = "vector(1)"


class PrometheusReachability:
    def __init__(self, prometheus: PrometheusClient, interval_s: float = 15.0, backoff: Backoff | None = None) -> None:
        self._prometheus = prometheus
        self._interval_s = interval_s
        self._probed = False
        self.state = StateLog(
            log, "reaching Prometheus", "custom and external metrics are answered 503 (the API stays available)"
        )
        self.loop = Loop(
            "prometheus-probe",
            self._probe,
            self.state,
            # Probed more often while failing, to see it back soon, never more than the interval apart.
            backoff or Backoff(initial_s=1.0, cap_s=interval_s),
            consequence="custom and external metrics are answered 503 (the API stays available)",
            expected=(PrometheusUnavailableError,),
            describe=lambda error: (
                unreachable_state(error) if isinstance(error, PrometheusUnavailableError) else str(error)
            ),
        )

    def _probe(self) -> float:
        try:
            self._prometheus.query(PROBE_QUERY)
        finally:
            self._probed = True
        return self._interval_s

    @property
    def reachable(self) -> bool | None:
        """Whether the latest query or probe was answered; None before the first probe, unless a
        query has failed meanwhile."""
        if self.state.failing is not None:
            return False
        return True if self._probed else None

    def trouble(self) -> str:
        """What /readyz?verbose says of Prometheus: "" when it answers."""
        failing = self.state.failing
        return f"Prometheus is not answering ({failing})" if failing else ""

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
