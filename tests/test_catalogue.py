"""The metric catalogue: sound by Prometheus' naming conventions, and the README's metric table
says what it declares (name, labels, group, type, unit, devices). ``python -m tests.test_catalogue``
prints the table as the catalogue would write it."""

from __future__ import annotations

import re
from pathlib import Path

from exporter.catalogue import DEVICE_LABELS, FAMILIES, GROUPS, SOURCES, Family

README = Path(__file__).resolve().parent.parent / "README.md"
HEADER = "| name | group | type | unit | devices | NVML source |"

Row = tuple[tuple[str, ...], str, str, str, str]  # extra labels, group, type, unit, devices


def extra_labels(family: Family) -> tuple[str, ...]:
    """The labels beyond node, gpu, uuid and model."""
    return tuple(label for label in family.labels if label not in DEVICE_LABELS)


def markdown_table() -> str:
    lines = [HEADER, "| --- | --- | --- | --- | --- | --- |"]
    for f in FAMILIES:
        labels = "{" + ",".join(extra_labels(f)) + "}" if extra_labels(f) else ""
        lines.append(f"| `{f.name}{labels}` | {f.group} | {f.type} | {f.unit} | {f.devices} | {f.nvml} |")
    return "\n".join(lines) + "\n"


def readme_rows() -> dict[str, Row]:
    lines = README.read_text().splitlines()
    assert HEADER in lines, f"README.md has no metric table starting {HEADER!r}"
    rows: dict[str, Row] = {}
    for line in lines[lines.index(HEADER) + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        match = re.fullmatch(r"`(\w+)(?:\{([\w,]*)\})?`", cells[0])
        assert match, f"README metric table: cannot read the name in {line!r}"
        labels = tuple(match.group(2).split(",")) if match.group(2) else ()
        assert match.group(1) not in rows, f"README lists {match.group(1)} twice"
        rows[match.group(1)] = (labels, *cells[1:5])  # type: ignore[assignment]
    return rows


def test_the_readme_metric_table_matches_the_catalogue() -> None:
    declared = {f.name: (extra_labels(f), f.group, f.type, f.unit, f.devices) for f in FAMILIES}
    documented = readme_rows()
    assert sorted(documented) == sorted(declared), "README and catalogue list different families"
    for name, row in declared.items():
        assert documented[name] == row, f"README says {documented[name]} for {name}, the catalogue {row}"


def test_names_follow_prometheus_conventions() -> None:
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names))
    for family in FAMILIES:
        assert (family.type == "counter") == family.name.endswith("_total"), family.name
        if family.unit == "ratio":
            assert family.name.endswith("_ratio"), family.name
        if family.group != "seed":  # the seed's *_current names predate the catalogue
            assert family.name.startswith("gpu_"), family.name
        assert family.help and family.nvml, family.name


def test_every_group_has_families_and_every_read_is_declared() -> None:
    assert {f.group for f in FAMILIES} == set(GROUPS)
    for family in FAMILIES:
        assert (family.samples is None) != (family.pod_value is None), family.name
        assert set(family.reads) <= set(SOURCES), family.name


if __name__ == "__main__":
    print(markdown_table(), end="")
