"""Whether each metrics APIService points at this adapter's Service, read through the kubernetes
client from sim/apiserver.py (the APIServices' real JSON): each change of state is logged once,
an optional APIService nobody registered is no trouble, and an unreadable list is unknown (the
gauge's series go), never "not ours"."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from exporter.adapter.kubeapi import api_client, read_api_services
from exporter.adapter.ownership import ApiServiceOwnership
from exporter.backoff import Backoff
from exporter.sources.kubeclient import load_credentials
from sim.apiserver import FakeApiServer, api_service_json

OURS = ("gpu-monitoring", "gpu-metrics-adapter")
CUSTOM = ("v1beta2.custom.metrics.k8s.io", "v1beta1.custom.metrics.k8s.io")
EXTERNAL = "v1beta1.external.metrics.k8s.io"


def test_each_change_of_owner_is_logged_once_and_an_unreadable_list_is_unknown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="exporter.adapter.ownership")
    api = FakeApiServer().start()
    client = api_client(load_credentials(str(api.write_kubeconfig(tmp_path / "kubeconfig"))))
    ownership = ApiServiceOwnership(
        lambda: read_api_services(client), OURS, CUSTOM, (EXTERNAL,), backoff=Backoff(initial_s=1, cap_s=1, jitter=0)
    )
    api.api_services = {
        CUSTOM[0]: api_service_json("custom.metrics.k8s.io", "v1beta2", OURS),
        EXTERNAL: api_service_json("external.metrics.k8s.io", "v1beta1", ("keda", "keda-operator-metrics-apiserver")),
    }
    try:
        for _ in range(3):  # the same states, read again and again: logged once
            ownership.loop.run_once()
        assert ownership.owned == {CUSTOM[0]: True, CUSTOM[1]: False, EXTERNAL: False}
        assert ownership.troubles[CUSTOM[1]] == "not registered"
        assert ownership.troubles[EXTERNAL] == "points at the Service keda/keda-operator-metrics-apiserver"
        assert sum("pointing at this adapter" in r.getMessage() for r in caplog.records) == 2
        # Our v1beta1 is applied; KEDA is uninstalled (the external API is opt-in: no trouble).
        api.api_services[CUSTOM[1]] = api_service_json("custom.metrics.k8s.io", "v1beta1", OURS)
        del api.api_services[EXTERNAL]
        ownership.loop.run_once()
        assert ownership.owned == {CUSTOM[0]: True, CUSTOM[1]: True}
        assert ownership.conditions() == [(f"apiservice {CUSTOM[1]}", ""), (f"apiservice {CUSTOM[0]}", "")]
        assert sum("recovered" in r.getMessage() for r in caplog.records) == 2
        # Served by kube-apiserver itself (no Service), as a cluster without any adapter would not be.
        api.api_services[CUSTOM[0]] = api_service_json("custom.metrics.k8s.io", "v1beta2", None)
        ownership.loop.run_once()
        assert ownership.troubles[CUSTOM[0]] == "served by kube-apiserver itself"
    finally:
        api.stop()
    ownership.loop.run_once()  # the API is gone: whether they point here is unknown
    assert ownership.owned == {} and ownership.conditions() == []
    assert sum("reading the APIServices failing" in r.getMessage() for r in caplog.records) == 1
