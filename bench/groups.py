"""What each --metrics variant costs the agent at 8 GPUs and 64 GPU processes on the simulated node
(fake NVML, kubelet, /proc and pod watch, as bench.compare runs it): polling CPU per poll (over a
window without scrapes), scrape p99 at 10 concurrent scrapers, and bytes and series per scrape. The
variants are the command's arguments, each a --metrics value; the first is the baseline the others
are compared with. Writes groups.json and groups.md.

    python -m bench.groups [VARIANT ...] [--rounds N] [--quick] [--out bench/results]

Each round measures every variant once, in turn, so drift on a shared machine touches them all
alike; the table gives each variant's median over the rounds.

The default variants: seed, seed,dcgm, seed,power and seed,power,cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench.compare import EXPORTERS, SimulatedNode
from bench.curve import scrape_size
from bench.measure import run_hey

GPUS, PROCESSES, PODS = 8, 64, 32
DEFAULT_VARIANTS = ("seed", "seed,dcgm", "seed,power", "seed,power,cost")
POLLS_PER_MINUTE = 60  # SimulatedNode polls every second


def measure(metrics: str, window_s: float, load_s: int) -> dict[str, object]:
    with SimulatedNode(EXPORTERS[0], GPUS, PROCESSES, PODS, ("--metrics", metrics)) as node:
        cpu_s_per_min = node.cpu_per_minute(window_s)
        bytes_plain, series = scrape_size(node.url, "identity")
        bytes_gzip, _ = scrape_size(node.url, "gzip")
        latency = run_hey(node.url, concurrency=10, duration_s=load_s)
    return {
        "metrics": metrics,
        "gpus": GPUS,
        "processes": PROCESSES,
        "pods": PODS,
        "cpu_ms_per_poll": cpu_s_per_min * 1000 / POLLS_PER_MINUTE,
        "p99_ms": latency["p99_ms"],
        "errors": latency["errors"],
        "bytes_plain": bytes_plain,
        "bytes_gzip": bytes_gzip,
        "series": series,
    }


def median_row(runs: list[dict[str, object]]) -> dict[str, object]:
    """One row per variant: the median of each timing over the rounds, the rounds' raw figures beside."""
    row = dict(runs[-1])
    for key in ("cpu_ms_per_poll", "p99_ms"):
        values = [float(value) for run in runs if isinstance(value := run[key], int | float)]
        row[key] = statistics.median(values) if values else None
        row[f"{key}_rounds"] = values
    return row


def table(rows: list[dict[str, object]], rounds: int, window_s: float, load_s: int) -> str:
    def ratio(row: dict[str, object], key: str) -> str:
        base, value = rows[0][key], row[key]
        if isinstance(base, int | float) and isinstance(value, int | float) and base:
            return f" ({value / base:.2f}x)"
        return ""

    def num(value: object, digits: int) -> str:
        return f"{value:.{digits}f}" if isinstance(value, int | float) else "–"

    lines = [
        f"{GPUS} GPUs, {PROCESSES} processes, {PODS} pods; medians over {rounds} rounds of {window_s:.0f} s polling "
        f"windows and {load_s} s scrape loads; ratios against `--metrics {rows[0]['metrics']}`.",
        "",
        "| --metrics | CPU ms per poll | scrape p99 ms | bytes per scrape (plain) | bytes (gzip) | series |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| `{row['metrics']}` | {num(row['cpu_ms_per_poll'], 2)}{ratio(row, 'cpu_ms_per_poll')} "
            f"| {num(row['p99_ms'], 1)}{ratio(row, 'p99_ms')} | {row['bytes_plain']}{ratio(row, 'bytes_plain')} "
            f"| {row['bytes_gzip']}{ratio(row, 'bytes_gzip')} | {row['series']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=list(DEFAULT_VARIANTS), help="--metrics values to compare")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--rounds", type=int, default=3, help="times each variant is measured (median reported)")
    parser.add_argument("--quick", action="store_true", help="short windows: checks the benchmark runs, not a result")
    args = parser.parse_args()
    # CPU comes from per-thread schedstat (ns), so a 60 s window resolves per-poll CPU well below 0.1 ms.
    window_s, load_s = (5.0, 2) if args.quick else (60.0, 8)
    runs: dict[str, list[dict[str, object]]] = {variant: [] for variant in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            runs[variant].append(measure(variant, window_s, load_s))
            print(json.dumps(runs[variant][-1]), flush=True)
    rows = [median_row(variant_runs) for variant_runs in runs.values()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "groups.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "groups.md").write_text(table(rows, args.rounds, window_s, load_s))
    print(table(rows, args.rounds, window_s, load_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
