"""``gpu-metrics-adapter``: flags (named as k8s.io/apiserver names them), wiring, and start-up."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import math
import os
import socket
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from kubernetes import client

from exporter.adapter.auth import Authenticator, Authorizer, RequestHeaderConfig, header_names
from exporter.adapter.frontproxy import FrontProxyTrust
from exporter.adapter.kubeapi import KubeReviewer, api_client, read_requestheader_config
from exporter.adapter.pods import PodIndex, pod_meta
from exporter.adapter.prometheus import PrometheusClient, PrometheusProvider
from exporter.adapter.rules import DEFAULT_RULES, Rules, RulesError, load_rules
from exporter.adapter.server import SHARED_BODY_BYTES, AdapterServer, Services, tls_context
from exporter.adapter.sharing import SharedAnswers
from exporter.config import configure_logging
from exporter.exposition.httpserver import DEFAULT_MAX_CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS
from exporter.sources.kube import Reflector
from exporter.sources.kubeclient import ConfigError, KubeClient, load_credentials
from exporter.supervise import wait_for_signal

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
    add(
        "--requestheader-uid-headers",
        default="",
        help="comma-separated headers naming the user's UID, e.g. X-Remote-Uid (default: none); only headers "
        "the front proxy removes from its clients' requests (kube-apiserver removes X-Remote-Uid from 1.32)",
    )
    add(
        "--requestheader-extra-headers-prefix",
        default="X-Remote-Extra-",
        help="comma-separated prefixes of the headers naming the user's extra (default X-Remote-Extra-); only "
        "prefixes the front proxy removes from its clients' requests (kube-apiserver removes X-Remote-Extra-)",
    )
    add("--kubeconfig", help="kubeconfig for the pod watch (default: in-cluster)")
    add("--authentication-kubeconfig", help="kubeconfig for TokenReviews (default: --kubeconfig)")
    add("--authorization-kubeconfig", help="kubeconfig for SubjectAccessReviews (default: --kubeconfig)")
    add("--authorization-always-allow-paths", default="/healthz,/readyz,/livez")
    add("--prometheus-url", default="http://localhost:9090", help="Prometheus HTTP API base URL")
    add(
        "--prometheus-timeout",
        type=float,
        default=10.0,
        help="seconds a Prometheus query may take, as a whole (default 10)",
    )
    add("--config", help="rules file (default: the built-in rules for the agent's metrics)")
    add(
        "--max-connections-per-client",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        help=f"connections one client address may hold open, of the {MAX_CONNECTIONS} served; beyond it that "
        f"client's least useful one is closed (default {DEFAULT_MAX_CONNECTIONS_PER_CLIENT})",
    )
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _rules(path: str | None, parser: _Parser) -> Rules:
    if not path:
        return DEFAULT_RULES
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as error:
        parser.error(f"--config: cannot read {path!r}: {error.strerror}")
    except UnicodeDecodeError as error:
        parser.error(f"--config: {path!r} is not UTF-8 text (byte {error.start})")
    try:
        return load_rules(text, path)
    except RulesError as error:
        parser.error(f"--config: {error}")


def _kubernetes(flag: str, kubeconfig: str | None, parser: _Parser) -> client.ApiClient:
    """An API client from a kubeconfig, or the pod's service account; a missing or broken one is a
    start-up error naming the flag, never a traceback at the first request."""
    try:
        return api_client(kubeconfig)
    except Exception as error:  # the kubernetes client raises many kinds for a bad kubeconfig
        reason = " ".join(str(error).split()) or type(error).__name__
        if kubeconfig:
            parser.error(f"{flag}: cannot use {kubeconfig!r}: {reason}")
        parser.error(f"{flag} not given and not running in a cluster ({reason})")


def _validate(args: argparse.Namespace, parser: _Parser) -> None:
    if not 0 < args.secure_port < 65536:
        parser.error(f"--secure-port: want 1 to 65535, got {args.secure_port}")
    try:
        ipaddress.ip_address(args.bind_address)
    except ValueError:
        parser.error(f"--bind-address: want an IP address, got {args.bind_address!r}")
    if not math.isfinite(args.prometheus_timeout) or args.prometheus_timeout <= 0:
        parser.error(f"--prometheus-timeout: want a positive number of seconds, got {args.prometheus_timeout}")
    url = urlsplit(args.prometheus_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        parser.error(f"--prometheus-url: want an http:// or https:// URL, got {args.prometheus_url!r}")
    if bool(args.tls_cert_file) != bool(args.tls_private_key_file):
        parser.error("--tls-cert-file and --tls-private-key-file go together")
    for flag, value, required in (
        ("--requestheader-username-headers", args.requestheader_username_headers, True),
        ("--requestheader-group-headers", args.requestheader_group_headers, True),
        ("--requestheader-uid-headers", args.requestheader_uid_headers, False),
        ("--requestheader-extra-headers-prefix", args.requestheader_extra_headers_prefix, False),
    ):
        names = _listed(value)
        if required and not names:
            parser.error(f"{flag}: want at least one header name")
        try:
            header_names(names, flag)
        except ValueError:
            parser.error(f"{flag}: want header names (HTTP tokens: no spaces, colons or quotes), got {value!r}")
    if not 1 <= args.max_connections_per_client <= MAX_CONNECTIONS:
        got = args.max_connections_per_client
        parser.error(f"--max-connections-per-client: want 1 to {MAX_CONNECTIONS}, got {got}")
    paths = _listed(args.authorization_always_allow_paths)
    if any(not p.startswith("/") for p in paths):
        parser.error(f"--authorization-always-allow-paths: want paths starting with /, got {','.join(paths)}")


def _listed(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


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


def _serving_pair(args: argparse.Namespace, parser: _Parser) -> tuple[str, str]:
    if args.tls_cert_file:
        return args.tls_cert_file, args.tls_private_key_file
    try:
        cert, key = self_signed(Path(args.cert_dir))
    except OSError as error:
        parser.error(f"--cert-dir: cannot write a self-signed pair to {args.cert_dir!r}: {error.strerror}")
    return str(cert), str(key)


def _front_proxy_source(
    args: argparse.Namespace, parser: _Parser, main_api: client.ApiClient, cert: str, key: str
) -> Callable[[], RequestHeaderConfig]:
    """How to read the front proxy's CA and header names: from --requestheader-client-ca-file
    (checked now), else from the extension-apiserver-authentication ConfigMap (read by the trust
    thread until it can be, and re-read as it rotates)."""
    allowed_names = _listed(args.requestheader_allowed_names)
    if not args.requestheader_client_ca_file:

        def from_config_map() -> RequestHeaderConfig:
            published = read_requestheader_config(main_api)
            return replace(published, allowed_names=allowed_names or published.allowed_names)

        return from_config_map
    ca_file = Path(args.requestheader_client_ca_file)

    def from_file() -> RequestHeaderConfig:
        return RequestHeaderConfig(
            ca_file.read_text(),
            allowed_names,
            username_headers=_listed(args.requestheader_username_headers),
            group_headers=_listed(args.requestheader_group_headers),
            uid_headers=_listed(args.requestheader_uid_headers),
            extra_header_prefixes=_listed(args.requestheader_extra_headers_prefix),
        )

    try:
        tls_context(cert, key, from_file().client_ca_pem)
    except (OSError, ssl.SSLError, UnicodeDecodeError) as error:
        parser.error(f"--requestheader-client-ca-file: cannot load: {error}")
    return from_file


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["hpa-explain"]:
        from exporter.adapter.explain import main as explain

        return explain()
    parser = build_parser()
    args = parser.parse_args(arguments)
    _validate(args, parser)
    rules = _rules(args.config, parser)
    main_api = _kubernetes("--kubeconfig", args.kubeconfig, parser)
    reviewer = KubeReviewer(
        _kubernetes("--authentication-kubeconfig", args.authentication_kubeconfig or args.kubeconfig, parser),
        _kubernetes("--authorization-kubeconfig", args.authorization_kubeconfig or args.kubeconfig, parser),
    )
    cert, key = _serving_pair(args, parser)
    try:
        tls_context(cert, key, None)
    except (OSError, ssl.SSLError) as error:
        parser.error(f"--tls-cert-file/--tls-private-key-file: cannot load: {error}")
    read_front_proxy = _front_proxy_source(args, parser, main_api, cert, key)
    try:
        load_credentials(args.kubeconfig)  # what the pod watch will use: checked now, not at its first list
    except ConfigError as error:
        parser.error(f"--kubeconfig: {error}")
    configure_logging(args.log_level)
    return _serve(args, rules, reviewer, cert, key, read_front_proxy)


def _serve(
    args: argparse.Namespace,
    rules: Rules,
    reviewer: KubeReviewer,
    cert: str,
    key: str,
    read_front_proxy: Callable[[], RequestHeaderConfig],
) -> int:
    """Wires the pod index, the provider and the server, serves until SIGTERM, stops in order."""
    reflector = Reflector(
        "pods in the cluster",
        "/api/v1/pods",
        pod_meta,
        connect=lambda: KubeClient(load_credentials(args.kubeconfig)),  # re-read after failures: tokens rotate
        metadata_only=True,
    )
    pods = PodIndex(reflector)
    provider = PrometheusProvider(rules, PrometheusClient(args.prometheus_url, args.prometheus_timeout), pods.names)
    trust: FrontProxyTrust | None = None

    def not_ready() -> str:
        if not pods.synced:
            return "the pod cache has not synced yet"
        if trust is not None and not trust.loaded.is_set():
            return "the front proxy's CA has not been read yet"
        return ""

    services = Services(
        custom=provider,
        external=provider,
        authenticator=Authenticator(reviewer),
        authorizer=Authorizer(reviewer),
        always_allow_paths=frozenset(_listed(args.authorization_always_allow_paths)),
        not_ready=not_ready,
        # A request waits for an identical one in flight no longer than that one's query may take.
        answers=SharedAnswers(SHARED_BODY_BYTES, len, wait_s=args.prometheus_timeout + 2),
    )
    try:
        server = AdapterServer(
            (args.bind_address, args.secure_port), cert, key, services, args.max_connections_per_client
        )
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", args.bind_address, args.secure_port, error)
        return 1

    trust = FrontProxyTrust(read_front_proxy, server.trust)
    log.info(
        "gpu-metrics-adapter serving %d custom and %d external metrics from %s on https://%s:%d",
        len(rules.custom),
        len(rules.external),
        args.prometheus_url,
        args.bind_address,
        args.secure_port,
    )
    trust.start()
    reflector.start()
    server.start()
    wait_for_signal(log)
    server.shutdown()
    server.server_close()
    reflector.stop()
    trust.stop()
    return 0
