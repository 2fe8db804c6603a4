"""What the coordinator saves in its ledger, and how a restarted coordinator goes on from it (the agents keep
running meanwhile; they send again what it may have lost)."""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from raygossip.engines.supervision import kill_named
from raygossip.engines.timeline_clock import restore_schedule, run_clock


def ledger_state(c: Any) -> dict:
    """The coordinator's state that its death must not take (called with its lock held). Not in it: reports of
    steps not yet complete, the snapshots sent by value and checkpoint offers (the agents keep those until they
    are safe and send them again), and the references of the agents' loops (a restarted coordinator waits on the
    loops through loop_result)."""
    return {
        "started": c.started, "run_started": c.run_started, "deaths": c.deaths, "events": c.events,
        "roster": c.roster.saved(), "recovery": c.recovery.saved(), "records": c.records.saved(),
        "timeline_recorded": sorted(c.timeline_recorded), "stopping": c.stopping, "aborted": c.aborted,
        "checkpoint_dir": c.checkpoints.directory, "written": sorted(c.checkpoints.written),
        "timeline_scheduled": {str(k): r for k, r in c.plan.timeline.scheduled.items()},
        "timeline_skipped": sorted(c.timeline_skipped),
    }


def recover(c: Any, saved: dict) -> None:
    """Ray restarted the coordinator (its __init__ ran again): take back the ledger's state, find the replacement
    actors by name, wait on every live agent's loop again, restart the agents whose restart its death cut short,
    and ask every actor to send again what it may have lost (CoordinatorClient.resend)."""
    c.started, c.run_started, c.deaths, c.events = saved["started"], saved["run_started"], saved["deaths"], saved["events"]
    c.timeline_recorded, c.stopping, c.aborted = set(saved["timeline_recorded"]), saved["stopping"], saved["aborted"]
    c.roster.restore(saved["roster"])
    interrupted = c.recovery.restore(saved["recovery"])
    c.records.restore(saved["records"], c.events)
    c.checkpoints.directory, c.checkpoints.written = saved["checkpoint_dir"], set(saved["written"])
    c.timeline_skipped.update(restore_schedule(c.plan, saved))
    c.event("coordinator_restarted", deaths=c.deaths, records=len(c.records.book.records))
    c.ledger.save()
    if not c.run_started:
        return
    current = set(c.roster.host_names.values())  # replacements a previous life made but did not note: half made
    for name in ray.util.list_named_actors():  # (they hold their placement-group bundle: kill them)
        if name.startswith(c.recipe["name"] + "-") and name not in current:
            kill_named(name)
    for i in c.roster.live(exclude=interrupted):
        c.loops.watch(i)
    if interrupted:  # new actors may be half made: start them again
        c.recovery.queue_restarts(interrupted, time.time())
    c.resent = [host.coordinator_back.remote() for host in c.roster.hosts(c.roster.live(exclude=interrupted))]
    if c.plan.timeline.timed:
        threading.Thread(target=run_clock, args=(c,), daemon=True).start()
