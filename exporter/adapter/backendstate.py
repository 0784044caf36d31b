"""A backend's health as request threads see it: exporter.supervise's StateLog (a failure logged
once per change of state, and once on recovery) shared by every request thread."""

from __future__ import annotations

import logging
import threading

from exporter.supervise import StateLog


class BackendState:
    """StateLog is one thread's; here every call holds one lock, except a success while healthy
    (every request's case), which reads a field and takes none."""

    def __init__(self, logger: logging.Logger, what: str, consequence: str = "") -> None:
        self._state = StateLog(logger, what)
        self._consequence = consequence
        self._lock = threading.Lock()

    def failed(self, state: str) -> None:
        with self._lock:
            self._state.failed(state, self._consequence)

    def recovered(self) -> None:
        if self._state.failing is not None:
            with self._lock:
                self._state.recovered()
