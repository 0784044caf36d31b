"""How the agent's cost grows: from one GPU to eight GPUs split into 56 MIG devices, from no GPU
process to 512 (many per device, MPS-style), from 8 pods on the node to 250, each point side by
side with nvitop-exporter on the same fake NVML scenario, the pod watch on as deployed.

At each point: polling CPU (s/min over a 60 s window without scrapes), RSS after warm-up, scrape
p99 at 10 concurrent scrapers, bytes per scrape (plain and gzip) and series per scrape, for our
agent with every metric group, with the seed families only, and for the peer where it runs (it has
no MIG or pod attribution: a point it cannot serve is left blank). Then the growth along each
dimension, and the issue's goals. Writes curve.json, curve.md and scaling.png.

    python -m bench.curve [--window 60] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.compare import EXPORTERS, SimulatedNode
from bench.measure import rss_bytes, run_hey


@dataclass(frozen=True)
class Point:
    gpus: int
    migs_per_gpu: int
    processes: int
    pods: int

    @property
    def devices(self) -> int:
        return self.gpus * (self.migs_per_gpu or 1)

    @property
    def label(self) -> str:
        devices = f"{self.gpus}x{self.migs_per_gpu} MIG" if self.migs_per_gpu else f"{self.gpus} GPU"
        return f"{devices} / {self.processes} procs / {self.pods} pods"


# One dimension at a time from the idle node, then the full MIG node: devices (1, 8, 56) idle as
# deployed; processes (0, 64, 512) with pods (8, 110, 250); the same on MIG.
POINTS = (
    Point(1, 0, 0, 8),
    Point(8, 0, 0, 8),
    Point(8, 7, 0, 8),
    Point(8, 0, 0, 250),
    Point(8, 0, 64, 110),
    Point(8, 0, 512, 250),
    Point(8, 7, 64, 110),
    Point(8, 7, 512, 250),
)
CONFIGS = (("gpu-pod-exporter", ()), ("gpu-pod-exporter seed", ("--metrics", "seed")), ("nvitop-exporter", ()))


def scrape_size(url: str, encoding: str) -> tuple[int, int]:
    """Bytes on the wire for one scrape with ``encoding`` accepted, and series (plain only)."""
    response = requests.get(url, headers={"Accept-Encoding": encoding}, stream=True, timeout=30)
    body = response.raw.read()
    series = 0
    if encoding == "identity":
        series = sum(1 for line in body.decode(errors="replace").splitlines() if line and not line.startswith("#"))
    return len(body), series


def measure(config: str, extra: tuple[str, ...], point: Point, window_s: float) -> dict[str, object]:
    exporter = config.split()[0]
    row: dict[str, object] = {"config": config, **point.__dict__, "devices": point.devices}
    try:
        with SimulatedNode(exporter, point.gpus, point.processes, point.pods, extra, point.migs_per_gpu) as node:
            row["rss_mb"] = rss_bytes(node.process.pid) / 1e6
            row["cpu_s_per_min"] = node.cpu_per_minute(window_s)
            row["bytes_plain"], row["series"] = scrape_size(node.url, "identity")
            row["bytes_gzip"], _ = scrape_size(node.url, "gzip")
            latency = run_hey(node.url, concurrency=10, duration_s=5)
            row["p99_ms"], row["errors"] = latency["p99_ms"], latency["errors"]
    except (RuntimeError, requests.RequestException, OSError) as error:  # the peer may not serve a point
        row["failed"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return row


def _value(rows: list[dict[str, object]], config: str, point: Point, key: str) -> float | None:
    for row in rows:
        if row["config"] == config and Point(row["gpus"], row["migs_per_gpu"], row["processes"], row["pods"]) == point:  # type: ignore[arg-type]
            value = row.get(key)
            return float(value) if isinstance(value, int | float) else None
    return None


def table(rows: list[dict[str, object]]) -> str:
    def num(value: float | None, digits: int = 2) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        "| devices / processes / pods | CPU s/min: all, seed, peer (all ÷ peer) | RSS MB: all, seed, peer "
        "| p99 ms: all, seed, peer (peer ÷ all) | bytes/scrape plain, gzip (all) | series (all, seed, peer) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ours, seed, peer = (c for c, _ in CONFIGS)
    for point in POINTS:
        cpu = [_value(rows, c, point, "cpu_s_per_min") for c in (ours, seed, peer)]
        rss = [_value(rows, c, point, "rss_mb") for c in (ours, seed, peer)]
        p99 = [_value(rows, c, point, "p99_ms") for c in (ours, seed, peer)]
        series = [_value(rows, c, point, "series") for c in (ours, seed, peer)]
        cpu_ratio = f" ({cpu[0] / cpu[2]:.2f}x)" if cpu[0] and cpu[2] else ""
        p99_ratio = f" ({p99[2] / p99[0]:.0f}x)" if p99[0] and p99[2] else ""
        lines.append(
            f"| {point.label} | {', '.join(num(c) for c in cpu)}{cpu_ratio} | {', '.join(num(r, 0) for r in rss)} "
            f"| {', '.join(num(p, 1) for p in p99)}{p99_ratio} "
            f"| {num(_value(rows, ours, point, 'bytes_plain'), 0)}, {num(_value(rows, ours, point, 'bytes_gzip'), 0)} "
            f"| {', '.join(num(s, 0) for s in series)} |"
        )
    return "\n".join(lines)


# Each step of the curve: (from, to, what grew, by how much).
STEPS = (
    (POINTS[0], POINTS[1], "GPUs", 8.0),
    (POINTS[1], POINTS[2], "devices (MIG)", 7.0),
    (POINTS[1], POINTS[3], "pods", 250 / 8),
    (POINTS[4], POINTS[5], "processes", 8.0),
    (POINTS[6], POINTS[7], "processes on MIG", 8.0),
)


def growth(rows: list[dict[str, object]]) -> str:
    """How each cost grew along each step, against the growth of what grew: the poll's CPU is worse
    than linear when it grew by more than the factor."""
    ours = CONFIGS[0][0]
    lines = [
        "| step | grew by | CPU | RSS | p99 | bytes | no worse than linear |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for before, after, what, factor in STEPS:
        ratios = {}
        for key in ("cpu_s_per_min", "rss_mb", "p99_ms", "bytes_plain"):
            a, b = _value(rows, ours, before, key), _value(rows, ours, after, key)
            ratios[key] = b / a if a and b else None
        cpu = ratios["cpu_s_per_min"]
        linear = "yes" if cpu is not None and cpu <= factor else "no"
        cells = " | ".join("–" if r is None else f"{r:.2f}x" for r in ratios.values())
        lines.append(f"| {before.label} → {after.label} | {what} ×{factor:.1f} | {cells} | {linear} |")
    return "\n".join(lines)


def goals(rows: list[dict[str, object]]) -> str:
    ours, _, peer = (c for c, _ in CONFIGS)
    lines = []
    cpu_ok = p99_ok = True
    for point in POINTS:
        mine, theirs = _value(rows, ours, point, "cpu_s_per_min"), _value(rows, peer, point, "cpu_s_per_min")
        if mine is not None and theirs:
            cpu_ok &= mine <= 0.8 * theirs
        p99, p99_peer = _value(rows, ours, point, "p99_ms"), _value(rows, peer, point, "p99_ms")
        bound = 5.0 if point.devices <= 8 and point.processes <= 64 else 10.0
        p99_ok &= p99 is not None and p99 <= bound and (p99_peer is None or p99_peer / p99 >= 100)
    rss = [_value(rows, ours, p, "rss_mb") for p in POINTS]
    rss_ok = all(r is not None and r <= 60 for r in rss)

    def met(ok: bool) -> str:
        return "met" if ok else "missed"

    lines.append(f"- polling CPU ≤ 0.8× the peer's wherever both run: {met(cpu_ok)}")
    lines.append(f"- scrape p99 ≤ 5 ms (≤ 10 ms past 8 devices / 64 processes), ≥ 100× the peer: {met(p99_ok)}")
    lines.append(f"- RSS ≤ 60 MB at every point, pod watch on: {met(rss_ok)}")
    return "\n".join(lines)


def chart(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    labels = [p.label.replace(" / ", "\n") for p in POINTS]
    for config, _ in CONFIGS:
        for axis, key in zip(axes, ("cpu_s_per_min", "rss_mb", "p99_ms"), strict=True):
            values = [_value(rows, config, p, key) for p in POINTS]
            axis.plot(range(len(POINTS)), [float("nan") if v is None else v for v in values], marker="o", label=config)
    titles = ("Polling CPU (s/min, 1 s interval)", "RSS after warm-up (MB)", "Scrape p99, 10 scrapers (ms)")
    for axis, title in zip(axes, titles, strict=True):
        axis.set_xticks(range(len(POINTS)), labels, fontsize=7)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_yscale("log")  # the peer's CPU grows 100x along the curve; ours stays near the bottom
    axes[2].set_yscale("log")
    figure.suptitle(f"How the cost grows: gpu-pod-exporter vs nvitop-exporter, fake NVML, {os.cpu_count()} cores")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--window", type=float, default=60.0, help="seconds of polling per CPU reading")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    assert EXPORTERS[1] == CONFIGS[2][0]
    rows = []
    for point in POINTS:
        for config, extra in CONFIGS:
            rows.append(measure(config, extra, point, args.window))
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "curve.json").write_text(json.dumps(rows, indent=2) + "\n")
    chart(rows, args.out / "scaling.png")
    summary = (
        f"{table(rows)}\n\nGrowth of our agent's cost (every group):\n\n{growth(rows)}\n\nGoals:\n\n{goals(rows)}\n"
    )
    (args.out / "curve.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
