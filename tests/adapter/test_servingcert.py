"""A supplied serving certificate is reloaded when its files change, over real TLS: new connections
get the new certificate, a half-rotated pair keeps the one before (logged once), and a front
proxy's kept-alive connection stays trusted across the reload (it was verified under the same CA).
"""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from exporter.adapter.auth import Authenticator, Authorizer, RequestHeaderConfig
from exporter.adapter.server import AdapterServer, Services
from exporter.adapter.servingcert import ServingCertificate
from exporter.backoff import Backoff
from sim.certs import Pki, make_pki
from tests.adapter import test_trust as trust_tests
from tests.adapter.test_trust import until


def served_certificate(port: int) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port)).encode())


def certificate(pki: Pki) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.server_cert.read_bytes())


FRONT_PROXY_REQUEST = b"GET /apis HTTP/1.1\r\nHost: adapter\r\nX-Remote-User: kube-apiserver\r\n\r\n"


def status_line(connection: ssl.SSLSocket) -> bytes:
    return trust_tests.status_line(connection, FRONT_PROXY_REQUEST)


def test_new_connections_get_the_rotated_certificate_and_a_half_written_pair_keeps_the_old(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(old.server_cert, cert)
    shutil.copy(old.server_key, key)
    services = Services(
        custom=None,  # type: ignore[arg-type]
        external=None,  # type: ignore[arg-type]
        authenticator=Authenticator(trust_tests._Allow()),
        authorizer=Authorizer(trust_tests._Allow()),
        always_allow_paths=frozenset({"/readyz"}),
        not_ready=lambda: "",
    )
    server = AdapterServer(("127.0.0.1", 0), str(cert), str(key), services)
    server.trust(RequestHeaderConfig(old.ca.read_text()))  # the front proxy's CA: old's, throughout
    server.start()
    port = server.server_address[1]
    reloader = ServingCertificate(
        str(cert), str(key), server.serve_certificate, refresh_s=0.05, backoff=Backoff(initial_s=0.05, cap_s=0.1)
    )
    reloader.start()
    front_proxy = ssl.create_default_context(cafile=str(old.ca))
    front_proxy.load_cert_chain(old.client_cert, old.client_key)
    try:
        assert served_certificate(port) == certificate(old)
        with front_proxy.wrap_socket(
            socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost"
        ) as kept_alive:
            assert status_line(kept_alive) == b"HTTP/1.1 200 OK"
            # Half rotated: the new certificate beside the old key. The old pair goes on serving.
            shutil.copy(new.server_cert, cert)
            failing = "reloading the serving certificate"
            assert until(lambda: any(failing in r.getMessage() and "failing" in r.getMessage() for r in caplog.records))
            assert until(lambda: reloader.loop.state.failures >= 3, 10)  # retried, logged once
            assert served_certificate(port) == certificate(old)
            shutil.copy(new.server_key, key)
            assert until(lambda: served_certificate(port) == certificate(new), 10)
            # Verified under the CA still current: the kept-alive connection is still answered.
            assert status_line(kept_alive) == b"HTTP/1.1 200 OK"
        messages = [r.getMessage() for r in caplog.records if failing in r.getMessage()]
        assert [m for m in messages if "failing" in m] == [messages[0]]
        assert any("recovered" in m for m in messages)
        assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    finally:
        reloader.stop()
        server.shutdown()
        server.server_close()
