"""The coordinator actor: starts the agents, gathers their records, restarts or drops dead ones, merges at the end."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np
import ray
import torch

from raygossip.algorithms.merge import global_average
from raygossip.algorithms.topology import build_topology
from raygossip.config import Config
from raygossip.config_io import from_dict
from raygossip.core.plan import RunPlan
from raygossip.engines.ray_setup import dataset_from_numpy, pin_threads
from raygossip.algorithms.merge import consensus_distance
from raygossip.engines.common import AdaptiveRate, MergedModel, RunSetup, average_buffers, merge_all, network_record
from raygossip.engines.records import RecordBook, Report
from raygossip.engines.run_checkpoints import Checkpoints
from raygossip.engines.supervision import Supervision
from raygossip.engines.agent_states import split_state, traffic_of
from raygossip.engines.coordinator_state import ledger_state, recover
from raygossip.engines.ledger import Ledger
from raygossip.engines.timeline_clock import restore_schedule, run_clock


@ray.remote(concurrency_groups={"report": 1, "control": 2})
class Coordinator(Supervision, Checkpoints):
    """Owns the plan and the run's clock; starts the agents, gathers evaluations, keeps the agents' snapshots,
    replaces or drops agents that die (runtime.on_failure), performs the final merge."""

    def __init__(self, config_dict: dict, data: list, steps_per_epoch: int, state_place: tuple[str, str],
                 agents: list[Any], recipe: dict) -> None:
        """state_place: (node, folder) the driver made for the run's state: the agents' snapshot files and this
        actor's ledger. Ray restarts this actor (max_restarts) with the same arguments: it then goes on from its
        ledger (coordinator_state.recover)."""
        pin_threads(1)
        self.config: Config = from_dict(Config, config_dict)
        arrays = ray.get(data[0])
        dataset, test_x, test_y = dataset_from_numpy(arrays)
        topology = build_topology(self.config.topology.name, self.config.agents.count, self.config.topology.weights,
                                  self.config.topology.params)
        self.plan = RunPlan(self.config, topology, steps_per_epoch)
        setup = RunSetup(self.config, dataset, [], topology, self.plan, test_x, test_y, {}, arrays["task"])
        self.merged = MergedModel(setup)
        self.adaptive = AdaptiveRate(self.plan)  # (schedule.averaging_rate.kind adaptive: gamma from each epoch's record)
        self.timeline_skipped: set[int] = set()  # wall-clock timeline events that could not be scheduled
        n = self.config.agents.count
        self.agents: list[Any] = list(agents)  # agent -> the actor that hosts it (runtime.agents_per_actor share one)
        self.recipe = recipe
        self.group_of = {i: g for g, members in enumerate(recipe["groups"]) for i in members}
        self.host_names: dict[int, str] = {}  # group -> the name of its replacement actor (restart)
        self.runs: dict[int, Any] = {}
        self.incarnations = [0] * n
        self.restarts = [0] * n
        self.dropped: set[int] = set()
        self.snapshots: dict[int, tuple[dict[str, np.ndarray], dict]] = {}  # sent by value (see latest_snapshot)
        runtime = self.config.runtime
        self.state_place = state_place
        # (this node, directory): the agents on it write their snapshots there
        self.snapshot_dir = state_place if runtime.on_failure == "restart" and runtime.snapshot_every else None
        self.failures: list[dict] = []
        self.injected: dict[int, dict] = {}  # agent -> its current life's injected death, until detected
        self.aborted: dict | None = None
        self.restart_queue: list[tuple[int, float]] = []  # (agent, when its death was detected)
        self.restarting: set[int] = set()
        self.restart_worker: threading.Thread | None = None
        self.stopping = False
        self.comm_counted = (0, 0)  # (rounds, how many of them communicate)
        self.book = RecordBook()
        self.record_lock = threading.Lock()
        self.events: list[dict] = []
        self.timeline_recorded: set[int] = set()  # timeline events (by index) an agent recorded
        self.condition = threading.Condition()
        self.started = time.time()
        self.finished: list[dict] | None = None
        self.checkpoint_dir: str | None = None
        self.arrivals: dict[int, dict[int, tuple]] = {}  # checkpoint step -> agent -> (arrays, meta)
        self.before: dict = {"records": [], "events": []}  # what a resumed run did before its checkpoint
        self.resumed_from = 0
        self.written: set[int] = set()  # checkpoint steps written
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
        return self.snapshot_dir

    @ray.method(concurrency_group="control")
    def start(self, checkpoint_dir: str | None = None, resumed: dict | None = None) -> None:
        """Start every agent's own loop; returns at once (the loops run in the agents).

        resumed: the checkpoint's run state (records, events, wall time, dropped agents) when resuming."""
        if self.run_started:  # (a call retried after this actor restarted)
            return
        recipe = self.recipe
        self.checkpoint_dir = checkpoint_dir
        self.started = time.time()
        if resumed is not None:
            self.resumed_from = int(resumed["step"])
            events = self.adaptive.restore(list(resumed["events"]), self.resumed_from)
            self.before = {"records": list(resumed.get("record_list", [])), "events": events}
            self.restore_timeline(resumed)
            self.book.resumed_from = self.resumed_from
            self.started = time.time() - float(resumed["wall_time_s"])  # the run's clock goes on
            self.event("resumed", step=self.resumed_from)
            for i in resumed.get("dropped", []):
                self.dropped.add(i)
                self.gather([host.peer_dropped.remote(i) for host in self.hosts(self.live())])
            for g, members in enumerate(recipe["groups"]):  # an actor that hosts dropped agents only
                if all(i in self.dropped for i in members):
                    ray.kill(self.agents[members[0]])
        if resumed is not None:  # what the run decided before its checkpoint: wall-clock events, adaptive gammas
            self.brief(self.hosts(self.live()))
        resync = resumed is not None and self.config.runtime.mode != "sync"  # in-flight messages were not saved
        checkpoints = checkpoint_dir is not None
        self.runs = {}
        for members in recipe["groups"]:
            self.runs.update(self.launch([i for i in members if i not in self.dropped], checkpoints, resync))
        self.event("run_started", agents=len(self.runs))
        self.run_started = True
        self.ledger.save()
        if self.plan.timeline.timed:  # wall-clock timeline events
            threading.Thread(target=run_clock, args=(self,), daemon=True).start()

    def restore_timeline(self, resumed: dict) -> None:
        """A resumed run: its wall-clock events scheduled (or skipped) before the checkpoint stay so (run_clock skips
        them): one already in force does not run again, one scheduled at a later round still takes effect there."""
        self.timeline_skipped.update(restore_schedule(self.plan, resumed))

    def brief(self, hosts: list[Any]) -> None:
        """Tell new actors (a resumed run's, restarted ones) what the run decided while it went: the wall-clock
        timeline events scheduled so far and the adaptive averaging rate set so far."""
        scheduled = sorted(self.plan.timeline.scheduled.items())
        gammas = self.plan.adaptive_gammas()
        refs = [host.schedule_event.remote(index, round_index) for host in hosts for index, round_index in scheduled]
        refs += [host.set_gammas.remote(gammas) for host in hosts if gammas]
        self.gather(refs)

    def gather(self, refs: list[Any]) -> list[Any]:
        """Results of calls to agents, None for an agent that died meanwhile (its own run reference tells the
        supervision loop, which handles it next) or that did not answer within runtime.wait_timeout_s."""
        deadline = time.time() + self.config.runtime.wait_timeout_s
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=max(0.1, deadline - time.time())))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append(None)
        return out

    def live(self, exclude: set[int] | list[int] = ()) -> list[int]:
        return [i for i in range(len(self.agents)) if i not in self.dropped and i not in exclude]

    def launch(self, members: list[int], checkpoints: bool, resync: bool = False, together: bool = True) -> dict[int, Any]:
        """Start the loops of these agents of one actor: in sync mode in lockstep on one thread (together), else a
        thread each; one result reference per agent."""
        if not members:
            return {}
        host = self.agents[members[0]]
        if together and self.config.runtime.mode == "sync" and len(members) > 1:
            refs = host.run_together.options(num_returns=len(members)).remote(members, checkpoints, resync)
            return dict(zip(members, refs))
        return {i: host.run.remote(i, checkpoints, resync) for i in members}

    def hosts(self, agents: list[int]) -> list[Any]:
        """The actors that host these agents, each once."""
        return list({self.group_of[i]: self.agents[i] for i in agents}.values())

    def actor_mates(self, agent: int) -> list[int]:
        """The agents that share `agent`'s actor (itself included): they live and die together."""
        return list(self.recipe["groups"][self.group_of[agent]])

    @ray.method(concurrency_group="control")
    def wait_finished(self, stall_s: float) -> dict:
        """Wait for the agents' loops, handling deaths as runtime.on_failure says; in bounded/async mode, once a
        quorum finished, stop the rest. Returns the finished agents' stats and whether the run was aborted.

        Restarts run in another thread, so a death is detected (and the neighbours told) within a fraction of a
        second even while another agent is being restarted. A run may take as long as it needs: every `stall_s`
        seconds without a finished loop the agents' steps are read, and a run in which no agent took a step
        since the last look is stopped as aborted (reason: stalled)."""
        self.gather(self.resent)  # (after a restart: every report it had lost is in again)
        n = len(self.runs)
        deadline = time.time() + stall_s
        positions: dict[int, int] | None = None
        quorum = n if self.config.runtime.mode == "sync" else max(1, math.ceil(self.config.runtime.finish_quorum * n))
        stats: dict[int, dict] = {}
        while self.aborted is None:
            with self.condition:
                waiting = {ref: i for i, ref in self.runs.items()
                           if i not in stats and i not in self.dropped and i not in self.restarting}
                restarting = bool(self.restarting)
                if not waiting and restarting:
                    self.condition.wait(timeout=0.5)
                    continue
            if not waiting:
                break
            # in slices: an abort (divergence, a failure under abort) set by another thread ends this loop at once
            ready, _ = ray.wait(list(waiting), num_returns=1,
                                timeout=0.5 if restarting else max(0.0, min(0.2, deadline - time.time())))
            if not ready:
                if restarting or time.time() < deadline:
                    continue
                ids = sorted(waiting.values())
                now = dict(zip(ids, self.gather([self.agents[i].position.remote(i) for i in ids])))
                if now != positions:  # some agent moved (or this is the first look): not a stall
                    positions, deadline = now, time.time() + stall_s
                    continue
                self.aborted = {"agents": [], "field": "runtime.wait_timeout_s",
                                "reason": f"the run stalled: none of the {len(ids)} unfinished agents took a step in "
                                          f"{stall_s:g} s (raise runtime.wait_timeout_s if one step takes longer)"}
                self.event("run_stalled", agents=ids, steps=[now[i] for i in ids])
                break
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
            failed = []
            for ref in ready:
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    failed.append((waiting[ref], error))
                    continue
                if result is None:  # a loop_result that timed out (this actor restarted): the loop goes on
                    self.watch(waiting[ref])
                else:
                    stats[waiting[ref]] = result
            failed = self.with_actor_mates(failed, stats)
            if failed:
                self.handle_failures(failed)
            for i in [i for i in stats if i in self.dropped]:  # a diverged agent that was dropped
                stats.pop(i)
            if not self.stopping and self.aborted is None and len(stats) >= quorum and len(stats) < len(self.live()):
                self.stopping = True
                stopped = [i for i in self.live() if i not in stats]
                steps = self.gather([self.agents[i].stop.remote(i) for i in stopped])
                self.event("quorum_finished", finished=len(stats), stopped=stopped, stopped_at_steps=steps)
        if self.aborted is not None:
            stats.update(self.stop_all(exclude=set(stats)))
        else:
            self.complete_pending()
        ordered = [stats[i] for i in sorted(stats) if i not in self.dropped]  # (a dropped diverged agent returned)
        self.event("agents_finished", steps=[s["steps"] for s in ordered])
        with self.condition:
            self.finished = ordered
            self.condition.notify_all()  # a waiting poll returns at once
        return {"stats": ordered, "aborted": self.aborted}

    def watch(self, agent: int, timeout_s: float = 0.5) -> None:
        """Wait on the agent's loop through loop_result (a restarted coordinator has lost its run call)."""
        with self.condition:
            self.runs[agent] = self.agents[agent].loop_result.remote(agent, timeout_s)

    def stop_all(self, exclude: set[int]) -> dict[int, dict]:
        """Abort: stop every live agent and collect the stats of those whose loop ends in time."""
        alive = self.live(set(exclude) | set(self.aborted["agents"]))
        for i in alive:
            self.agents[i].stop.remote(i)
        out = {}
        deadline = time.time() + self.config.runtime.wait_timeout_s
        for i in alive:
            try:
                result = ray.get(self.runs[i], timeout=max(0.1, deadline - time.time()))
                if result is None:  # a loop_result (this actor restarted): wait on the loop itself
                    result = ray.get(self.agents[i].loop_result.remote(i, max(0.1, deadline - time.time())))
                if result is not None:
                    out[i] = result
            except (ray.exceptions.RayError, TimeoutError):
                pass
        return out

    @ray.method(concurrency_group="control")
    def live_agents(self) -> dict[int, Any]:
        return {i: self.agents[i] for i in self.live()}

    @ray.method(concurrency_group="control")
    def failure_report(self) -> dict:
        return {"failures": list(self.failures), "restarts": sum(self.restarts), "dropped_agents": sorted(self.dropped),
                "coordinator_deaths": self.deaths}

    # ------------------------------------------------------------ records

    def complete_pending(self) -> None:
        """Records of steps some agents never reached (they were stopped): fill in their final state."""
        with self.condition:
            if not self.book.pending:
                return
        live = self.live()
        late = {i: r for i, r in zip(live, self.gather([self.agents[i].late_report.remote(i) for i in live])) if r is not None}
        for agent, report in late.items():
            with self.condition:
                missing = self.book.missing(agent)
            for step in missing:
                self.report(agent, step, *report)

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
            if event.get("kind") == "fault_injected":  # its death is detected next (Supervision.handle_failures)
                with self.condition:
                    self.injected[event["agent"]] = event
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
        with self.condition:
            if not self.book.wants(step) or agent in self.dropped:
                return self.book.recorded_below()
        try:  # copied now: the object dies with its owner, the agent, which may die before the record is complete
            arrays = {k: np.array(v, copy=True) for k, v in ray.get(state[0]).items()}
        except ray.exceptions.RayError:
            return self.book.recorded_below()  # the agent died; a restarted one reports this step again
        with self.condition:
            complete = self.book.add(agent, step, Report(accuracy, arrays, loss, traffic, incarnation), self.live())
        if complete:
            self.finish_record(step)
        with self.condition:
            return self.book.recorded_below()

    def finish_record(self, step: int) -> None:
        with self.condition:
            reports = self.book.take(step)
        if reports is None:
            return
        with self.record_lock:  # the report thread, the supervision loop and the restart thread all get here
            self._finish_record(step, reports)

    def _finish_record(self, step: int, reports: dict[int, Report]) -> None:
        counted = [i for i in sorted(reports) if i not in self.dropped]
        order = [i for i in counted if not self.plan.absent(i, step)]  # (not away after a timeline's leave)
        states = [split_state(reports[i].state) for i in order]
        vectors = [params for params, _ in states]
        if self.plan.adaptive:  # before the merged evaluation: sync agents wait for this gamma
            gamma_set = self.adaptive.observe(step, consensus_distance(vectors))
            if gamma_set is not None:
                for host in self.hosts(self.live()):
                    host.set_gammas.remote({gamma_set["epoch"]: gamma_set["gamma"]})
                self.event(**gamma_set)
        local_validation = self.merged.local_validation_accuracies(states)
        self.merged.load(global_average(vectors), average_buffers([buffers for _, buffers in states]))
        accuracies = [reports[i].accuracy for i in order]
        rounds_done = (step + 1) // self.plan.local_steps
        record = network_record(
            step=step, plan=self.plan, vectors=vectors,
            local_accuracies=None if accuracies[0] is None else accuracies,
            merged_accuracy=self.merged.evaluate(), traffic=[traffic_of(reports[i].traffic) for i in counted],
            merged_validation_accuracy=self.merged.validation_accuracy(),
            local_validation_accuracies=local_validation,
            train_loss=float(np.mean([reports[i].loss for i in order])), rounds_done=rounds_done,
            communication_rounds=self.communication_rounds(rounds_done),
            wall_time_s=time.time() - self.started,
        )
        if len(order) < len(self.agents):
            record["agents"] = order
        with self.condition:
            self.book.publish(record)
            self.ledger.save()  # before anyone sees it: a restarted coordinator delivers the same records
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

    @ray.method(concurrency_group="control")
    def poll(self, seen: int, timeout_s: float) -> tuple[list[dict], bool]:
        """(records after the first `seen`, whether the agents finished), waiting up to timeout_s for either."""
        with self.condition:
            if len(self.book.delivered) <= seen and self.finished is None:
                self.condition.wait(timeout=timeout_s)
            return list(self.book.delivered[seen:]), self.finished is not None

    # ------------------------------------------------------------ the end

    def gather_states(self) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        return [split_state(s) for s in ray.get([self.agents[i].get_state.remote(i) for i in self.there_at_end()])]

    def there_at_end(self) -> list[int]:
        """The live agents that are not away at the end (after a timeline's leave): what the merge averages."""
        return [i for i in self.live() if not self.plan.absent(i, self.plan.total_steps - 1)]

    @ray.method(concurrency_group="control")
    def merged_state(self) -> dict[str, np.ndarray]:
        """The exact average of the live agents' models, without sending it back (final merge off)."""
        states = self.gather_states()
        self.merged.load(global_average([p for p, _ in states]), average_buffers([b for _, b in states]))
        return {k: v.numpy() for k, v in self.merged.state_dict().items()}

    @ray.method(concurrency_group="control")
    def final_merge(self) -> dict:
        """Gather every live agent's parameters, average exactly, send the average back, re-estimate batch norm."""
        spec = self.config.schedule.final_merge
        live = self.live()

        def broadcast(params: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
            ref = ray.put({"params": params.numpy(), **{f"buffer.{k}": v.cpu().numpy() for k, v in buffers.items()}})
            ray.get([host.load_state.remote([ref]) for host in self.hosts(live)])

        def reestimate_local(batches: int) -> list[dict[str, torch.Tensor]]:
            estimates = ray.get([self.agents[i].reestimate_batchnorm.remote(i, batches) for i in self.there_at_end()])
            return [{k[len("buffer."):]: torch.from_numpy(np.array(v)) for k, v in e.items()} for e in estimates]

        accuracy = merge_all(self.merged, self.gather_states(), broadcast, reestimate_local)
        self.event("merge_done", merged_test_accuracy=accuracy, bn=spec.bn, agents=len(live))
        self.ledger.save()
        return {"merged_accuracy": accuracy, "state_dict": {k: v.numpy() for k, v in self.merged.state_dict().items()}}

    @ray.method(concurrency_group="control")
    def timeline_scheduled(self) -> dict[int, int]:
        """Wall-clock timeline events scheduled so far: index -> the round they are in force from."""
        return dict(self.plan.timeline.scheduled)

    @ray.method(concurrency_group="control")
    def get_events(self) -> list[dict]:
        with self.condition:
            return self.before["events"] + sorted(self.events, key=lambda e: e["time_s"])
