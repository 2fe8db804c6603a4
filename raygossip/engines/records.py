"""The coordinator's record book: agents' evaluation reports by step, until every live agent reported it. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Report:
    """One agent's evaluation at one step (what its record needs)."""

    accuracy: float | None
    state: dict[str, Any]  # parameters and buffers, this process's own copy
    loss: float
    traffic: dict
    incarnation: int


class RecordBook:
    """Reports wait here until the step is complete (every live agent reported it); the step's record is then
    built once (`take`) and published. A restarted agent reports steps again: steps already recorded are
    ignored, and a dead life's late report never replaces a newer life's. Not thread-safe: the coordinator
    holds its lock around every call."""

    def __init__(self, resumed_from: int = 0) -> None:
        self.resumed_from = resumed_from  # a resumed run's records before this step are in its checkpoint
        self.pending: dict[int, dict[int, Report]] = {}
        self.recorded: set[int] = set()
        self.records: list[dict] = []  # by step
        self.delivered: list[dict] = []  # the same, in the order they were completed (poll hands them out)

    def wants(self, step: int) -> bool:
        """Whether a report of this step can still count."""
        return step not in self.recorded and step >= self.resumed_from

    def add(self, agent: int, step: int, report: Report, live: list[int]) -> bool:
        """Keep a report; True when its step is now complete."""
        if not self.wants(step):
            return False
        earlier = self.pending.get(step, {}).get(agent)
        if earlier is not None and earlier.incarnation > report.incarnation:
            return False
        self.pending.setdefault(step, {})[agent] = report
        return set(self.pending[step]) >= set(live)

    def complete(self, live: list[int]) -> list[int]:
        """Pending steps that every one of `live` has reported (after an agent was dropped)."""
        return sorted(step for step, reports in self.pending.items() if set(reports) >= set(live))

    def missing(self, agent: int) -> list[int]:
        """Pending steps this agent has not reported (it was stopped before it reached them)."""
        return sorted(step for step, reports in self.pending.items() if agent not in reports)

    def take(self, step: int) -> dict[int, Report] | None:
        """The reports of a complete step, once (None when it was taken before or has none)."""
        if step in self.recorded or step not in self.pending:
            return None
        self.recorded.add(step)
        return self.pending.pop(step)

    def publish(self, record: dict) -> None:
        self.delivered.append(record)
        self.records.append(record)
        self.records.sort(key=lambda r: r["step"])

    def recorded_below(self) -> int:
        """A step below which every step that was reported is recorded (the smallest pending one, else one past the
        last recorded)."""
        if self.pending:
            return min(self.pending)
        return max(self.recorded, default=self.resumed_from - 1) + 1

    def saved(self) -> dict:
        """What a restarted coordinator needs (pending reports are not kept: the agents send them again)."""
        return {"resumed_from": self.resumed_from, "recorded": sorted(self.recorded), "records": self.records,
                "delivered": self.delivered}

    @classmethod
    def restored(cls, saved: dict) -> "RecordBook":
        book = cls(saved["resumed_from"])
        book.recorded = set(saved["recorded"])
        book.records, book.delivered = list(saved["records"]), list(saved["delivered"])
        return book

    def done(self, steps: list[int]) -> bool:
        return all(step in self.recorded for step in steps)
