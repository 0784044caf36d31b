"""Certificate files reloaded when they change, without a restart, as k8s.io/apiserver's dynamic
serving certificate does: cert-manager and kubelet's Secret volumes replace the files in place (a
``..data`` symlink swapped), and a certificate read only at start expires in the pod.

``WatchedFiles`` reads its files every ``refresh_s``; when their bytes differ from those last
installed, it hands them to ``install``, which puts them in service for new connections (open ones
keep theirs) or raises. Files that do not install (half written, or a certificate and key of
different rotations) keep the ones before in service: the failure is logged once per change of
state, and the read is retried with backoff until the files are whole again. ``ServingCertificate``
is the HTTPS server's pair; the KEDA scaler's gRPC server watches its pair and client CA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from exporter.backoff import Backoff
from exporter.supervise import Loop, StateLog

log = logging.getLogger(__name__)

REFRESH_S = 10.0


class WatchedFiles:
    def __init__(
        self,
        name: str,
        subject: str,
        paths: Sequence[str],
        install: Callable[[tuple[bytes, ...]], None],
        refresh_s: float = REFRESH_S,
        backoff: Backoff | None = None,
    ) -> None:
        """``install`` serves new connections with the files' contents (in the order of ``paths``), or
        raises if they do not load. The contents at start are taken as installed; ``contents`` has them."""
        self._subject = subject
        self._paths = tuple(paths)
        self._install = install
        self._refresh_s = refresh_s
        self.contents = self._read()
        self.loop = Loop(
            name,
            self._step,
            StateLog(log, f"reloading the {subject} {self._paths[0]}"),
            backoff or Backoff(initial_s=1.0, cap_s=30.0),
            consequence=f"new connections get the {subject} loaded before; retrying with backoff",
            # A file being replaced, or a pair that does not match: the message says which.
            expected=(Exception,),
        )

    def _read(self) -> tuple[bytes, ...]:
        return tuple(Path(path).read_bytes() for path in self._paths)

    def _step(self) -> float:
        contents = self._read()
        if contents != self.contents:
            self._install(contents)
            self.contents = contents
            log.info("%s reloaded from %s", self._subject, ", ".join(self._paths))
        return self._refresh_s

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()


class ServingCertificate(WatchedFiles):
    def __init__(
        self,
        cert: str,
        key: str,
        install: Callable[[str, str], None],
        refresh_s: float = REFRESH_S,
        backoff: Backoff | None = None,
    ) -> None:
        """``install`` serves new connections with the pair at those paths, or raises if it does not load."""
        super().__init__(
            "serving-certificate", "serving certificate", (cert, key), lambda _: install(cert, key), refresh_s, backoff
        )


def check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """Raises ValueError unless both parse and the key is the certificate's (not of another rotation)."""
    # Loaded here, by the KEDA scaler alone: the HTTPS server's ssl checks its pair from the files.
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    certificate = x509.load_pem_x509_certificate(cert_pem)
    key = load_pem_private_key(key_pem, password=None)
    if certificate.public_key() != key.public_key():
        raise ValueError("the certificate and the key are of different pairs")


def check_certificates(pem: bytes) -> None:
    """Raises ValueError unless ``pem`` holds a whole certificate (a CA file being written may not)."""
    from cryptography import x509

    x509.load_pem_x509_certificates(pem)
