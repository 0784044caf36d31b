"""Trusting the front proxy: kube-apiserver's client CA and request-header settings, read until they
are read and re-read while serving, because the CA rotates.

The settings come from ``--requestheader-client-ca-file`` or from the ConfigMap
``kube-system/extension-apiserver-authentication``. Until the first read succeeds, only bearer
tokens authenticate and /readyz says not ready: kube-apiserver's requests could not be told from
anyone's. Failures back off with jitter, as client-go does, and are logged once per change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from exporter.adapter.auth import RequestHeaderConfig
from exporter.backoff import Backoff

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
        self._backoff = backoff or Backoff(initial_s=1.0, cap_s=30.0)
        self.loaded = threading.Event()
        self._stop = threading.Event()
        self._current: RequestHeaderConfig | None = None
        self._failing = ""  # failures are logged once per change

    def start(self) -> None:
        """One read now, so a working setup serves authenticated from its first request; the thread
        takes over from there."""
        wait_s = self._attempt()
        self._thread = threading.Thread(target=self._run, args=(wait_s,), name="front-proxy-ca", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, wait_s: float) -> None:
        while not self._stop.wait(wait_s):
            wait_s = self._attempt()

    def _attempt(self) -> float:
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
            self._backoff.reset()
            self._failing = ""
            return self._refresh_s
        except Exception as error:  # the API or file edge: any failure means "try again later"
            message = f"{type(error).__name__}: {error}".splitlines()[0]
            if message != self._failing:
                kept = "keeping the one read before" if self._current else "only bearer tokens authenticate until then"
                log.warning("cannot read the front proxy's CA (%s); retrying, %s", message, kept)
                self._failing = message
            return min(self._backoff.next_delay(), self._refresh_s)
