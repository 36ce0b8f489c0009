"""The reliability record of a test run: faults injected, bad inputs tried, runs/trials/models lost.

Tests record through the ``reliability`` fixture (tests/conftest.py); at the end of the session
``pytest_sessionfinish`` writes ``RELIABILITY.md`` at the repository root (``make test`` regenerates it)
whenever any test recorded something. Every row carries the test that made it and that test's result,
so a failing check never reads as a passing one. Rows are sorted, so reruns differ only in numbers and
dates. Under pytest-xdist each worker sends its records to the controller (``as_dict``/``merge``), which writes the file.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from pathlib import Path

LOST_KINDS = ("runs", "trials", "models")
REPORT_NAME = "RELIABILITY.md"


@dataclass(frozen=True)
class Entry:
    """One fault injected or one kind of bad input tried, and what happened to it."""

    what: str
    outcome: str
    test: str  # pytest node id of the test that recorded it


@dataclass(frozen=True)
class Loss:
    """How many runs, trials or models a check found lost (0 is the only acceptable answer)."""

    kind: str
    count: int
    detail: str
    test: str


@dataclass
class ReliabilityLog:
    """Everything recorded in one pytest session."""

    faults: list[Entry] = field(default_factory=list)
    bad_inputs: list[Entry] = field(default_factory=list)
    losses: list[Loss] = field(default_factory=list)
    tests: set[str] = field(default_factory=set)  # node ids of the tests that recorded anything

    def recorder(self, test: str) -> Recorder:
        return Recorder(self, test)

    @property
    def empty(self) -> bool:
        return not (self.faults or self.bad_inputs or self.losses)

    def as_dict(self) -> dict:
        """The records as plain data: what an xdist worker can send its controller."""
        return {
            "faults": [asdict(e) for e in self.faults],
            "bad_inputs": [asdict(e) for e in self.bad_inputs],
            "losses": [asdict(loss) for loss in self.losses],
            "tests": sorted(self.tests),
        }

    def merge(self, records: dict) -> None:
        """Add another log's records (``as_dict``'s form), a worker's in the controller."""
        self.faults += [Entry(**e) for e in records["faults"]]
        self.bad_inputs += [Entry(**e) for e in records["bad_inputs"]]
        self.losses += [Loss(**loss) for loss in records["losses"]]
        self.tests.update(records["tests"])


class Recorder:
    """What the ``reliability`` fixture hands a test: records tagged with that test's node id."""

    def __init__(self, log: ReliabilityLog, test: str) -> None:
        self._log, self._test = log, test

    def fault(self, what: str, outcome: str) -> None:
        """A fault that was injected (``kill -9 the teacher at epoch 2``) and how the system came through it."""
        self._add(self._log.faults, Entry(what, outcome, self._test))

    def bad_input(self, what: str, outcome: str) -> None:
        """A kind of bad input tried (``truncated PNG, data loader``) and what it got (``40 generated examples, all PipelineError``)."""
        self._add(self._log.bad_inputs, Entry(what, outcome, self._test))

    def lost(self, kind: str, count: int, detail: str = "") -> None:
        """How many ``runs``, ``trials`` or ``models`` a check found lost; record 0s too, they are the evidence."""
        if kind not in LOST_KINDS:
            raise ValueError(f"lost kind {kind!r}: use one of {LOST_KINDS}")
        if count < 0:
            raise ValueError(f"lost count {count}: must be >= 0")
        self._add(self._log.losses, Loss(kind, int(count), detail, self._test))

    def _add(self, rows: list, row) -> None:
        rows.append(row)
        self._log.tests.add(self._test)


def _cell(text: str) -> str:
    """Markdown table cells: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def render(log: ReliabilityLog, results: dict[str, str], selection: str, now: dt.datetime | None = None) -> str:
    """The report as Markdown. ``results`` maps test node ids to passed/failed/skipped/error."""
    now = now or dt.datetime.now(dt.UTC)
    outcome_counts: dict[str, int] = {}
    for test in log.tests:
        result = results.get(test, "not finished")
        outcome_counts[result] = outcome_counts.get(result, 0) + 1
    counts = ", ".join(f"{n} {result}" for result, n in sorted(outcome_counts.items()))

    def table(title: str, rows: list[Entry], empty: str) -> list[str]:
        lines = [f"## {title}", ""]
        if not rows:
            return lines + [empty, ""]
        lines += ["| What | Outcome | Test | Result |", "|---|---|---|---|"]
        for row in sorted(rows, key=lambda r: (r.what, r.test, r.outcome)):
            lines.append(f"| {_cell(row.what)} | {_cell(row.outcome)} | `{_cell(row.test)}` | {results.get(row.test, 'not finished')} |")
        return lines + [""]

    lines = [
        "# Reliability report",
        "",
        "Generated by the test run (`make test`, or any pytest run that includes reliability tests) from",
        "`tests/reliability.py`; do not edit by hand. Every row names the test that made the check and",
        "that test's result.",
        "",
        f"- Date (UTC): {now.strftime('%Y-%m-%d %H:%M')}",
        f"- Pytest selection: `{_cell(selection) or '(default: testpaths)'}`",
        f"- Reliability tests: {len(log.tests)} ({counts})",
        "",
    ]
    lines += table("Faults injected", log.faults, "No fault-injection test ran in this session.")
    lines += table("Bad inputs tried", log.bad_inputs, "No bad-input test ran in this session.")

    lines += ["## Lost runs, trials and models (must be 0)", "", "| Kind | Lost | Checks |", "|---|---|---|"]
    for kind in LOST_KINDS:
        checks = [loss for loss in log.losses if loss.kind == kind]
        total = sum(loss.count for loss in checks)
        lines.append(f"| {kind} | {total if checks else 'not checked'} | {len(checks)} |")
    lost = sorted((loss for loss in log.losses if loss.count), key=lambda loss: (loss.kind, loss.test, loss.detail))
    lines.append("")
    if lost:
        lines += (
            ["**Losses found:**", ""] + [f"- {loss.count} {loss.kind}: {_cell(loss.detail)} (`{_cell(loss.test)}`)" for loss in lost] + [""]
        )
    details = sorted({(loss.kind, loss.detail, loss.test) for loss in log.losses if loss.detail and not loss.count})
    if details:
        lines += (
            ["Checked with nothing lost:", ""] + [f"- {kind}: {_cell(detail)} (`{_cell(test)}`)" for kind, detail, test in details] + [""]
        )
    return "\n".join(lines)


# Worst first: a test that passed its call but errored in teardown counts as an error.
RESULT_ORDER = ("failed", "error", "skipped", "xfailed", "xpassed", "passed")


def results_from_stats(stats: dict[str, list]) -> dict[str, str]:
    """Each test's result from the terminal reporter's ``stats`` (reports grouped by category)."""
    results: dict[str, str] = {}
    for category in reversed(RESULT_ORDER):
        for report in stats.get(category, []):
            if getattr(report, "nodeid", None):
                results[report.nodeid] = category
    return results


def write_report(path: Path, log: ReliabilityLog, results: dict[str, str], selection: str) -> None:
    path.write_text(render(log, results, selection))
