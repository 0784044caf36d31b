"""The metric catalogue: sound by Prometheus' naming conventions, the README's metric tables say
what it declares (name, labels, group, type, unit, devices; the self-metrics' type, unit and help),
and the agent exposes nothing it does not declare. ``python -m tests.test_catalogue`` prints the
tables as the catalogue would write them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from exporter.catalogue import (
    DCGM,
    DCGM_FAMILIES,
    DCGM_MIRRORS,
    DEVICE_LABELS,
    EXPOSED,
    FAMILIES,
    GROUPS,
    SELF_METRICS,
    SOURCES,
    Family,
    parse_groups,
    reads_for,
)
from tests.conftest import Node, find

README = Path(__file__).resolve().parent.parent / "README.md"
HEADER = "| name | group | type | unit | devices | NVML source |"
SELF_HEADER = "| name | type | unit | meaning |"
DCGM_HEADER = "| DCGM field | type | unit | devices | NVML source |"
# Our own families; dcgm-exporter's (the dcgm group) have a table of their own.
OWN_FAMILIES = tuple(f for f in FAMILIES if f.group != DCGM)

Row = tuple[tuple[str, ...], tuple[str, ...]]  # labels (beyond the device's), the table's other cells


def extra_labels(family: Family) -> tuple[str, ...]:
    """The labels beyond node, gpu, uuid and model."""
    return tuple(label for label in family.labels if label not in DEVICE_LABELS)


def named(name: str, labels: tuple[str, ...]) -> str:
    return f"`{name}{{{','.join(labels)}}}`" if labels else f"`{name}`"


def markdown_tables() -> str:
    lines = [HEADER, "| --- | --- | --- | --- | --- | --- |"]
    for f in OWN_FAMILIES:
        lines.append(f"| {named(f.name, extra_labels(f))} | {f.group} | {f.type} | {f.unit} | {f.devices} | {f.nvml} |")
    lines += ["", DCGM_HEADER, "| --- | --- | --- | --- | --- |"]
    lines += [f"| `{f.name}` | {f.type} | {f.unit} | {f.devices} | {f.nvml} |" for f in DCGM_FAMILIES]
    lines += ["", SELF_HEADER, "| --- | --- | --- | --- |"]
    lines += [f"| {named(m.name, m.labels)} | {m.type} | {m.unit} | {m.help} |" for m in SELF_METRICS]
    return "\n".join(lines) + "\n"


def readme_rows(header: str, cells_read: int) -> dict[str, Row]:
    """The README table starting ``header``: name -> (labels, the next ``cells_read`` cells)."""
    lines = README.read_text().splitlines()
    assert header in lines, f"README.md has no metric table starting {header!r}"
    rows: dict[str, Row] = {}
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        match = re.fullmatch(r"`(\w+)(?:\{([\w,]*)\})?`", cells[0])
        assert match, f"README metric table: cannot read the name in {line!r}"
        labels = tuple(match.group(2).split(",")) if match.group(2) else ()
        assert match.group(1) not in rows, f"README lists {match.group(1)} twice"
        rows[match.group(1)] = (labels, tuple(cells[1 : 1 + cells_read]))
    return rows


def assert_documented(declared: Mapping[str, Row], documented: Mapping[str, Row]) -> None:
    assert sorted(documented) == sorted(declared), "README and catalogue list different families"
    for name, row in declared.items():
        assert documented[name] == row, f"README says {documented[name]} for {name}, the catalogue {row}"


def test_the_readme_metric_table_matches_the_catalogue() -> None:
    declared = {f.name: (extra_labels(f), (f.group, f.type, f.unit, f.devices, f.nvml)) for f in OWN_FAMILIES}
    assert_documented(declared, readme_rows(HEADER, 5))


def test_the_readme_dcgm_table_matches_the_catalogue() -> None:
    declared: dict[str, Row] = {f.name: ((), (f.type, f.unit, f.devices, f.nvml)) for f in DCGM_FAMILIES}
    assert_documented(declared, readme_rows(DCGM_HEADER, 4))


def test_the_readme_self_metrics_table_matches_the_catalogue() -> None:
    declared = {m.name: (m.labels, (m.type, m.unit, m.help)) for m in SELF_METRICS}
    assert_documented(declared, readme_rows(SELF_HEADER, 3))


def test_every_exposed_name_is_in_the_readme_as_prometheus_shows_it() -> None:
    text = README.read_text()
    for declared in EXPOSED:
        assert re.search(rf"`{declared.name}[{{`]", text), declared.name


def test_names_follow_prometheus_conventions() -> None:
    names = [f.name for f in EXPOSED]
    assert len(names) == len(set(names))
    for self_metric in SELF_METRICS:
        assert self_metric.name.startswith("gpu_exporter_"), self_metric.name
        assert (self_metric.type == "counter") == self_metric.name.endswith("_total"), self_metric.name
    for family in DCGM_FAMILIES:  # dcgm-exporter's names, which its consumers query
        assert family.name.startswith("DCGM_FI_"), family.name
    for family in OWN_FAMILIES:
        assert (family.type == "counter") == family.name.endswith("_total"), family.name
        if family.unit == "ratio":
            assert family.name.endswith("_ratio"), family.name
        if family.group != "seed":  # the seed's *_current names predate the catalogue
            assert family.name.startswith("gpu_"), family.name
        assert family.help and family.nvml, family.name


def test_every_group_has_families_and_every_read_is_declared() -> None:
    assert {f.group for f in FAMILIES} == set(GROUPS)
    for family in FAMILIES:
        assert family.samples is None or family.pod_value is None, family.name  # neither: the collector's own
        assert set(family.reads) <= set(SOURCES), family.name


def test_the_dcgm_group_enables_the_groups_it_mirrors_and_reads_nothing_more() -> None:
    groups = parse_groups("seed,dcgm")
    assert groups == {"seed", DCGM, *DCGM_MIRRORS}
    with_dcgm = [f for f in FAMILIES if f.group in groups]
    mirrored = [f for f in with_dcgm if f.group != DCGM]
    for mig in (False, True):
        assert reads_for(with_dcgm, mig) == reads_for(mirrored, mig)
    assert DCGM not in parse_groups("all")  # asked for by name only


def exposed_names(url: str) -> set[str]:
    """Every sample name on the agent's /metrics, and every family name (a family may have no sample)."""
    text = requests.get(url + "/metrics", timeout=5).text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
        names.update(sample.name for sample in family.samples)
    return names


def test_the_agent_exposes_only_declared_families(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent(node.args(), node.scenario_path)
    agent.wait_for(lambda s: bool(find(s, "gpu_sm_active_ratio")), what="every group read")
    declared = {f.name for f in EXPOSED}
    exposed = {name for name in exposed_names(agent.url) if not name.startswith(("process_", "python_"))}
    assert exposed - declared == set(), "exposed but not declared in exporter/catalogue.py"
    assert len(exposed & {m.name for m in SELF_METRICS}) >= 10, exposed  # the self-metrics are there


if __name__ == "__main__":
    print(markdown_tables(), end="")
