"""Whole-run checkpoints on the Ray engine: a consistent cut at a barrier, written once every live agent's state is in."""

from __future__ import annotations

import time
from typing import Any

import torch


class CheckpointBarrier:
    """The agents' states at each checkpoint step until every live agent's is in; which steps were written. Not
    thread-safe: the coordinator holds its lock around every call."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory  # None: checkpoints off
        self.arrivals: dict[int, dict[int, tuple]] = {}  # step -> agent -> (arrays, meta)
        self.written: set[int] = set()

    def offer(self, agent: int, step: int, state: tuple, live: list[int]) -> bool:
        """One agent's state at `step`; True when every live agent's is in (the step can be written). A step
        written before is ignored (agents offer again after the coordinator restarted)."""
        if step in self.written:
            return False
        arrived = self.arrivals.setdefault(step, {})
        arrived[agent] = state
        return set(arrived) >= set(live)

    def complete(self, live: list[int]) -> list[int]:
        """Steps every one of `live` has offered (after an agent was dropped)."""
        return [step for step, arrived in self.arrivals.items() if set(arrived) >= set(live)]

    def take(self, step: int) -> dict[int, tuple] | None:
        """The states of a complete step, once."""
        return self.arrivals.pop(step, None)


def write_run_checkpoint(c: Any, step: int) -> None:
    """Write the checkpoint of `step` (on a thread of coordinator `c`): once the records up to it are in, the
    agents' states and the run state (records, events, clock, drops, timeline and rates decided), then release
    the agents waiting at the barrier."""
    from raygossip.checkpoint import save_checkpoint

    plan = c.plan
    evaluated = [s for s in range(step + 1) if plan.is_eval_step(s)]
    with c.condition:
        arrived = c.checkpoints.take(step)
        if arrived is None:
            return
        records = c.records
        done_before = {r["step"] - 1 for r in records.before["records"]}
        c.condition.wait_for(lambda: records.book.done([s for s in evaluated if s not in done_before]),
                             timeout=c.config.runtime.wait_timeout_s)
        record_list = records.before["records"] + [r for r in records.book.records if r["step"] <= step + 1]
        c.events.append({"kind": "checkpoint_written", "time_s": time.time() - c.started, "step": step + 1})
        events = records.before["events"] + sorted(c.events, key=lambda e: e["time_s"])
    roster = c.roster
    agents = [({k: torch.from_numpy(v) for k, v in arrived[i][0].items()}, arrived[i][1]) if i in arrived
              else ({}, {"dropped": True}) for i in range(len(roster.agents))]
    rounds_done = (step + 1) // plan.local_steps
    run_state = {
        "step": step + 1, "records": len(record_list), "record_list": record_list, "events": events,
        "wall_time_s": time.time() - c.started, "rounds_done": rounds_done,
        "communication_rounds": records.communication_rounds(rounds_done),
        "dropped": sorted(roster.dropped),
        "timeline_scheduled": {str(k): r for k, r in plan.timeline.scheduled.items()},
        "timeline_skipped": sorted(c.timeline_skipped),
    }
    save_checkpoint(c.checkpoints.directory, c.config, run_state, agents)
    with c.condition:
        c.checkpoints.written.add(step)
    c.ledger.touch()
    for host in roster.hosts(roster.live()):
        host.release.remote(step)
