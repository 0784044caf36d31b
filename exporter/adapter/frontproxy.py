"""Trusting the front proxy: kube-apiserver's client CA and request-header settings, read until they
are read and re-read while serving, because the CA rotates.

The settings come from ``--requestheader-client-ca-file`` or from the ConfigMap
``kube-system/extension-apiserver-authentication``. Until the first read succeeds, only bearer
tokens authenticate and /readyz says not ready: kube-apiserver's requests could not be told from
anyone's. A supervised loop (exporter.supervise) re-reads them: failures back off with jitter, as
client-go does, and are logged once per change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from exporter.adapter.auth import RequestHeaderConfig
from exporter.backoff import Backoff
from exporter.supervise import Loop, StateLog

log = logging.getLogger(__name__)


class FrontProxyTrust:
    def __init__(
        self,
        read: Callable[[], RequestHeaderConfig],
        apply: Callable[[RequestHeaderConfig], None],
        refresh_s: float = 60.0,
        backoff: Backoff | None = None,
    ) -> None:
        """``apply`` installs a configuration (and raises if it cannot, e.g. a PEM that does not load)."""
        self._read, self._apply = read, apply
        self._refresh_s = refresh_s
        self.loaded = threading.Event()
        self._attempted = threading.Event()
        self._current: RequestHeaderConfig | None = None
        self.loop = Loop(
            "front-proxy-ca",
            self._step,
            StateLog(log, "reading the front proxy's CA"),
            backoff or Backoff(initial_s=1.0, cap_s=30.0),
            consequence="retrying with backoff; until a read succeeds the one read before is kept "
            "(none: only bearer tokens authenticate)",
            # The file or the API edge: its message says what is wrong, a traceback would not.
            expected=(Exception,),
        )

    def start(self) -> None:
        """Returns after the first read, so a working setup serves authenticated from its first request."""
        self.loop.start()
        self._attempted.wait()

    def stop(self) -> None:
        self.loop.stop()

    def _step(self) -> float:
        """Reads and installs the settings if they changed; returns how long to wait before the next read."""
        try:
            config = self._read()
            if config != self._current:
                self._apply(config)
                log.info(
                    "front-proxy CA %s (allowed names: %s)",
                    "reloaded" if self._current else "loaded",
                    ", ".join(config.allowed_names) or "any",
                )
                self._current = config
            self.loaded.set()
            return self._refresh_s
        finally:
            self._attempted.set()
