"""Whether the APIServices of the metrics APIs this adapter serves send their requests to it.

prometheus-adapter and GKE's Stackdriver adapter register the same APIServices
(``v1beta2.custom.metrics.k8s.io`` and so on): applying this adapter's takes them over, and another
install applied later takes them back, silently either way. The APIServices are read every
``interval_s``; each one's state (ours, another Service's, served by kube-apiserver itself, not
registered) is logged once per change and read by the ``gpu_adapter_apiservice_owned`` gauge and
``/readyz?verbose``. It is reported, never a readiness failure: this adapter may well be the one
meant to stand aside. An optional APIService (the external metrics API, opt-in and often KEDA's)
that is not registered is no trouble.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from exporter.backoff import Backoff
from exporter.supervise import Loop, StateLog

log = logging.getLogger(__name__)

ServiceRef = tuple[str, str]  # (namespace, name)
ReadApiServices = Callable[[], Mapping[str, ServiceRef | None]]


class ApiServiceOwnership:
    def __init__(
        self,
        read: ReadApiServices,
        ours: ServiceRef,
        required: tuple[str, ...],
        optional: tuple[str, ...],
        interval_s: float = 60.0,
        backoff: Backoff | None = None,
    ) -> None:
        self._read = read
        self._ours = ours
        self._optional = frozenset(optional)
        where = f"{ours[0]}/{ours[1]}"
        self._states = {
            name: StateLog(log, f"the APIService {name} pointing at this adapter's Service {where}")
            for name in (*required, *optional)
        }
        self._interval_s = interval_s
        self.owned: dict[str, bool] = {}  # APIService name -> whether it points here; empty until read
        self.troubles: dict[str, str] = {}  # APIService name -> what is wrong ("" when it points here)
        self.loop = Loop(
            "apiservice-ownership",
            self._step,
            StateLog(log, "reading the APIServices"),
            backoff or Backoff(initial_s=1.0, cap_s=interval_s),
            consequence="whether they point at this adapter is unknown meanwhile; retrying with backoff",
            expected=(Exception,),  # the API edge: its message says what is wrong
        )

    def _step(self) -> float:
        try:
            registered = self._read()
        except Exception:
            self.owned, self.troubles = {}, {}  # unknown now: reported as missing, never as not ours
            raise
        owned, troubles = {}, {}
        for name, state in self._states.items():
            trouble = self._trouble(name, registered)
            if trouble is None:
                state.recovered()
                continue
            owned[name], troubles[name] = not trouble, trouble
            if trouble:
                state.failed(trouble, "the API server sends its requests elsewhere")
            else:
                state.recovered()
        self.owned, self.troubles = owned, troubles
        return self._interval_s

    def _trouble(self, name: str, registered: Mapping[str, ServiceRef | None]) -> str | None:
        """What is wrong with the APIService ``name``: "" if it points here, None if there is
        nothing to report (an optional one not registered)."""
        if name not in registered:
            return None if name in self._optional else "not registered"
        service = registered[name]
        if service is None:
            return "served by kube-apiserver itself"
        if service != self._ours:
            return f"points at the Service {service[0]}/{service[1]}"
        return ""

    def conditions(self) -> list[tuple[str, str]]:
        return [(f"apiservice {name}", trouble) for name, trouble in sorted(self.troubles.items())]

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
