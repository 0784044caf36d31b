"""``gpu-metrics-adapter``: flags (named as k8s.io/apiserver names them), wiring, and start-up."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import os
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from exporter.adapter.auth import Authenticator, Authorizer
from exporter.adapter.kubeapi import KubeReviewer, read_requestheader_config
from exporter.adapter.prometheus import PrometheusClient
from exporter.adapter.provider import PrometheusProvider
from exporter.adapter.rules import DEFAULT_RULES, Rules, RulesError, load_rules
from exporter.adapter.server import AdapterServer, Services
from exporter.config import configure_logging
from exporter.httpserver import wait_for_signal
from exporter.kube import PodWatcher, api_client

log = logging.getLogger("exporter.adapter")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())}\n")
        raise SystemExit(2)


def build_parser() -> _Parser:
    parser = _Parser(
        prog="gpu-metrics-adapter",
        description="Serves GPU metrics from Prometheus through the Kubernetes custom and external "
        "metrics APIs, as an aggregated API server. `gpu-metrics-adapter hpa-explain` instead reads an HPA's "
        "numbers as JSON on stdin and prints what the HPA would do.",
    )
    add = parser.add_argument
    add("--secure-port", type=int, default=6443, help="HTTPS port (default 6443)")
    add("--bind-address", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    add("--tls-cert-file", help="serving certificate (PEM); without it a self-signed pair is written to --cert-dir")
    add("--tls-private-key-file", help="key of --tls-cert-file (PEM)")
    add(
        "--cert-dir",
        default="apiserver.local.config/certificates",
        help="where the self-signed pair goes when no certificate is given",
    )
    add(
        "--requestheader-client-ca-file",
        help="CA of the front proxy's client certificates (default: read from the ConfigMap "
        "kube-system/extension-apiserver-authentication)",
    )
    add(
        "--requestheader-allowed-names",
        default="",
        help="comma-separated CNs allowed for the front proxy (default: any chaining to the CA)",
    )
    add("--requestheader-username-headers", default="X-Remote-User")
    add("--requestheader-group-headers", default="X-Remote-Group")
    add("--kubeconfig", help="kubeconfig for the pod watch (default: in-cluster)")
    add("--authentication-kubeconfig", help="kubeconfig for TokenReviews (default: --kubeconfig)")
    add("--authorization-kubeconfig", help="kubeconfig for SubjectAccessReviews (default: --kubeconfig)")
    add("--authorization-always-allow-paths", default="/healthz,/readyz,/livez")
    add("--prometheus-url", default="http://localhost:9090", help="Prometheus HTTP API base URL")
    add("--prometheus-timeout", type=float, default=10.0, help="seconds per Prometheus query (default 10)")
    add("--config", help="rules file (default: the built-in rules for the agent's metrics)")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _rules(path: str | None, parser: _Parser) -> Rules:
    if not path:
        return DEFAULT_RULES
    try:
        return load_rules(Path(path).read_text(), path)
    except OSError as error:
        parser.error(f"--config: cannot read {path!r}: {error.strerror}")
    except RulesError as error:
        parser.error(f"--config: {error}")


def self_signed(cert_dir: Path) -> tuple[Path, Path]:
    """A serving pair for this host, as kube-apiserver's own --cert-dir does, reused if present."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert, key = cert_dir / "apiserver.crt", cert_dir / "apiserver.key"
    if cert.exists() and key.exists():
        return cert, key
    cert_dir.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"gpu-metrics-adapter@{socket.gethostname()}")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName(socket.gethostname()),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    os.chmod(key, 0o600)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert, key


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["hpa-explain"]:
        from exporter.adapter.explain import main as explain

        return explain()
    parser = build_parser()
    args = parser.parse_args(arguments)
    if not 0 < args.secure_port < 65536:
        parser.error(f"--secure-port: want 1 to 65535, got {args.secure_port}")
    if args.prometheus_timeout <= 0:
        parser.error(f"--prometheus-timeout: must be positive, got {args.prometheus_timeout}")
    if bool(args.tls_cert_file) != bool(args.tls_private_key_file):
        parser.error("--tls-cert-file and --tls-private-key-file go together")
    rules = _rules(args.config, parser)
    configure_logging(args.log_level)

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = (
        (args.tls_cert_file, args.tls_private_key_file) if args.tls_cert_file else self_signed(Path(args.cert_dir))
    )
    try:
        tls.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        parser.error(f"--tls-cert-file/--tls-private-key-file: cannot load: {error}")

    main_api = api_client(args.kubeconfig)
    username_headers = tuple(h.strip() for h in args.requestheader_username_headers.split(",") if h.strip())
    group_headers = tuple(h.strip() for h in args.requestheader_group_headers.split(",") if h.strip())
    allowed_names = tuple(n.strip() for n in args.requestheader_allowed_names.split(",") if n.strip())
    if args.requestheader_client_ca_file:
        try:
            tls.load_verify_locations(cafile=args.requestheader_client_ca_file)
        except (OSError, ssl.SSLError) as error:
            parser.error(f"--requestheader-client-ca-file: cannot load: {error}")
        tls.verify_mode = ssl.CERT_OPTIONAL
    else:
        try:
            published = read_requestheader_config(main_api)
            tls.load_verify_locations(cadata=published.client_ca_pem)
            tls.verify_mode = ssl.CERT_OPTIONAL
            allowed_names = allowed_names or published.allowed_names
            username_headers, group_headers = published.username_headers, published.group_headers
        except Exception as error:  # the API edge: without it, only bearer tokens authenticate
            log.warning("no front-proxy CA (%s): only bearer tokens will authenticate", error)

    reviewer = KubeReviewer(
        api_client(args.authentication_kubeconfig or args.kubeconfig),
        api_client(args.authorization_kubeconfig or args.kubeconfig),
    )
    pods = PodWatcher(None, args.kubeconfig)
    provider = PrometheusProvider(
        rules, PrometheusClient(args.prometheus_url, args.prometheus_timeout), lambda: pods.pods
    )
    services = Services(
        custom=provider,
        external=provider,
        authenticator=Authenticator(reviewer, allowed_names, username_headers, group_headers),
        authorizer=Authorizer(reviewer),
        always_allow_paths=frozenset(p.strip() for p in args.authorization_always_allow_paths.split(",")),
        ready=lambda: pods.pods is not None,
    )
    try:
        server = AdapterServer((args.bind_address, args.secure_port), tls, services)
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", args.bind_address, args.secure_port, error)
        return 1
    log.info(
        "gpu-metrics-adapter serving %d custom and %d external metrics from %s on https://%s:%d",
        len(rules.custom),
        len(rules.external),
        args.prometheus_url,
        args.bind_address,
        args.secure_port,
    )
    pods.start()
    server.start()
    wait_for_signal(log)
    server.shutdown()
    server.server_close()
    pods.stop()
    return 0
