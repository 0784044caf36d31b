"""/readyz tells the truth: not ready, with the reason, whenever what /metrics serves is not being
renewed — a poll that does not finish, every device's reading stale, a renderer that hangs, a
rendering that fails — and ready again once the cause goes away."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.registry import Collector

from exporter.agent import Agent
from exporter.config import parse_config
from tests.conftest import Node


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def readyz(url: str) -> tuple[int, str]:
    response = requests.get(url + "/readyz", timeout=5)
    return response.status_code, response.text


def test_a_poll_that_does_not_finish_makes_the_agent_not_ready(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes"], node.scenario_path)
    wait_until(lambda: readyz(agent.url)[0] == 200, 10, "ready")
    node.scenario.count_block_s = 6.0  # the driver wedges in nvmlDeviceGetCount, on the poll's own thread
    node.scenario.write(node.scenario_path)
    # Its devices go stale first (0.6 s), then the poll itself is overdue (2 s): both are 503.
    wait_until(lambda: readyz(agent.url)[0] == 503, 10, "not ready while the poll hangs")
    wait_until(lambda: "no poll finished in the last" in readyz(agent.url)[1], 10, "the hung poll named")
    assert readyz(agent.url)[0] == 503
    node.scenario.count_block_s = 0.0
    node.scenario.write(node.scenario_path)
    wait_until(lambda: readyz(agent.url)[0] == 200, 15, "ready again once the poll finishes")


def test_every_device_stale_makes_the_agent_not_ready(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes", "--max-staleness", "1"], node.scenario_path)
    wait_until(lambda: readyz(agent.url)[0] == 200, 10, "ready")
    for gpu in node.scenario.gpus:
        gpu.block = {"util": 4.0}  # every GPU's reads hang; polls still finish, serving old readings
    node.scenario.write(node.scenario_path)
    wait_until(lambda: readyz(agent.url)[0] == 503, 10, "not ready while every device is stale")
    reason = readyz(agent.url)[1]
    assert "no device read in the last" in reason and "all 2" in reason, reason
    for gpu in node.scenario.gpus:
        gpu.block = {}
    node.scenario.write(node.scenario_path)
    wait_until(lambda: readyz(agent.url)[0] == 200, 15, "ready again once the reads return")


def test_one_stale_device_of_two_leaves_the_agent_ready(node: Node, start_agent) -> None:  # type: ignore[no-untyped-def]
    agent = start_agent([*node.args(), "--no-kubernetes", "--max-staleness", "1"], node.scenario_path)
    wait_until(lambda: readyz(agent.url)[0] == 200, 10, "ready")
    node.scenario.gpus[0].block = {"util": 3.0}
    node.scenario.write(node.scenario_path)
    agent.wait_for(lambda s: s.get(("gpu_exporter_stale_series", frozenset())) == 1, what="one stale device")
    assert readyz(agent.url)[0] == 200  # the other GPU is served fresh: scraping still pays


class Faulty(Collector):
    """A collector that raises, or blocks until released, while ``armed``."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.armed = False
        self.release = threading.Event()

    def collect(self) -> Iterator:  # type: ignore[type-arg]
        if self.armed and self.fault == "raise":
            raise UnicodeEncodeError("utf-8", "\udc80", 0, 1, "surrogates not allowed")
        if self.armed and self.fault == "hang":
            self.release.wait(30)
        return iter(())


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    """The agent in this process, with or without an NVML library: every freshness check comes
    before the driver's and says its own reason."""
    config = parse_config(
        [
            "--no-kubernetes",
            "--interval",
            "0.1",
            "--pod-resources-socket",
            str(tmp_path / "none.sock"),
            "--proc-root",
            str(tmp_path),
        ],
        environ={},
    )
    running = Agent(config)
    running.exposition.render()
    running.start()
    yield running
    running.stop()


def scrape_in_background(agent: Agent) -> None:
    """What a scrape does: ask for a rendering newer than the last poll."""
    threading.Thread(target=agent.exposition.latest_parts, args=(False,), daemon=True).start()


FRESHNESS = ("no poll", "the /metrics renderer", "rendering /metrics", "no device read")


def freshness_reason(agent: Agent) -> str:
    """Why the agent is not ready for want of fresh data, or "" (ready, or not only for its driver)."""
    ready, reason = agent.readiness()
    return "" if ready or not reason.startswith(FRESHNESS) else reason


def only_nvml_missing(agent: Agent) -> bool:
    return freshness_reason(agent) == ""


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("raise", "rendering /metrics fails (UnicodeEncodeError: "),
        ("hang", "the /metrics renderer has stopped"),
    ],
)
def test_a_rendering_that_fails_or_hangs_makes_the_agent_not_ready(agent: Agent, fault: str, reason: str) -> None:
    faulty = Faulty(fault)
    agent.registry.register(faulty)
    wait_until(lambda: only_nvml_missing(agent), 5, "only NVML missing")
    faulty.armed = True
    scrape_in_background(agent)
    wait_until(lambda: freshness_reason(agent).startswith(reason), 5, f"readiness to say {reason!r}")
    faulty.armed = False
    faulty.release.set()
    scrape_in_background(agent)
    wait_until(lambda: only_nvml_missing(agent), 5, "recovery at the next scrape")
