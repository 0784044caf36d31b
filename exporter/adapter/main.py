"""``gpu-metrics-adapter``: flags (named as k8s.io/apiserver names them), wiring, and start-up."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import re
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes import client

from exporter.adapter import api
from exporter.adapter.auth import Authenticator, Authorizer, RequestHeaderConfig, header_names
from exporter.adapter.frontproxy import FrontProxyTrust
from exporter.adapter.kubeapi import KubeReviewer, api_client, read_api_services, read_requestheader_config
from exporter.adapter.ownership import ApiServiceOwnership
from exporter.adapter.pods import PodIndex, pod_meta
from exporter.adapter.promauth import VERBS, PrometheusAccess, SettingError, checked_url, prometheus_session
from exporter.adapter.prometheus import PrometheusClient, PrometheusProvider
from exporter.adapter.reachability import PrometheusReachability
from exporter.adapter.rules import DEFAULT_RULES, DEFAULT_WINDOW_S, Rules, RulesError, load_rules
from exporter.adapter.selfmetrics import SelfMetrics
from exporter.adapter.server import SHARED_BODY_BYTES, AdapterServer, Services, tls_context
from exporter.adapter.servingcert import ServingCertificate
from exporter.adapter.sharing import SharedAnswers
from exporter.cli import ArgumentParser
from exporter.config import configure_logging
from exporter.exposition.httpserver import DEFAULT_MAX_CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS
from exporter.sources.kube import Reflector
from exporter.sources.kubeclient import ConfigError, Credentials, KubeClient, load_credentials
from exporter.supervise import wait_for_signal

if TYPE_CHECKING:  # grpc is loaded only when the KEDA scaler is served
    from exporter.adapter.keda.server import ScalerServer

log = logging.getLogger("exporter.adapter")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
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
    # Named as prometheus-adapter names them; README "Reaching a secured or distributed Prometheus".
    add("--prometheus-ca-file", help="CA that signed Prometheus's serving certificate (PEM; default: the system's)")
    add("--prometheus-client-tls-cert-file", help="client certificate to present to Prometheus (PEM)")
    add("--prometheus-client-tls-key-file", help="key of --prometheus-client-tls-cert-file (PEM)")
    add("--prometheus-token-file", help="bearer token for Prometheus, re-read when the file changes")
    add(
        "--prometheus-header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="header sent with every query, e.g. X-Scope-OrgID=team-a (repeatable)",
    )
    add(
        "--prometheus-auth-config",
        help="kubeconfig whose TLS and credentials reach Prometheus (its server is ignored: --prometheus-url)",
    )
    add(
        "--prometheus-auth-incluster",
        action="store_true",
        help="reach Prometheus with the pod's service-account token and CA",
    )
    add("--prometheus-verb", default="POST", choices=VERBS, help="HTTP method of queries (default POST)")
    add("--config", help="rules file (default: the built-in rules for the agent's metrics)")
    add(
        "--max-connections-per-client",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
        help=f"connections one client (an IPv4 address or an IPv6 /64) may hold open, of the {MAX_CONNECTIONS} "
        f"served; beyond it that client's least useful one is closed (default {DEFAULT_MAX_CONNECTIONS_PER_CLIENT})",
    )
    add(
        "--metrics-window",
        default=f"{DEFAULT_WINDOW_S}s",
        help="the built-in rules serve each gauge's average over this window (a duration: 15s, 1m; "
        f"default {DEFAULT_WINDOW_S}s, metrics-server's resolution): longer is steadier, and slower to follow a change",
    )
    add(
        "--service-namespace",
        help="namespace of the Service the APIServices should point at, to check that they do "
        "(default: the pod's own namespace; outside a pod, not checked)",
    )
    add("--service-name", default="gpu-metrics-adapter", help="name of that Service (default gpu-metrics-adapter)")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add(
        "--keda-scaler-port",
        type=int,
        help="also serve KEDA's external scaler (gRPC) on this port, over TLS with the serving certificate "
        "(default: off)",
    )
    add(
        "--keda-scaler-client-ca-file",
        help="CA of the client certificates KEDA presents (its TriggerAuthentication's tlsClientCert); "
        "required with --keda-scaler-port unless --keda-scaler-insecure",
    )
    add(
        "--keda-scaler-insecure",
        action="store_true",
        help="serve the KEDA scaler in plain text, to any client (logs a warning); for a mesh that "
        "encrypts and authenticates for it",
    )
    add(
        "--keda-scaler-allowed-names",
        default="",
        help="comma-separated names (CN or subject alternative name) a KEDA client certificate must carry "
        "(default: any certificate --keda-scaler-client-ca-file admits)",
    )
    add(
        "--prometheus-allow-insecure-credentials",
        action="store_true",
        help="send the Prometheus credentials to an http:// --prometheus-url (default: refused at start); for a "
        "mesh that encrypts the way",
    )
    return parser


def _rules(path: str | None, parser: ArgumentParser) -> Rules:
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


def _credentials(flag: str, kubeconfig: str | None, parser: ArgumentParser) -> Credentials:
    """Credentials from a kubeconfig, or the pod's service account; a missing or broken one (or one
    the loader does not support, such as an exec plugin) is a start-up error naming the flag, never
    a traceback at the first request."""
    try:
        return load_credentials(kubeconfig)
    except ConfigError as error:
        if kubeconfig:
            parser.error(f"{flag}: cannot use {kubeconfig!r}: {error}")
        parser.error(f"{flag} not given and not running in a cluster ({error})")


def _validate(args: argparse.Namespace, parser: ArgumentParser) -> None:
    if not 0 < args.secure_port < 65536:
        parser.error(f"--secure-port: want 1 to 65535, got {args.secure_port}")
    try:
        ipaddress.ip_address(args.bind_address)
    except ValueError:
        parser.error(f"--bind-address: want an IP address, got {args.bind_address!r}")
    if not math.isfinite(args.prometheus_timeout) or args.prometheus_timeout <= 0:
        parser.error(f"--prometheus-timeout: want a positive number of seconds, got {args.prometheus_timeout}")
    try:
        checked_url(args.prometheus_url)
    except SettingError as error:
        parser.error(str(error))
    if bool(args.tls_cert_file) != bool(args.tls_private_key_file):
        parser.error("--tls-cert-file and --tls-private-key-file go together")
    _entries("--requestheader-allowed-names", args.requestheader_allowed_names, parser)
    for flag, value, required in (
        ("--requestheader-username-headers", args.requestheader_username_headers, True),
        ("--requestheader-group-headers", args.requestheader_group_headers, True),
        ("--requestheader-uid-headers", args.requestheader_uid_headers, False),
        ("--requestheader-extra-headers-prefix", args.requestheader_extra_headers_prefix, False),
    ):
        names = _entries(flag, value, parser)
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
    window_s = _duration_s(args.metrics_window)
    if window_s is None or not 1 <= window_s <= MAX_WINDOW_S:
        got = args.metrics_window
        parser.error(f"--metrics-window: want a duration from 1s to 1h in whole seconds (15s, 1m), got {got!r}")
    args.metrics_window_s = window_s
    for flag, name in (("--service-namespace", args.service_namespace), ("--service-name", args.service_name)):
        if name is not None and not api.DNS_LABEL.fullmatch(name):
            parser.error(f"{flag}: want a DNS label (lower-case letters, digits and '-'), got {name!r}")


MAX_WINDOW_S = 3600
_UNIT_S = {"s": 1, "m": 60, "h": 3600}


def _duration_s(text: str) -> int | None:
    """A duration as Go's flags write the simple ones (``15s``, ``1m``, ``1m30s``), in seconds;
    None if it is not one."""
    parts = re.findall(r"(\d+)([smh])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(int(n) * _UNIT_S[u] for n, u in parts)


def _listed(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _entries(flag: str, value: str, parser: ArgumentParser) -> tuple[str, ...]:
    """A list flag's entries; an empty one ("a,,b", "a,") is refused, as k8s.io/apiserver refuses it,
    rather than dropped. An empty value is an empty list."""
    if not value:
        return ()
    entries = tuple(v.strip() for v in value.split(","))
    if not all(entries):
        parser.error(f"{flag}: empty value in {value!r}")
    return entries


def _serving_pair(args: argparse.Namespace, parser: ArgumentParser) -> tuple[str, str]:
    if args.tls_cert_file:
        return args.tls_cert_file, args.tls_private_key_file
    from exporter.adapter.selfsigned import self_signed  # cryptography is loaded only to make a pair

    try:
        cert, key = self_signed(Path(args.cert_dir))
    except OSError as error:
        parser.error(f"--cert-dir: cannot write a self-signed pair to {args.cert_dir!r}: {error.strerror}")
    return str(cert), str(key)


def _front_proxy_source(
    args: argparse.Namespace, parser: ArgumentParser, main_api: client.ApiClient, cert: str, key: str
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


def _check_keda_scaler(args: argparse.Namespace, parser: ArgumentParser, cert: str, key: str) -> None:
    allowed_names = _entries("--keda-scaler-allowed-names", args.keda_scaler_allowed_names, parser)
    if args.keda_scaler_port is None:
        if args.keda_scaler_client_ca_file or args.keda_scaler_insecure or allowed_names:
            parser.error(
                "--keda-scaler-client-ca-file, --keda-scaler-insecure and --keda-scaler-allowed-names want "
                "--keda-scaler-port"
            )
        return
    if allowed_names and args.keda_scaler_insecure:
        parser.error("--keda-scaler-allowed-names: a plain-text client has no certificate to name it")
    if not 0 < args.keda_scaler_port < 65536 or args.keda_scaler_port == args.secure_port:
        parser.error(f"--keda-scaler-port: want 1 to 65535, not --secure-port, got {args.keda_scaler_port}")
    if args.keda_scaler_insecure == bool(args.keda_scaler_client_ca_file):
        parser.error(
            "--keda-scaler-port wants --keda-scaler-client-ca-file (client certificates verified) or, "
            "to serve plain text on purpose, --keda-scaler-insecure; not both"
        )
    if args.keda_scaler_client_ca_file:
        try:
            tls_context(cert, key, Path(args.keda_scaler_client_ca_file).read_text())
        except (OSError, ssl.SSLError, UnicodeDecodeError) as error:
            parser.error(f"--keda-scaler-client-ca-file: cannot load: {error}")


def _start_keda_scaler(
    args: argparse.Namespace, provider: PrometheusProvider, pods: PodIndex, cert: str, key: str
) -> ScalerServer | None:
    """The KEDA external scaler's server, started, when --keda-scaler-port asks for it (grpc is loaded
    only then). Raises OSError when it cannot listen or read its files, ValueError when they no longer load."""
    if args.keda_scaler_port is None:
        return None
    from exporter.adapter.keda.scaler import GpuScaler
    from exporter.adapter.keda.server import MAX_STREAMS, ScalerServer, ScalerTls

    names = frozenset(_listed(args.keda_scaler_allowed_names))
    scaler = GpuScaler(provider, pods.names, args.prometheus_timeout + 2, MAX_STREAMS, allowed_names=names)
    if args.keda_scaler_insecure:
        log.warning(
            "the KEDA scaler on port %d serves plain text to any client (--keda-scaler-insecure)", args.keda_scaler_port
        )
    tls = None if args.keda_scaler_insecure else ScalerTls(cert, key, args.keda_scaler_client_ca_file)
    server = ScalerServer((args.bind_address, args.keda_scaler_port), scaler, tls)
    server.start()
    log.info("serving KEDA's external scaler on %s:%d", args.bind_address, server.port)
    return server


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["hpa-explain"]:
        from exporter.adapter.explain import main as explain

        return explain()
    parser = build_parser()
    args = parser.parse_args(arguments)
    _validate(args, parser)
    rules = _rules(args.config, parser)
    prometheus = _prometheus_client(args, parser)
    main_api = api_client(_credentials("--kubeconfig", args.kubeconfig, parser))
    reviewer = KubeReviewer(
        api_client(
            _credentials("--authentication-kubeconfig", args.authentication_kubeconfig or args.kubeconfig, parser)
        ),
        api_client(
            _credentials("--authorization-kubeconfig", args.authorization_kubeconfig or args.kubeconfig, parser)
        ),
    )
    cert, key = _serving_pair(args, parser)
    try:
        tls_context(cert, key, None)
    except (OSError, ssl.SSLError) as error:
        parser.error(f"--tls-cert-file/--tls-private-key-file: cannot load: {error}")
    read_front_proxy = _front_proxy_source(args, parser, main_api, cert, key)
    _check_keda_scaler(args, parser, cert, key)
    configure_logging(args.log_level)
    return _serve(args, rules, prometheus, reviewer, cert, key, read_front_proxy, main_api)


def _prometheus_client(args: argparse.Namespace, parser: ArgumentParser) -> PrometheusClient:
    access = PrometheusAccess(
        url=args.prometheus_url,
        ca_file=args.prometheus_ca_file,
        client_cert_file=args.prometheus_client_tls_cert_file,
        client_key_file=args.prometheus_client_tls_key_file,
        token_file=args.prometheus_token_file,
        headers=tuple(args.prometheus_header),
        auth_config=args.prometheus_auth_config,
        auth_in_cluster=args.prometheus_auth_incluster,
        allow_insecure_credentials=args.prometheus_allow_insecure_credentials,
    )
    try:
        session = prometheus_session(access)
    except SettingError as error:
        parser.error(str(error))
    return PrometheusClient(args.prometheus_url, args.prometheus_timeout, session, args.prometheus_verb)


def _serve(
    args: argparse.Namespace,
    rules: Rules,
    prometheus: PrometheusClient,
    reviewer: KubeReviewer,
    cert: str,
    key: str,
    read_front_proxy: Callable[[], RequestHeaderConfig],
    main_api: client.ApiClient,
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
    self_metrics = SelfMetrics()
    reachability = PrometheusReachability(prometheus)
    provider = PrometheusProvider(
        rules,
        prometheus,
        pods.names,
        window_s=args.metrics_window_s,
        reachability=reachability.state,
        count_error=self_metrics.count_prometheus_error,
    )
    trust: FrontProxyTrust | None = None

    def not_ready() -> str:
        if not pods.synced:
            return "the pod cache has not synced yet"
        if trust is not None and not trust.loaded.is_set():
            return "the front proxy's CA has not been read yet"
        return ""

    ownership = _ownership(args, main_api)
    services = Services(
        custom=provider,
        external=provider,
        authenticator=Authenticator(reviewer),
        authorizer=Authorizer(reviewer),
        always_allow_paths=frozenset(_listed(args.authorization_always_allow_paths)),
        not_ready=not_ready,
        # A request waits for an identical one in flight no longer than that one's query may take.
        answers=SharedAnswers(SHARED_BODY_BYTES, len, wait_s=args.prometheus_timeout + 2),
        conditions=lambda: [("prometheus", reachability.trouble()), *(ownership.conditions() if ownership else ())],
        self_metrics=self_metrics,
    )
    gauges = self_metrics.gauges
    gauges.prometheus_up = lambda: reachability.reachable
    gauges.apiservices_owned = lambda: ownership.owned if ownership else {}
    gauges.cache_entries = {
        "answers": lambda: len(services.answers),
        "queries": lambda: len(provider.shared),
        "pods": lambda: len(reflector.items or ()),
        "tokens": lambda: len(services.authenticator.tokens),
        "decisions": lambda: len(services.authorizer.decisions),
    }
    try:
        server = AdapterServer(
            (args.bind_address, args.secure_port), cert, key, services, args.max_connections_per_client
        )
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", args.bind_address, args.secure_port, error)
        return 1

    try:
        keda_scaler = _start_keda_scaler(args, provider, pods, cert, key)
    except (OSError, ValueError) as error:
        log.error("cannot serve the KEDA scaler: %s", error)
        server.server_close()
        return 1
    trust = FrontProxyTrust(read_front_proxy, server.trust)
    serving = ServingCertificate(cert, key, server.serve_certificate) if args.tls_cert_file else None
    background = [loop for loop in (reachability, ownership, serving) if loop is not None]
    log.info(
        "gpu-metrics-adapter serving %d custom and %d external metrics from %s on https://%s:%d",
        len(rules.custom),
        len(rules.external),
        prometheus.where,
        args.bind_address,
        args.secure_port,
    )
    trust.start()
    reflector.start()
    for loop in background:
        loop.start()
    server.start()
    wait_for_signal(log)
    if keda_scaler is not None:
        keda_scaler.stop()
    server.shutdown()
    server.server_close()
    reflector.stop()
    trust.stop()
    for loop in background:
        loop.stop()
    return 0


SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _ownership(args: argparse.Namespace, main_api: client.ApiClient) -> ApiServiceOwnership | None:
    """The APIService check, for the Service the flags (or the pod's namespace) name."""
    namespace = args.service_namespace
    if not namespace:
        try:
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        except OSError:
            log.info("not checking which Service the APIServices point at: not in a pod and no --service-namespace")
            return None
    custom = tuple(f"{version}.{api.CUSTOM}" for version in api.VERSIONS[api.CUSTOM])
    external = tuple(f"{version}.{api.EXTERNAL}" for version in api.VERSIONS[api.EXTERNAL])
    return ApiServiceOwnership(
        lambda: read_api_services(main_api), (namespace, args.service_name), required=custom, optional=external
    )
