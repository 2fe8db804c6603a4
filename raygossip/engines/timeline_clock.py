"""The Ray engine's wall-clock timeline: when a time_s event's time comes, the coordinator schedules it at a round."""

from __future__ import annotations

import time
from typing import Any

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
        live = c.live()
        steps = [p for p in c.gather([c.agents[i].position.remote(i) for i in live]) if p is not None]
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
        c.gather([host.schedule_event.remote(index, round_index) for host in c.hosts(live)])
        c.event("timeline_scheduled", index=index, action=action, round=round_index, scheduled_time_s=due)
