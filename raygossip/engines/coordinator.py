"""The coordinator actor: starts the agents, gathers their records, restarts or drops dead ones, merges at the end.
It is made of parts with their own state: the roster (who is in the run), the agents' recovery (supervision.py),
the records (run_records.py), the checkpoint barrier (run_checkpoints.py) and its ledger (ledger.py)."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
import ray

from raygossip.algorithms.topology import build_topology
from raygossip.config import Config
from raygossip.config_io import from_dict
from raygossip.core.plan import RunPlan
from raygossip.engines.agent_states import copied_state
from raygossip.engines.common import MergedModel, RunSetup
from raygossip.engines.coordinator_merge import average_only, final_merge
from raygossip.engines.coordinator_state import ledger_state, recover
from raygossip.engines.ledger import Ledger
from raygossip.engines.loop_watch import LoopWatch
from raygossip.engines.ray_setup import dataset_from_numpy, pin_threads
from raygossip.engines.roster import Roster
from raygossip.engines.run_checkpoints import CheckpointBarrier, write_run_checkpoint
from raygossip.engines.run_records import RunRecords
from raygossip.engines.supervision import AgentRecovery
from raygossip.engines.timeline_clock import restore_schedule, run_clock


@ray.remote(concurrency_groups={"report": 1, "control": 2})
class Coordinator:
    """Owns the plan and the run's clock; starts the agents, gathers evaluations, keeps the agents' snapshots,
    replaces or drops agents that die (runtime.on_failure), performs the final merge."""

    def __init__(self, arguments: list) -> None:
        """arguments: [a reference to (config_dict, [data ref], steps_per_epoch, state_place, agent handles, recipe)],
        put and held by the driver for the whole run: Ray restarts this actor (max_restarts) with the same arguments
        and does not keep an actor's own large arguments alive for that (ray-project/ray#53727), so they come by a
        reference the driver owns. state_place: (node, folder) the driver made for the run's state: the agents'
        snapshot files and this actor's ledger. After a restart it goes on from its ledger (coordinator_state.recover)."""
        config_dict, data, steps_per_epoch, state_place, agents, recipe = ray.get(arguments[0])
        pin_threads(1)
        Ledger.count_restart(state_place[1])
        self.config: Config = from_dict(Config, config_dict)
        runtime = self.config.runtime
        arrays = ray.get(data[0])
        dataset, test_x, test_y = dataset_from_numpy(arrays)
        topology = build_topology(self.config.topology.name, self.config.agents.count, self.config.topology.weights,
                                  self.config.topology.params)
        self.plan = RunPlan(self.config, topology, steps_per_epoch)
        setup = RunSetup(self.config, dataset, [], topology, self.plan, test_x, test_y, {}, arrays["task"])
        self.merged = MergedModel(setup)
        self.recipe = recipe
        self.condition = threading.Condition()  # (reentrant) around the state every thread of this actor shares
        self.started = time.time()
        self.events: list[dict] = []
        self.timeline_recorded: set[int] = set()  # timeline events (by index) an agent recorded
        self.timeline_skipped: set[int] = set()  # wall-clock timeline events that could not be scheduled
        self.roster = Roster(agents, recipe["groups"], runtime.wait_timeout_s)
        self.records = RunRecords(self.plan, self.roster, self.merged, self.condition, self.event,
                                  lambda: self.started, lambda: self.ledger.save())
        self.checkpoints = CheckpointBarrier(None)
        self.recovery = AgentRecovery(self, state_place if runtime.on_failure == "restart" and runtime.snapshot_every
                                      else None)
        self.loops = LoopWatch(self.roster, runtime.mode == "sync")
        self.aborted: dict | None = None
        self.stopping = False
        self.finished: list[dict] | None = None
        self.run_started = False
        self.deaths = 0  # of this coordinator (each restart adds one)
        self.resent: list[Any] = []  # after a restart: the actors' calls that send again what it lost
        self.ledger = Ledger(state_place[1], lambda: ledger_state(self), self.condition)
        saved = self.ledger.load()
        if saved is not None:  # Ray restarted this actor: go on from what its previous life saved
            recover(self, saved)

    @ray.method(concurrency_group="control")
    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group="control")
    def snapshot_place(self) -> tuple[str, str] | None:
        """(node, directory) where the agents on this actor's node write their snapshots; None without snapshots."""
        return self.recovery.snapshot_dir

    @ray.method(concurrency_group="control")
    def start(self, checkpoint_dir: str | None = None, resumed: dict | None = None) -> None:
        """Start every agent's own loop; returns at once (the loops run in the agents).

        resumed: the checkpoint's run state (records, events, wall time, dropped agents) when resuming."""
        if self.run_started:  # (a call retried after this actor restarted)
            return
        roster = self.roster
        self.checkpoints.directory = checkpoint_dir
        self.started = time.time()
        if resumed is not None:
            step = int(resumed["step"])
            events = self.records.adaptive.restore(list(resumed["events"]), step)
            self.records.before = {"records": list(resumed.get("record_list", [])), "events": events}
            self.records.book.resumed_from = step
            self.timeline_skipped.update(restore_schedule(self.plan, resumed))
            self.started = time.time() - float(resumed["wall_time_s"])  # the run's clock goes on
            self.event("resumed", step=step)
            for i in resumed.get("dropped", []):
                roster.dropped.add(i)
                roster.gather([host.peer_dropped.remote(i) for host in roster.hosts(roster.live())])
            for members in roster.groups:  # an actor that hosts dropped agents only
                if all(i in roster.dropped for i in members):
                    ray.kill(roster.agents[members[0]])
            self.brief(roster.hosts(roster.live()))  # what the run decided before its checkpoint
        resync = resumed is not None and self.config.runtime.mode != "sync"  # in-flight messages were not saved
        for members in roster.groups:
            self.loops.launch([i for i in members if i not in roster.dropped], checkpoint_dir is not None, resync)
        self.event("run_started", agents=len(self.loops.runs))
        self.run_started = True
        self.ledger.save()
        if self.plan.timeline.timed:  # wall-clock timeline events
            threading.Thread(target=run_clock, args=(self,), daemon=True).start()

    def brief(self, hosts: list[Any]) -> None:
        """Tell new actors (a resumed run's, restarted ones) what the run decided while it went: the wall-clock
        timeline events scheduled so far and the adaptive averaging rate set so far."""
        scheduled = sorted(self.plan.timeline.scheduled.items())
        gammas = self.plan.adaptive_gammas()
        refs = [host.schedule_event.remote(index, round_index) for host in hosts for index, round_index in scheduled]
        refs += [host.set_gammas.remote(gammas) for host in hosts if gammas]
        self.roster.gather(refs)

    @ray.method(concurrency_group="control")
    def wait_finished(self, stall_s: float) -> dict:
        """Wait for the agents' loops, handling deaths as runtime.on_failure says; in bounded/async mode, once a
        quorum finished, stop the rest. Returns the finished agents' stats and whether the run was aborted.

        Restarts run in another thread, so a death is detected (and the neighbours told) within a fraction of a
        second even while another agent is being restarted. A run may take as long as it needs: every `stall_s`
        seconds without a finished loop the agents' steps are read, and a run in which no agent took a step
        since the last look is stopped as aborted (reason: stalled)."""
        roster, recovery = self.roster, self.recovery
        roster.gather(self.resent)  # (after a restart: every report it had lost is in again)
        n = len(roster.live())  # (after a restart of this actor, agents being restarted have no loop yet)
        quorum = n if self.config.runtime.mode == "sync" else max(1, math.ceil(self.config.runtime.finish_quorum * n))
        stats: dict[int, dict] = {}
        stall = {"deadline": time.time() + stall_s, "positions": None}
        while self.aborted is None:
            with self.condition:
                waiting = {ref: i for i, ref in self.loops.runs.items()
                           if i not in stats and i not in roster.dropped and i not in recovery.restarting}
                restarting = bool(recovery.restarting)
                if not waiting and restarting:
                    self.condition.wait(timeout=0.5)
                    continue
            if not waiting:
                break
            # in slices: an abort (divergence, a failure under abort) set by another thread ends this loop at once
            ready, _ = ray.wait(list(waiting), num_returns=1,
                                timeout=0.5 if restarting else max(0.0, min(0.2, stall["deadline"] - time.time())))
            if ready:  # (and every other one ready by now)
                ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
            with self.condition:
                ended, failed = self.loops.collect(ready, waiting)
            stats.update(ended)
            if not ended and not failed and not restarting and time.time() >= stall["deadline"]:
                if self.stalled(sorted(waiting.values()), stall, stall_s):
                    break
            failed = recovery.with_actor_mates(failed, stats)
            if failed:
                recovery.handle_failures(failed)
            for i in [i for i in stats if i in roster.dropped]:  # a diverged agent that was dropped
                stats.pop(i)
            if not self.stopping and self.aborted is None and quorum <= len(stats) < len(roster.live()):
                self.stopping = True
                stopped = [i for i in roster.live() if i not in stats]
                steps = roster.gather([roster.agents[i].stop.remote(i) for i in stopped])
                self.event("quorum_finished", finished=len(stats), stopped=stopped, stopped_at_steps=steps)
        if self.aborted is not None:
            alive = roster.live(set(stats) | set(self.aborted["agents"]))
            stats.update(self.loops.stop(alive, self.config.runtime.wait_timeout_s))
        else:
            self.records.complete_pending()
        ordered = [stats[i] for i in sorted(stats) if i not in roster.dropped]  # (a dropped diverged agent returned)
        self.event("agents_finished", steps=[s["steps"] for s in ordered])
        with self.condition:
            self.finished = ordered
            self.condition.notify_all()  # a waiting poll returns at once
        return {"stats": ordered, "aborted": self.aborted}

    def stalled(self, ids: list[int], stall: dict, stall_s: float) -> bool:
        """No loop ended for stall_s: read the agents' steps; stop the run as aborted if none moved since the last
        look (the first look is never a stall)."""
        now = self.loops.positions(ids)
        if now != stall["positions"]:
            stall.update(positions=now, deadline=time.time() + stall_s)
            return False
        self.aborted = {"agents": [], "field": "runtime.wait_timeout_s",
                        "reason": f"the run stalled: none of the {len(ids)} unfinished agents took a step in "
                                  f"{stall_s:g} s (raise runtime.wait_timeout_s if one step takes longer)"}
        self.event("run_stalled", agents=ids, steps=[now[i] for i in ids])
        return True

    def abort(self, aborted: dict) -> None:
        """The run ends now: every other live agent is told to stop at once (its wait for a letter, a gamma or a
        checkpoint ends), so nobody waits out runtime.wait_timeout_s; wait_finished collects what they return."""
        self.aborted = aborted
        for i in self.roster.live(exclude=aborted["agents"]):
            self.roster.agents[i].stop.remote(i)

    @ray.method(concurrency_group="control")
    def agent_diverged(self, agent: int, incarnation: int, step: int, what: str) -> None:
        """An agent's loss or parameters went non-finite (it stopped): drop it or abort, as train.on_divergence says."""
        if incarnation != self.roster.incarnations[agent] or agent in self.roster.dropped:
            return
        self.event("diverged", agent=agent, step=step, what=what, unix_s=time.time())  # (when, on the wall clock)
        reason = f"agent {agent}'s {what} became non-finite at step {step}"
        if self.config.train.on_divergence == "drop":
            self.recovery.drop(agent, reason=f"diverged ({reason})")
            if not self.roster.live():
                self.abort({"agents": [agent], "field": "train.on_divergence", "status": "diverged",
                            "reason": f"{reason}, the last agent left"})
            return
        self.abort({"agents": [agent], "field": "train.on_divergence", "status": "diverged",
                    "reason": f"{reason} (train.on_divergence is abort)"})

    @ray.method(concurrency_group="control")
    def live_agents(self) -> dict[int, Any]:
        """The live agents' actors (not those dead and waiting for their restart)."""
        with self.condition:
            return {i: self.roster.agents[i] for i in self.roster.live(exclude=self.recovery.pending())}

    @ray.method(concurrency_group="control")
    def failure_report(self) -> dict:
        return {"failures": list(self.recovery.failures), "restarts": sum(self.roster.restarts),
                "dropped_agents": sorted(self.roster.dropped), "coordinator_deaths": self.deaths}

    # ------------------------------------------------------------ what the agents send

    def event(self, kind: str, **fields) -> None:
        with self.condition:
            self.events.append({"kind": kind, "time_s": time.time() - self.started, **fields})
        self.ledger.touch()

    @ray.method(concurrency_group="report")
    def record_event(self, event: dict) -> None:
        self.record_events([event])

    @ray.method(concurrency_group="report")
    def record_events(self, events: list[dict]) -> None:
        stamped = []
        for event in events:
            if event.get("kind") == "timeline":  # once: a restarted agent goes through its last rounds again
                with self.condition:
                    if event["index"] in self.timeline_recorded:
                        continue
                    self.timeline_recorded.add(event["index"])
            event = dict(event)
            event["time_s"] = event.pop("time", time.time()) - self.started
            if event.get("kind") == "fault_injected":  # its death is detected next (AgentRecovery.handle_failures)
                with self.condition:
                    self.recovery.injected[event["agent"]] = event
            stamped.append(event)
        with self.condition:
            self.events.extend(stamped)
        self.ledger.touch()

    @ray.method(concurrency_group="report")
    def report(self, agent: int, step: int, accuracy: float | None, state: list, loss: float, traffic: dict,
               incarnation: int = 0) -> int:
        """An agent's evaluation at `step`; once every live agent reported that step, build the network record.
        A restarted agent reports steps again: those already recorded are ignored, and a dead life's late report
        never replaces a newer life's. Returns the step below which every report is recorded (the agents forget
        those; they send the others again if this actor restarts)."""
        return self.records.report(agent, step, accuracy, state, loss, traffic, incarnation)

    @ray.method(concurrency_group="report")
    def keep_snapshot(self, agent: int, incarnation: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """An agent's latest state, copied (the arrays may live in memory its process owns)."""
        if incarnation == self.roster.incarnations[agent]:
            self.recovery.snapshots[agent] = copied_state(arrays, meta)

    @ray.method(concurrency_group="report")
    def keep_checkpoint(self, agent: int, incarnation: int, step: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """One agent's state at a checkpoint step; once every live agent's is in, write the checkpoint."""
        if incarnation != self.roster.incarnations[agent]:
            return
        copied = copied_state(arrays, meta)
        if self.config.runtime.on_failure == "restart":
            self.recovery.snapshots[agent] = copied
        with self.condition:
            complete = self.checkpoints.offer(agent, step, copied, self.roster.live())
        if complete:  # written by another thread: it waits for this step's records, which come through this group
            threading.Thread(target=write_run_checkpoint, args=(self, step), daemon=True).start()

    @ray.method(concurrency_group="control")
    def poll(self, seen: int, timeout_s: float) -> tuple[list[dict], bool]:
        """(records after the first `seen`, whether the agents finished), waiting up to timeout_s for either."""
        with self.condition:
            if len(self.records.book.delivered) <= seen and self.finished is None:
                self.condition.wait(timeout=timeout_s)
            return list(self.records.book.delivered[seen:]), self.finished is not None

    # ------------------------------------------------------------ the end

    @ray.method(concurrency_group="control")
    def drop_lost_after_finish(self) -> list[int]:
        """The live agents whose process died after their loop finished leave the run (AgentRecovery's)."""
        return self.recovery.drop_lost_after_finish()

    @ray.method(concurrency_group="control")
    def merged_state(self) -> dict[str, np.ndarray]:
        """The exact average of the live agents' models, without sending it back (final merge off)."""
        return average_only(self.roster, self.plan, self.merged)

    @ray.method(concurrency_group="control")
    def final_merge(self) -> dict:
        """Gather every live agent's parameters, average exactly, send the average back, re-estimate batch norm."""
        accuracy = final_merge(self.roster, self.plan, self.merged)
        self.event("merge_done", merged_test_accuracy=accuracy, bn=self.config.schedule.final_merge.bn,
                   agents=len(self.roster.live()))
        self.ledger.save()
        return {"merged_accuracy": accuracy, "state_dict": {k: v.numpy() for k, v in self.merged.state_dict().items()}}

    @ray.method(concurrency_group="control")
    def timeline_scheduled(self) -> dict[int, int]:
        """Wall-clock timeline events scheduled so far: index -> the round they are in force from."""
        return dict(self.plan.timeline.scheduled)

    @ray.method(concurrency_group="control")
    def get_events(self) -> list[dict]:
        with self.condition:
            return self.records.before["events"] + sorted(self.events, key=lambda e: e["time_s"])
