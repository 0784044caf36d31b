"""The dcgm-exporter compatibility rules (daemonset/prometheus/dcgm-compat-rules.yaml): promtool
checks them and runs their unit tests (tests/recording/dcgm-compat.test.yaml: names, units and labels
as dcgm-exporter's consumers query them); they record only dcgm-exporter's names and read only series
the agent exports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import promql_parser
import yaml

from exporter.catalogue import FAMILIES
from tests.test_alerts import promtool
from tests.test_dashboards import metric_names

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "daemonset" / "prometheus" / "dcgm-compat-rules.yaml"
UNIT_TESTS = ROOT / "tests" / "recording" / "dcgm-compat.test.yaml"
# dcgm-exporter's default counters (etc/default-counters.csv) that consumers query by name.
DCGM_NAMES = {
    "DCGM_FI_DEV_SM_CLOCK",
    "DCGM_FI_DEV_MEM_CLOCK",
    "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_MEM_COPY_UTIL",
    "DCGM_FI_DEV_ENC_UTIL",
    "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    "DCGM_FI_PROF_DRAM_ACTIVE",
    "DCGM_FI_PROF_PCIE_TX_BYTES",
    "DCGM_FI_PROF_PCIE_RX_BYTES",
}


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    checked = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool(), "test", "rules", UNIT_TESTS.name], cwd=UNIT_TESTS.parent, capture_output=True, text=True
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_they_record_dcgm_exporters_names_from_the_agents_series() -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules}
    helpers = {name for name in recorded if name.startswith("gpu:")}  # the label-carrying info series
    assert recorded - helpers <= DCGM_NAMES
    exported = {family.name for family in FAMILIES}
    for rule in rules:
        read = metric_names(promql_parser.parse(rule["expr"])) - helpers
        assert read and read <= exported, (rule["record"], read - exported)
