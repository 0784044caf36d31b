"""The operator documents (README.md, CHANGELOG.md, docs/*.md): every relative link reaches a file and,
where it names one, a heading that exists; every PromQL block parses and names only series the agent
or kube-state-metrics export."""

from __future__ import annotations

import re
from pathlib import Path

import promql_parser
import pytest

from exporter.catalogue import EXPOSED
from tests.test_alerts import github_anchor
from tests.test_dashboards import metric_names

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# kube-state-metrics' series (a named external exporter) the verification queries read.
KUBE_STATE_METRICS = {"kube_pod_container_resource_requests", "kube_pod_status_phase"}
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(document: Path) -> set[str]:
    fenced = False
    found = set()
    for line in document.read_text().splitlines():
        fenced ^= line.startswith("```")
        if not fenced and line.startswith("#"):
            found.add(github_anchor(line.lstrip("#")))
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(document: Path) -> None:
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        assert linked.exists(), (document.name, target)
        if anchor:
            assert anchor in anchors(linked), (document.name, target)


def test_every_promql_block_names_only_exported_series() -> None:
    exported = {metric.name for metric in EXPOSED} | KUBE_STATE_METRICS
    queries = [
        line.split("  #")[0].strip()
        for document in DOCUMENTS
        for block in re.findall(r"```promql\n(.*?)```", document.read_text(), re.S)
        for line in block.splitlines()
        if line.strip()
    ]
    assert queries
    for query in queries:
        read = metric_names(promql_parser.parse(query))
        assert read and read <= exported, (query, read - exported)
