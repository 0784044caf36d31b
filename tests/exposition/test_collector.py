"""The snapshot collector: what a scrape shows for a given snapshot."""

from __future__ import annotations

import gzip
import threading
from dataclasses import replace

from prometheus_client import CollectorRegistry

from exporter.catalogue import CURRENT_FAMILIES
from exporter.exposition.collector import AgeCollector, SnapshotCollector
from exporter.exposition.render import Exposition, gzip_stored
from exporter.model import Attribution, DeviceReading, GpuSeries, Health, Snapshot
from tests.conftest import Samples, find, parse_samples

GPU0 = "GPU-00000000-1111-2222-3333-444455556666"
HEALTH = Health(
    nvml_up=True,
    nvml_status="ok",
    pod_resources_up=True,
    kubernetes_up=True,
    poll_duration_seconds=0.01,
    last_success_wall_time=1.7e9,
    device_errors={("0", GPU0, "UNKNOWN"): 3},
    pod_resources_errors_total={},
)
DEVICE = DeviceReading(
    index=0,
    uuid=GPU0,
    model="NVIDIA H100",
    sampled_at=100.0,
    duty_cycle_percent=55.0,
    memory_used_bytes=10,
    memory_total_bytes=80,
    temperature_celsius=60.0,
    power_milliwatts=None,
)


def snapshot(*series: GpuSeries, completed_at: float = 100.0) -> Snapshot:
    return Snapshot(
        node="n1",
        attribution=Attribution(
            series=series, sharing_pods={GPU0: 1}, unknown_device_ids={}, processes_by_owner={"pod": 1}
        ),
        health=HEALTH,
        completed_at=completed_at,
    )


class Clock:
    now = 100.5

    def __call__(self) -> float:
        return self.now


def registry_for(holder: list[Snapshot], clock: Clock, staleness: float = 3.0) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: holder[0], staleness, clock=clock))
    registry.register(AgeCollector(lambda: holder[0], clock=clock))
    return registry


def labels(pod: str = "bert-0") -> dict[str, str]:
    return {
        "node": "n1",
        "gpu": "0",
        "uuid": GPU0,
        "model": "NVIDIA H100",
        "namespace": "default",
        "pod": pod,
        "container": "server",
    }


def test_series_carry_every_label_and_absent_values_stay_absent() -> None:
    series = GpuSeries(
        device=DEVICE,
        namespace="default",
        pod="bert-0",
        container="server",
        duty_cycle_percent=55.0,
        memory_used_bytes=10,
    )
    registry = registry_for([snapshot(series)], Clock())
    assert registry.get_sample_value("duty_cycle_current", labels()) == 55.0
    assert registry.get_sample_value("memory_used_bytes_current", labels()) == 10
    assert registry.get_sample_value("memory_total_bytes_current", labels()) == 80
    assert registry.get_sample_value("temperature_celsius_current", labels()) == 60.0
    assert registry.get_sample_value("power_usage_milliwatts_current", labels()) is None  # not 0
    assert (
        registry.get_sample_value("gpu_exporter_device_errors_total", {"gpu": "0", "uuid": GPU0, "kind": "UNKNOWN"})
        == 3
    )
    assert registry.get_sample_value("gpu_exporter_gpu_sharing_pods", {"uuid": GPU0}) == 1
    assert registry.get_sample_value("gpu_exporter_data_age_seconds") == 0.5


def test_every_family_has_help_text_with_its_unit() -> None:
    registry = registry_for([snapshot()], Clock())
    families = {f.name: f for f in registry.collect()}
    for declared in CURRENT_FAMILIES:
        assert families[declared.name].documentation
    assert "percent" in families["duty_cycle_current"].documentation
    assert "bytes" in families["memory_used_bytes_current"].documentation
    assert "Celsius" in families["temperature_celsius_current"].documentation
    assert "milliwatts" in families["power_usage_milliwatts_current"].documentation


def test_a_pod_gone_from_the_snapshot_is_gone_from_the_scrape() -> None:
    holder = [
        snapshot(
            GpuSeries(device=DEVICE, namespace="default", pod="bert-0", container="server", duty_cycle_percent=55.0)
        )
    ]
    registry = registry_for(holder, Clock())
    assert registry.get_sample_value("duty_cycle_current", labels()) == 55.0
    holder[0] = snapshot(GpuSeries(device=DEVICE, duty_cycle_percent=55.0))
    assert registry.get_sample_value("duty_cycle_current", labels()) is None
    assert registry.get_sample_value("duty_cycle_current", {**labels(""), "namespace": "", "container": ""}) == 55.0


def test_series_older_than_the_staleness_bound_are_dropped() -> None:
    clock = Clock()
    old = replace(DEVICE, sampled_at=90.0)
    holder = [
        snapshot(
            GpuSeries(device=DEVICE, duty_cycle_percent=1.0),
            GpuSeries(device=replace(old, uuid="GPU-old", index=1), duty_cycle_percent=2.0),
        )
    ]
    registry = registry_for(holder, clock, staleness=5.0)
    values = [s.value for f in registry.collect() if f.name == "duty_cycle_current" for s in f.samples]
    assert values == [1.0]
    assert registry.get_sample_value("gpu_exporter_stale_series") == 1
    clock.now = 200.0
    assert [s for f in registry.collect() if f.name == "duty_cycle_current" for s in f.samples] == []


def test_rendering_matches_prometheus_client_byte_for_byte() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.platform_collector import PlatformCollector

    from exporter.exposition.render import render_text

    odd = replace(DEVICE, model='Odd "GPU" \\ with\nnewline', power_milliwatts=1e-7)
    series = GpuSeries(
        device=odd, namespace="default", pod="bert-0", container="a,b", duty_cycle_percent=12.5, memory_used_bytes=2**40
    )
    registry = registry_for([snapshot(series)], Clock())
    PlatformCollector(registry=registry)
    assert render_text(registry) == generate_latest(registry)


def exposition_for(holder: list[Snapshot], clock: Clock, max_age_s: float = 3.0) -> Exposition:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: holder[0], max_age_s, clock=clock))
    return Exposition(
        registry, AgeCollector(lambda: holder[0], clock=clock), max_age_s=max_age_s, render_wait_s=0.2, clock=clock
    )


def scrape(exposition: Exposition, gzipped: bool = False) -> Samples:
    body = exposition.latest(gzipped)
    return parse_samples((gzip.decompress(body) if gzipped else body).decode())


def test_ages_are_measured_at_scrape_time_not_when_rendered() -> None:
    clock = Clock()
    exposition = exposition_for([snapshot(GpuSeries(device=DEVICE, duty_cycle_percent=55.0))], clock)
    exposition.render()
    clock.now = 102.0  # no render since: the renderer may be stuck
    for gzipped in (False, True):
        samples = scrape(exposition, gzipped)
        assert find(samples, "gpu_exporter_data_age_seconds")[0][1] == 2.0
        assert find(samples, "gpu_exporter_device_data_age_seconds", uuid=GPU0)[0][1] == 2.0
        assert find(samples, "duty_cycle_current")[0][1] == 55.0


def test_a_rendering_the_renderer_stopped_renewing_is_not_served() -> None:
    clock = Clock()
    exposition = exposition_for([snapshot(GpuSeries(device=DEVICE, duty_cycle_percent=55.0))], clock)
    exposition.render()
    clock.now = 104.0  # past the bound with no new render: the values would be frozen
    samples = scrape(exposition)
    assert find(samples, "duty_cycle_current") == []
    assert find(samples, "gpu_exporter_data_age_seconds")[0][1] == 4.0


def test_a_label_value_that_is_not_valid_unicode_is_replaced_not_fatal() -> None:
    series = GpuSeries(device=DEVICE, namespace="default", pod="bad-\udc80-name", duty_cycle_percent=55.0)
    exposition = exposition_for([snapshot(series)], Clock())
    exposition.render()
    [(labels_seen, value)] = find(scrape(exposition), "duty_cycle_current")
    assert labels_seen["pod"] == "bad-?-name" and value == 55.0


def test_a_scrape_after_a_poll_gets_a_rendering_of_the_new_data() -> None:
    holder = [snapshot(GpuSeries(device=DEVICE, duty_cycle_percent=55.0))]
    exposition = exposition_for(holder, Clock())
    exposition.render()

    def renderer() -> None:  # the agent's render thread, reduced to one demand
        if exposition.wait_for_demand(5.0):
            exposition.render()

    thread = threading.Thread(target=renderer)
    thread.start()
    holder[0] = snapshot(GpuSeries(device=replace(DEVICE, duty_cycle_percent=77.0), duty_cycle_percent=77.0))
    exposition.invalidate()  # what a poll does
    assert find(scrape(exposition), "duty_cycle_current")[0][1] == 77.0
    thread.join()


def test_with_no_renderer_answering_a_scrape_waits_briefly_and_serves_the_last_rendering() -> None:
    holder = [snapshot(GpuSeries(device=DEVICE, duty_cycle_percent=55.0))]
    exposition = exposition_for(holder, Clock())
    exposition.render()
    holder[0] = snapshot(GpuSeries(device=DEVICE, duty_cycle_percent=77.0))
    exposition.invalidate()
    assert find(scrape(exposition), "duty_cycle_current")[0][1] == 55.0  # within the age bound
    assert exposition.wait_for_demand(0.0)  # the scrape asked for a new rendering


def test_a_scrape_that_must_not_wait_gets_the_last_rendering_and_asks_for_a_new_one() -> None:
    holder = [snapshot(GpuSeries(device=DEVICE, duty_cycle_percent=55.0))]
    exposition = exposition_for(holder, Clock())
    exposition.render()
    assert exposition.current()
    holder[0] = snapshot(GpuSeries(device=DEVICE, duty_cycle_percent=77.0))
    exposition.invalidate()
    assert not exposition.current()
    body = b"".join(exposition.latest_parts(False, wait=False))
    assert find(parse_samples(body.decode()), "duty_cycle_current")[0][1] == 55.0
    assert exposition.wait_for_demand(0.0)  # the render thread is asked for the new data


def test_the_per_scrape_part_is_a_gzip_member_of_any_size() -> None:
    for size in (0, 1, 1000, 0xFFFF, 200_000):  # 200 000: several stored blocks
        data = bytes(i % 251 for i in range(size))
        assert gzip.decompress(gzip_stored(data)) == data
        assert gzip.decompress(gzip.compress(b"rendering", 1) + gzip_stored(data)) == b"rendering" + data


def test_dcgm_series_name_a_mig_devices_gpu_even_when_the_gpus_reading_aged_out() -> None:
    mig = DeviceReading(
        index=0,
        uuid="MIG-00000000-aaaa-bbbb-cccc-ddddeeeeffff",
        model="NVIDIA H100 MIG 1g.10gb",
        sampled_at=100.0,
        parent_uuid=GPU0,
        gpu_instance_id=7,
    )
    holder = [snapshot(GpuSeries(device=replace(DEVICE, sampled_at=90.0)), GpuSeries(mig, memory_used_bytes=2**21))]
    mig_labels = {"gpu": "0", "UUID": GPU0, "device": "nvidia0", "modelName": "NVIDIA H100 MIG 1g.10gb"}
    mig_labels |= {
        "Hostname": "n1",
        "hostname": "n1",
        "DCGM_FI_DRIVER_VERSION": "",
        "GPU_I_PROFILE": "1g.10gb",
        "GPU_I_ID": "7",
    }
    with_dcgm = CollectorRegistry()
    with_dcgm.register(SnapshotCollector(lambda: holder[0], 3.0, clock=Clock(), dcgm=True))
    assert with_dcgm.get_sample_value("DCGM_FI_DEV_FB_USED", mig_labels) == 2.0
    assert registry_for(holder, Clock()).get_sample_value("DCGM_FI_DEV_FB_USED", mig_labels) is None  # off
