"""Identical work within a second done once (exporter.adapter.sharing): what lets ten clients of
one HPA, or every HPA of a namespace, cost Prometheus one query a second."""

from __future__ import annotations

import threading
import time

import pytest

from exporter.adapter.sharing import SharedAnswers, WaitTimeoutError


def test_concurrent_identical_requests_share_one_computation() -> None:
    shared = SharedAnswers(100, len)
    calls = []
    release = threading.Event()

    def slow() -> str:
        calls.append(1)
        release.wait(5)
        return "answer"

    answers: list[str] = []
    threads = [threading.Thread(target=lambda: answers.append(shared.get("q", slow))) for _ in range(10)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(5)
    assert answers == ["answer"] * 10 and len(calls) == 1


def test_an_answer_is_reused_only_while_fresh() -> None:
    now = [0.0]
    shared = SharedAnswers(100, lambda _: 1, max_age_s=1.0, clock=lambda: now[0])
    computed = iter(range(10))
    assert shared.get("q", lambda: next(computed)) == 0
    now[0] = 0.9
    assert shared.get("q", lambda: next(computed)) == 0
    now[0] = 1.0
    assert shared.get("q", lambda: next(computed)) == 1
    assert shared.get("other", lambda: next(computed)) == 2


def test_a_failure_reaches_the_requests_that_waited_for_it_and_no_later_one() -> None:
    shared = SharedAnswers(100, len)
    release = threading.Event()
    attempts = []

    def failing() -> str:
        attempts.append(1)
        release.wait(5)
        raise ConnectionError("Prometheus down")

    errors: list[BaseException] = []

    def ask() -> None:
        try:
            shared.get("q", failing)
        except ConnectionError as error:
            errors.append(error)

    threads = [threading.Thread(target=ask) for _ in range(5)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(errors) == 5 and len(attempts) == 1
    assert shared.get("q", lambda: "recovered") == "recovered"  # the failure was not kept


def test_answers_kept_are_bounded_by_age_and_weight() -> None:
    now = [0.0]
    shared = SharedAnswers(10, len, max_age_s=1.0, clock=lambda: now[0])
    for n in range(5):
        shared.get(f"q{n}", lambda: b"1234")  # 4 bytes each: two fit under 10
    assert list(shared._answers) == ["q3", "q4"]  # the oldest made room
    assert shared.get("huge", lambda: b"x" * 11) == b"x" * 11  # answered, but heavier than the bound: not kept
    assert "huge" not in shared._answers
    now[0] = 5.0
    shared.get("new", lambda: b"1")
    assert list(shared._answers) == ["new"]  # the expired ones went with the next answer kept


def test_a_failed_computation_raises_to_its_caller() -> None:
    with pytest.raises(ValueError):
        SharedAnswers(100, len).get("q", lambda: int("x"))


def test_a_request_waits_for_a_stuck_identical_one_no_longer_than_wait_s() -> None:
    shared = SharedAnswers(100, len, wait_s=0.5)
    release = threading.Event()
    leader = threading.Thread(target=lambda: shared.get("q", lambda: str(release.wait(30))))
    leader.start()
    time.sleep(0.2)
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        shared.get("q", lambda: "never asked: the leader is in flight")
    assert time.monotonic() - started < 10  # the leader is still stuck; the follower is free
    release.set()
    leader.join(5)
    assert shared.get("q", lambda: "fresh") == "True"  # the leader's answer, once it came
