"""Flags and their environment variables, parsed once into one frozen Config passed down."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from exporter.catalogue import DCGM, DCGM_MIRRORS, DEFAULT_GROUPS, GROUPS, parse_groups
from exporter.cli import ArgumentParser
from exporter.exposition.httpserver import DEFAULT_MAX_CONNECTIONS_PER_CLIENT, MAX_CONNECTIONS
from exporter.exposition.webconfig import WebConfig, WebConfigError, load_web_config
from exporter.sources.kubeclient import ConfigError, load_credentials

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# Faster than 0.1 s NVML's own sampling cannot keep up and a core is spent polling; slower than
# 5 minutes the data is older than any scrape interval or HPA sync cares for.
INTERVAL_RANGE_S = (0.1, 300.0)
STALENESS_MAX_S = 3600.0  # at least one interval: a reading cannot be fresher than the poll
# How long an Xid that needs a reset or a reboot keeps a GPU unhealthy: shorter than a minute and a
# scrape could miss it; longer than a week and a GPU fixed since stays flagged.
XID_WINDOW_RANGE_S = (60.0, 7 * 86400.0)
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Config:
    listen_host: str
    listen_port: int
    interval_s: float
    max_staleness_s: float
    pod_resources_socket: str
    proc_root: str
    node_name: str
    kubeconfig: str | None
    kubernetes: bool
    log_level: str
    web: WebConfig | None
    metric_groups: frozenset[str] = frozenset(DEFAULT_GROUPS)
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    health_xid_window_s: float = 3600.0


class _Parser(ArgumentParser):
    env_of: dict[str, str]  # flag -> its environment variable

    def bad(self, flag: str, problem: str) -> NoReturn:
        """Names the flag and its environment variable, since either may have set the value."""
        self.error(f"{flag} (env {self.env_of[flag]}): {problem}")


def _env(name: str) -> str:
    return f"GPU_EXPORTER_{name}"


def build_parser(environ: Mapping[str, str]) -> _Parser:
    parser = _Parser(
        prog="gpu-pod-exporter",
        allow_abbrev=False,  # --max-stale must not silently mean --max-staleness
        description="Exports per-GPU and per-pod GPU utilisation, memory, temperature and power "
        "for Prometheus. Every flag can also be set by the environment variable named in its help.",
    )

    parser.env_of = {}

    def add(flag: str, env: str, help_text: str, **kwargs: object) -> None:
        parser.env_of[flag] = env
        default = environ.get(env, kwargs.pop("default", None))
        parser.add_argument(flag, default=default, help=f"{help_text} [env {env}]", **kwargs)  # type: ignore[arg-type]

    add(
        "--listen",
        _env("LISTEN"),
        "address to serve /metrics, /healthz, /readyz on, host:port (default :9400)",
        default=":9400",
    )
    add("--interval", _env("INTERVAL"), "seconds between polls of NVML and the kubelet (default 1)", default="1")
    add(
        "--max-staleness",
        _env("MAX_STALENESS"),
        "seconds after which a device's reading is too old to export (default 3 intervals)",
    )
    add(
        "--pod-resources-socket",
        _env("POD_RESOURCES_SOCKET"),
        f"kubelet pod-resources unix socket (default {DEFAULT_SOCKET})",
        default=DEFAULT_SOCKET,
    )
    add(
        "--proc-root",
        _env("PROC_ROOT"),
        "the host's /proc, to read GPU processes' cgroups: /proc with hostPID, else where the host's is mounted "
        "(default /proc)",
        default="/proc",
    )
    add("--node-name", "NODE_NAME", "this node's name (default: $NODE_NAME, then the hostname)")
    add("--kubeconfig", _env("KUBECONFIG"), "kubeconfig for the pod watch (default: in-cluster config)")
    parser.add_argument(
        "--no-kubernetes",
        action="store_true",
        default=environ.get(_env("NO_KUBERNETES"), "").lower() in ("1", "true", "yes"),
        help="do not watch pods through the Kubernetes API; name pods from pod-resources only "
        f"[env {_env('NO_KUBERNETES')}=true]",
    )
    add("--log-level", _env("LOG_LEVEL"), "debug, info, warning or error (default info)", default="info")
    add(
        "--metrics",
        _env("METRICS"),
        f"comma-separated metric groups to export, of {', '.join(GROUPS)}; seed is always on; all is every "
        f"group but {DCGM} (dcgm-exporter's series, which enables {', '.join(DCGM_MIRRORS)} for their reads); "
        "cost turns power on (it divides the energy power reads) (default: all)",
        default="all",
    )
    add(
        "--web-config",
        _env("WEB_CONFIG"),
        "Prometheus exporter-toolkit web config file enabling TLS and/or basic auth on /metrics (default: none)",
    )
    add(
        "--max-connections-per-client",
        _env("MAX_CONNECTIONS_PER_CLIENT"),
        f"connections one client (an IPv4 address or an IPv6 /64) may hold open, of the {MAX_CONNECTIONS} served; "
        f"beyond it that client's least useful one is closed (default {DEFAULT_MAX_CONNECTIONS_PER_CLIENT})",
        default=str(DEFAULT_MAX_CONNECTIONS_PER_CLIENT),
    )
    add(
        "--health-xid-window",
        _env("HEALTH_XID_WINDOW"),
        "how long an Xid that needs a GPU reset or a node reboot keeps gpu_health_status at 2, from 1m to 7d "
        "(e.g. 90s, 30m, 1h; default 1h)",
        default="1h",
    )
    return parser


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Parses and validates; a bad setting exits with code 2 and one line naming it."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)

    host, sep, port_text = str(args.listen).rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        parser.bad("--listen", f"want host:port with a port from 1 to 65535, got {args.listen!r}")
    interval = _seconds(parser, "--interval", args.interval, *INTERVAL_RANGE_S)
    staleness = (
        _seconds(parser, "--max-staleness", args.max_staleness, interval, STALENESS_MAX_S)
        if args.max_staleness
        else 3 * interval
    )
    if os.path.isdir(args.pod_resources_socket):
        parser.bad("--pod-resources-socket", f"{args.pod_resources_socket!r} is a directory, not a socket")
    if not os.path.isdir(args.proc_root):
        parser.bad("--proc-root", f"{args.proc_root!r} is not a directory")
    if args.kubeconfig:
        try:  # what the pod watch will use, checked now rather than failing later in its thread
            load_credentials(args.kubeconfig)
        except ConfigError as error:
            parser.bad("--kubeconfig", str(error))
    level = str(args.log_level).lower()
    if level not in ("debug", "info", "warning", "error"):
        parser.bad("--log-level", f"want debug, info, warning or error, got {args.log_level!r}")
    try:
        metric_groups = parse_groups(str(args.metrics))
    except ValueError as error:
        parser.bad("--metrics", str(error))
    web = None
    if args.web_config:
        try:
            web = load_web_config(args.web_config)
        except WebConfigError as error:
            parser.bad("--web-config", str(error))
    per_client = str(args.max_connections_per_client)
    if not (per_client.isascii() and per_client.isdigit() and 1 <= int(per_client) <= MAX_CONNECTIONS):
        parser.bad("--max-connections-per-client", f"want 1 to {MAX_CONNECTIONS}, got {per_client!r}")
    return Config(
        listen_host=host.strip("[]"),
        listen_port=int(port_text),
        interval_s=interval,
        max_staleness_s=staleness,
        pod_resources_socket=args.pod_resources_socket,
        proc_root=args.proc_root,
        node_name=args.node_name or socket.gethostname(),
        kubeconfig=args.kubeconfig,
        kubernetes=not args.no_kubernetes,
        log_level=level,
        web=web,
        metric_groups=metric_groups,
        max_connections_per_client=int(per_client),
        health_xid_window_s=_duration(parser, "--health-xid-window", args.health_xid_window, *XID_WINDOW_RANGE_S),
    )


def _seconds(parser: _Parser, flag: str, text: object, low: float, high: float) -> float:
    try:
        value = float(str(text))
    except ValueError:
        parser.bad(flag, f"want a number of seconds, got {text!r}")
    if not low <= value <= high:  # NaN fails both
        parser.bad(flag, f"want {low:g} to {high:g} seconds, got {text!r}")
    return value


def _duration(parser: _Parser, flag: str, text: object, low: float, high: float) -> float:
    """Seconds, or a number with a unit s, m, h or d."""
    raw = str(text).strip()
    scale = _DURATION_UNITS.get(raw[-1:])
    try:
        value = float(raw[:-1] if scale else raw) * (scale or 1.0)
    except ValueError:
        parser.bad(flag, f"want a duration such as 90s, 30m, 1h or 7d, got {text!r}")
    if not low <= value <= high:  # NaN fails both
        parser.bad(flag, f"want 1m to 7d, got {text!r}")
    return value


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
