"""The Ray engine's wall-clock timeline: when a time_s event's time comes, the coordinator schedules it at a round.

A resumed run keeps the run's clock and what its checkpoint says was scheduled or skipped (restore_schedule), so an
event already in force does not run again, and one scheduled at a round past the checkpoint still takes effect
there; restarted agents are told every event scheduled so far (Coordinator.brief)."""

from __future__ import annotations

import time
from typing import Any

from raygossip.core.plan import RunPlan
from raygossip.core.timeline import schedule_round
from raygossip.errors import UserError


def run_clock(coordinator: Any) -> None:
    """The timeline's wall-clock events, on a thread of the coordinator: when one's time comes, schedule it a little
    past the farthest agent's round (core.timeline.schedule_round) and tell every live agent; one that cannot be
    (past the run's end, or not valid then) is recorded as skipped. Returns when the run ends."""
    c = coordinator
    for due, index in c.plan.timeline.timed:
        if index in c.plan.timeline.scheduled or index in c.timeline_skipped:  # (a resumed run's, done before)
            continue
        while c.finished is None and c.aborted is None and time.time() < c.started + due:
            time.sleep(min(0.05, max(0.0, c.started + due - time.time())))
        if c.finished is not None or c.aborted is not None:
            return
        roster = c.roster
        live = roster.live()
        steps = [p for p in roster.gather([roster.agents[i].position.remote(i) for i in live]) if p is not None]
        round_index = schedule_round(steps or [0], time.time() - c.started, c.plan.local_steps)
        action = c.config.timeline[index].action
        try:
            if round_index >= c.plan.total_rounds:
                raise UserError(f"timeline[{index}].time_s", f"round {round_index} is past the run's end")
            c.plan.schedule(index, round_index)
        except UserError as error:
            c.timeline_skipped.add(index)
            c.event("timeline_skipped", index=index, action=action, reason=str(error))
            continue
        roster.gather([host.schedule_event.remote(index, round_index) for host in roster.hosts(live)])
        c.event("timeline_scheduled", index=index, action=action, round=round_index, scheduled_time_s=due)


def restore_schedule(plan: RunPlan, resumed: dict) -> set[int]:
    """A resumed run: the wall-clock events its checkpoint's run state says were scheduled (index -> round), in force
    again in `plan` at their rounds; returns the indices of those that were skipped. run_clock passes over both."""
    for index, round_index in sorted((int(k), int(r)) for k, r in resumed.get("timeline_scheduled", {}).items()):
        plan.schedule(index, round_index)
    return {int(k) for k in resumed.get("timeline_skipped", [])}
