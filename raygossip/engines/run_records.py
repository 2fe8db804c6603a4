"""The coordinator's records: agents' evaluation reports in, one network record per evaluated step out (the merged
model's evaluation, the consensus distance, the adaptive averaging rate)."""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np
import ray

from raygossip.algorithms.merge import consensus_distance, global_average
from raygossip.core.plan import RunPlan
from raygossip.engines.agent_states import split_state, traffic_of
from raygossip.engines.common import AdaptiveRate, MergedModel, average_buffers, network_record
from raygossip.engines.records import RecordBook, Report
from raygossip.engines.roster import Roster


class RunRecords:
    """Reports wait in the record book until every live agent reported the step; the record is then built once,
    saved in the ledger and published. Shares the coordinator's lock (`condition`) and clock (`started()`)."""

    def __init__(self, plan: RunPlan, roster: Roster, merged: MergedModel, condition: threading.Condition,
                 event: Callable[..., None], started: Callable[[], float], save: Callable[[], None]) -> None:
        self.plan, self.roster, self.merged = plan, roster, merged
        self.condition, self.event, self.started, self.save = condition, event, started, save
        self.book = RecordBook()
        self.adaptive = AdaptiveRate(plan)  # (schedule.averaging_rate.kind adaptive: gamma from each epoch's record)
        self.comm_counted = (0, 0)  # (rounds, how many of them communicate)
        self.record_lock = threading.Lock()
        self.before: dict = {"records": [], "events": []}  # what a resumed run did before its checkpoint

    def report(self, agent: int, step: int, accuracy: float | None, state: list, loss: float, traffic: dict,
               incarnation: int) -> int:
        """An agent's evaluation at `step` (Coordinator.report). Returns the step below which every report is
        recorded."""
        with self.condition:
            if not self.book.wants(step) or agent in self.roster.dropped:
                return self.book.recorded_below()
        try:  # copied now: the object dies with its owner, the agent, which may die before the record is complete
            arrays = {k: np.array(v, copy=True) for k, v in ray.get(state[0]).items()}
        except ray.exceptions.RayError:
            return self.book.recorded_below()  # the agent died; a restarted one reports this step again
        with self.condition:
            complete = self.book.add(agent, step, Report(accuracy, arrays, loss, traffic, incarnation),
                                     self.roster.live())
        if complete:
            self.finish(step)
        with self.condition:
            return self.book.recorded_below()

    def complete_pending(self) -> None:
        """Records of steps some agents never reached (they were stopped): fill in their final state."""
        with self.condition:
            if not self.book.pending:
                return
        roster = self.roster
        live = roster.live()
        late = {i: r for i, r in zip(live, roster.gather([roster.agents[i].late_report.remote(i) for i in live]))
                if r is not None}
        for agent, report in late.items():
            with self.condition:
                missing = self.book.missing(agent)
            for step in missing:
                self.report(agent, step, *report)

    def finish(self, step: int) -> None:
        """Build and publish the record of a complete step (once)."""
        with self.condition:
            reports = self.book.take(step)
        if reports is None:
            return
        with self.record_lock:  # the report thread, the supervision loop and the restart thread all get here
            self._build(step, reports)

    def _build(self, step: int, reports: dict[int, Report]) -> None:
        plan, roster = self.plan, self.roster
        counted = [i for i in sorted(reports) if i not in roster.dropped]
        order = [i for i in counted if not plan.absent(i, step)]  # (not away after a timeline's leave)
        states = [split_state(reports[i].state) for i in order]
        vectors = [params for params, _ in states]
        if plan.adaptive:  # before the merged evaluation: sync agents wait for this gamma
            gamma_set = self.adaptive.observe(step, consensus_distance(vectors))
            if gamma_set is not None:
                for host in roster.hosts(roster.live()):
                    host.set_gammas.remote({gamma_set["epoch"]: gamma_set["gamma"]})
                self.event(**gamma_set)
        local_validation = self.merged.local_validation_accuracies(states)
        self.merged.load(global_average(vectors), average_buffers([buffers for _, buffers in states]))
        accuracies = [reports[i].accuracy for i in order]
        rounds_done = (step + 1) // plan.local_steps
        record = network_record(
            step=step, plan=plan, vectors=vectors,
            local_accuracies=None if accuracies[0] is None else accuracies,
            merged_accuracy=self.merged.evaluate(), traffic=[traffic_of(reports[i].traffic) for i in counted],
            merged_validation_accuracy=self.merged.validation_accuracy(),
            local_validation_accuracies=local_validation,
            train_loss=float(np.mean([reports[i].loss for i in order])), rounds_done=rounds_done,
            communication_rounds=self.communication_rounds(rounds_done),
            wall_time_s=time.time() - self.started(),
        )
        if len(order) < len(roster.agents):
            record["agents"] = order
        with self.condition:
            self.book.publish(record)
            self.save()  # before anyone sees it: a restarted coordinator delivers the same records
            self.condition.notify_all()

    def communication_rounds(self, rounds_done: int) -> int:
        """How many of the first `rounds_done` rounds communicate (counted once, extended as the run goes)."""
        with self.condition:
            counted, count = self.comm_counted
            for r in range(counted, rounds_done):
                count += self.plan.round_plan(r) is not None
            if rounds_done >= counted:
                self.comm_counted = (rounds_done, count)
                return count
        return sum(self.plan.round_plan(r) is not None for r in range(rounds_done))  # an earlier step (rare)

    def saved(self) -> dict:
        return {"book": self.book.saved(), "before": self.before}

    def restore(self, saved: dict, events: list[dict]) -> None:
        """A restarted coordinator: the records so far, and the gammas its events say it set, back in the plan."""
        self.book = RecordBook.restored(saved["book"])
        self.before = saved["before"]
        self.adaptive.restore(self.before["events"] + events, self.plan.total_steps)
