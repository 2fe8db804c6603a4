"""What the coordinator saves in its ledger, and how a restarted coordinator goes on from it (the agents keep
running meanwhile; they send again what it may have lost)."""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from raygossip.engines.ledger import int_keys, jsonable_keys
from raygossip.engines.records import RecordBook
from raygossip.engines.timeline_clock import restore_schedule, run_clock

LOOP_WAIT_S = 0.5  # a restarted coordinator waits on each agent's loop in slices of this (AgentActor.loop_result)


def ledger_state(c: Any) -> dict:
    """The coordinator's state that its death must not take (called with its lock held). Not in it: reports of
    steps not yet complete, the snapshots sent by value and checkpoint offers (the agents keep those until they
    are safe and send them again), and the references of the agents' loops (a restarted coordinator waits on the
    loops through loop_result)."""
    restarting = sorted(c.restarting | {i for i, _ in c.restart_queue})
    return {
        "started": c.started, "run_started": c.run_started, "deaths": c.deaths,
        "incarnations": list(c.incarnations), "restarts": list(c.restarts), "dropped": sorted(c.dropped),
        "restarting": restarting, "host_names": jsonable_keys(c.host_names),
        "failures": c.failures, "injected": jsonable_keys(c.injected), "events": c.events,
        "timeline_recorded": sorted(c.timeline_recorded), "stopping": c.stopping, "aborted": c.aborted,
        "book": c.book.saved(), "before": c.before, "resumed_from": c.resumed_from,
        "checkpoint_dir": c.checkpoint_dir, "written": sorted(c.written),
        "timeline_scheduled": jsonable_keys(c.plan.timeline.scheduled), "timeline_skipped": sorted(c.timeline_skipped),
    }


def recover(c: Any, saved: dict) -> None:
    """Ray restarted the coordinator (its __init__ ran again): take back the ledger's state, find the replacement
    actors by name, wait on every live agent's loop again, restart the agents whose restart its death cut short,
    and ask every actor to send again what it may have lost (RaySupervisor.resend)."""
    c.started, c.run_started, c.deaths = saved["started"], saved["run_started"], saved["deaths"] + 1
    c.incarnations, c.restarts, c.dropped = list(saved["incarnations"]), list(saved["restarts"]), set(saved["dropped"])
    c.failures, c.injected, c.events = saved["failures"], int_keys(saved["injected"]), saved["events"]
    c.timeline_recorded, c.stopping, c.aborted = set(saved["timeline_recorded"]), saved["stopping"], saved["aborted"]
    c.book = RecordBook.restored(saved["book"])
    c.before, c.resumed_from = saved["before"], saved["resumed_from"]
    c.checkpoint_dir, c.written = saved["checkpoint_dir"], set(saved["written"])
    c.timeline_skipped.update(restore_schedule(c.plan, saved))
    c.adaptive.restore(c.before["events"] + c.events, c.plan.total_steps)  # the gammas it set, back in the plan
    c.host_names = int_keys(saved["host_names"])
    for group, name in c.host_names.items():
        try:
            handle = ray.get_actor(name)
        except ValueError:  # it died meanwhile: the agents' loops fail to answer and are handled as deaths
            continue
        for i in c.recipe["groups"][group]:
            c.agents[i] = handle
    c.event("coordinator_restarted", deaths=c.deaths, records=len(c.book.records))
    if not c.run_started:
        return
    interrupted = [i for i in saved["restarting"] if i not in c.dropped]
    for i in c.live(exclude=interrupted):
        c.watch(i, LOOP_WAIT_S)
    if interrupted:  # new actors may be half made: start them again
        c.queue_restarts(interrupted, time.time())
    c.resent = [host.coordinator_back.remote() for host in c.hosts(c.live(exclude=interrupted))]
    if c.plan.timeline.timed:
        threading.Thread(target=run_clock, args=(c,), daemon=True).start()
