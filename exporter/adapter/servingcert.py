"""A supplied serving certificate (``--tls-cert-file``/``--tls-private-key-file``) reloaded when
its files change, without a restart, as k8s.io/apiserver's dynamic serving certificate does:
cert-manager and kubelet's Secret volumes replace the files in place, and a certificate read only
at start expires in the pod.

The files are read every ``refresh_s``; when their bytes differ from those last installed, the pair
is loaded into a new TLS context and new connections are served with it (open ones keep theirs).
A pair that does not load (half written, or the certificate and key of different rotations) keeps
the one before in service: the failure is logged once per change of state, and the read is retried
with backoff until the files are whole again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from exporter.backoff import Backoff
from exporter.supervise import Loop, StateLog

log = logging.getLogger(__name__)


class ServingCertificate:
    def __init__(
        self,
        cert: str,
        key: str,
        install: Callable[[str, str], None],
        refresh_s: float = 10.0,
        backoff: Backoff | None = None,
    ) -> None:
        """``install`` serves new connections with the pair at those paths, or raises if it does not load."""
        self._cert, self._key = cert, key
        self._install = install
        self._refresh_s = refresh_s
        self._installed = self._read()  # the pair the server started with, checked at start
        self.loop = Loop(
            "serving-certificate",
            self._step,
            StateLog(log, f"reloading the serving certificate {cert}"),
            backoff or Backoff(initial_s=1.0, cap_s=30.0),
            consequence="new connections get the certificate loaded before; retrying with backoff",
            # A file being replaced, or a pair that does not match: the message says which.
            expected=(Exception,),
        )

    def _read(self) -> tuple[bytes, bytes]:
        return Path(self._cert).read_bytes(), Path(self._key).read_bytes()

    def _step(self) -> float:
        pair = self._read()
        if pair != self._installed:
            self._install(self._cert, self._key)
            self._installed = pair
            log.info("serving certificate reloaded from %s", self._cert)
        return self._refresh_s

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
