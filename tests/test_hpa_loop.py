"""The whole GPU HPA loop (sim/hpademo.py): real agent, Prometheus, adapter and hey around
simulated GPUs and cluster; the HPA reads the metric only through the adapter's API over TLS."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.hpademo import MIN_REPLICAS, TARGET, TOLERANCE, run
from sim.prometheus import installed

FACTOR = 0.1  # HPA times x 0.1: a 1.5 s sync, a 30 s scale-down window


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_load_scales_out_and_the_quiet_scales_back_in(tmp_path: Path) -> None:
    installed("hey")
    result = run(load_s=40, cooldown_s=45, factor=FACTOR, out=tmp_path / "timeline.png", quiet=True)
    syncs = result["syncs"]
    # Under load the replica count rises above 1 within a bounded number of syncs.
    assert result["first_scale_out_after_load_s"] is not None, syncs
    assert result["first_scale_out_after_load_s"] <= 8 * 15 * FACTOR
    assert result["peak_replicas"] > 1
    # No scale-up while the HPA's average is within tolerance of the target.
    for sync in syncs:
        if sync["replicas_after"] > sync["replicas_before"]:
            assert sync["average"] > TARGET * (1 + TOLERANCE), sync
    # After the load stops, back to minReplicas, but only once the scale-down window has passed.
    assert syncs[-1]["replicas_after"] == MIN_REPLICAS
    assert result["scale_in_to_min_after_load_stop_s"] >= 300 * FACTOR * 0.9
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
