"""The RELIABILITY.md renderer: sorted rows, each with its test's result, and losses that cannot hide."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest
from reliability import ReliabilityLog, render, results_from_stats

NOW = dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.UTC)


def _log() -> ReliabilityLog:
    log = ReliabilityLog()
    second, first = log.recorder("tests/test_b.py::test_kill"), log.recorder("tests/test_a.py::test_fuzz")
    second.fault("kill -9 the search worker", "trial retried, study complete")
    first.bad_input("zero-byte PNG", "30 generated examples, all PipelineError")
    first.bad_input("truncated JPEG", "40 generated examples, all PipelineError")
    second.lost("runs", 0, "after kill -9")
    return log


def test_rows_are_sorted_and_carry_their_tests_result() -> None:
    results = {"tests/test_a.py::test_fuzz": "passed", "tests/test_b.py::test_kill": "failed"}
    text = render(_log(), results, "tests/test_a.py tests/test_b.py", NOW)
    assert "2026-01-02 03:04" in text and "`tests/test_a.py tests/test_b.py`" in text
    assert "Reliability tests: 2 (1 failed, 1 passed)" in text
    assert text.index("truncated JPEG") < text.index("zero-byte PNG")
    assert "| kill -9 the search worker | trial retried, study complete | `tests/test_b.py::test_kill` | failed |" in text
    assert "| runs | 0 | 1 |" in text and "| trials | not checked | 0 |" in text
    assert render(_log(), results, "tests/test_a.py tests/test_b.py", NOW) == text, "the same records give the same report"


def test_a_loss_is_listed_with_its_detail() -> None:
    log = _log()
    log.recorder("tests/test_c.py::test_promote").lost("models", 2, "versions without artifacts")
    text = render(log, {}, "", NOW)
    assert "| models | 2 | 1 |" in text
    assert "- 2 models: versions without artifacts (`tests/test_c.py::test_promote`)" in text
    assert "not finished" in text, "a test without a result never reads as passed"


@pytest.mark.parametrize("kind, count", [("files", 0), ("runs", -1)])
def test_lost_refuses_unknown_kinds_and_negative_counts(kind: str, count: int) -> None:
    with pytest.raises(ValueError):
        ReliabilityLog().recorder("t").lost(kind, count)


def test_worst_result_of_a_test_wins() -> None:
    report = lambda nodeid: SimpleNamespace(nodeid=nodeid)  # noqa: E731
    stats = {"passed": [report("t1"), report("t2")], "error": [report("t2")], "skipped": [report("t3")], "": [report("t4")]}
    assert results_from_stats(stats) == {"t1": "passed", "t2": "error", "t3": "skipped"}


def test_records_sent_from_xdist_workers_render_the_same_report_as_one_process() -> None:
    import json

    merged = ReliabilityLog()
    for worker in (_log(), ReliabilityLog()):
        merged.merge(json.loads(json.dumps(worker.as_dict())))  # what execnet carries: plain data
    results = {"tests/test_a.py::test_fuzz": "passed", "tests/test_b.py::test_kill": "passed"}
    assert render(merged, results, "tests", NOW) == render(_log(), results, "tests", NOW)
    assert merged.tests == _log().tests and not ReliabilityLog().as_dict()["faults"]
