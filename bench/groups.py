"""What each --metrics variant costs the agent at 8 GPUs and 64 GPU processes on the simulated node
(fake NVML, kubelet, /proc and pod watch, as bench.compare runs it): polling CPU per poll (over a
window without scrapes), scrape p99 at 10 concurrent scrapers, and bytes and series per scrape. The
variants are the command's arguments, each a --metrics value; the first is the baseline the others
are compared with. Writes groups.json and groups.md.

    python -m bench.groups [VARIANT ...] [--rounds N] [--quick] [--out bench/results]

Every variant's agent runs at once, each on a simulated node of its own, and their polling CPU is
read over the same windows: a virtual machine's drift (±10 % between minutes here) then touches
all of them alike instead of whichever ran in a slow minute. Scrape loads go to one agent at a
time, in turn, each round. The table gives each variant's median over the rounds.

The default variants: seed, seed,dcgm, seed,power and seed,power,cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from bench.compare import EXPORTERS, SimulatedNode
from bench.curve import scrape_size
from bench.measure import cpu_seconds, run_hey

GPUS, PROCESSES, PODS = 8, 64, 32
DEFAULT_VARIANTS = ("seed", "seed,dcgm", "seed,power", "seed,power,cost")
POLLS_PER_SECOND = 1  # SimulatedNode's agent polls every second


def measure(variants: list[str], rounds: int, window_s: float, load_s: int) -> dict[str, list[dict[str, object]]]:
    """Each variant's figures, one dict per round."""
    runs: dict[str, list[dict[str, object]]] = {variant: [] for variant in variants}
    with ExitStack() as stack:
        nodes = {
            variant: stack.enter_context(SimulatedNode(EXPORTERS[0], GPUS, PROCESSES, PODS, ("--metrics", variant)))
            for variant in variants
        }
        sizes: dict[str, tuple[int, int, int]] = {}
        for _ in range(rounds):
            before = {variant: cpu_seconds(node.process.pid) for variant, node in nodes.items()}
            time.sleep(window_s)
            cpu_s = {variant: cpu_seconds(node.process.pid) - before[variant] for variant, node in nodes.items()}
            if not sizes:  # after a window: the cost series appear once the energy counters first move
                sizes = {
                    variant: (*scrape_size(node.url, "identity"), scrape_size(node.url, "gzip")[0])
                    for variant, node in nodes.items()
                }
            for variant, node in nodes.items():
                latency = run_hey(node.url, concurrency=10, duration_s=load_s)
                bytes_plain, series, bytes_gzip = sizes[variant]
                runs[variant].append(
                    {
                        "metrics": variant,
                        "gpus": GPUS,
                        "processes": PROCESSES,
                        "pods": PODS,
                        "cpu_ms_per_poll": cpu_s[variant] * 1000 / (window_s * POLLS_PER_SECOND),
                        "p99_ms": latency["p99_ms"],
                        "errors": latency["errors"],
                        "bytes_plain": bytes_plain,
                        "bytes_gzip": bytes_gzip,
                        "series": series,
                    }
                )
                print(json.dumps(runs[variant][-1]), flush=True)
    return runs


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
        f"windows (all variants at once) and {load_s} s scrape loads; ratios against `--metrics {rows[0]['metrics']}`.",
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
    parser.add_argument("--rounds", type=int, default=5, help="windows and loads per variant (median reported)")
    parser.add_argument("--quick", action="store_true", help="short windows: checks the benchmark runs, not a result")
    args = parser.parse_args()
    # CPU comes from per-thread schedstat (ns), so a 60 s window resolves per-poll CPU well below 0.1 ms.
    window_s, load_s = (5.0, 2) if args.quick else (60.0, 8)
    runs = measure(args.variants, args.rounds, window_s, load_s)
    rows = [median_row(variant_runs) for variant_runs in runs.values()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "groups.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "groups.md").write_text(table(rows, args.rounds, window_s, load_s))
    print(table(rows, args.rounds, window_s, load_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
