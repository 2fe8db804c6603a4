"""The coordinator's recovery of agents: agents (and their actors) that die or diverge are restarted, dropped or
abort the run, as runtime.on_failure and train.on_divergence say."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import ray

from raygossip.engines.agent_actor import spawn_host
from raygossip.engines.run_checkpoints import write_run_checkpoint
from raygossip.engines.snapshots import read_snapshot


class AgentRecovery:
    """What follows an agent's death or divergence, for the coordinator `c` it works for: the failure records, the
    restart queue and its thread, the snapshots sent by value. It changes the coordinator's roster (incarnations,
    drops, replacement actors) and starts the restarted agents' loops through the coordinator."""

    def __init__(self, c: Any, snapshot_dir: tuple[str, str] | None) -> None:
        self.c = c
        self.roster = c.roster
        self.snapshot_dir = snapshot_dir  # (node, directory) where the agents on that node write snapshot files
        self.failures: list[dict] = []
        self.injected: dict[int, dict] = {}  # agent -> its current life's injected death, until detected
        self.snapshots: dict[int, tuple[dict[str, np.ndarray], dict]] = {}  # sent by value (see latest_snapshot)
        self.restart_queue: list[tuple[int, float]] = []  # (agent, when its death was detected)
        self.restarting: set[int] = set()
        self.restart_worker: threading.Thread | None = None

    def pending(self) -> list[int]:
        """Agents dead and not yet back (being restarted or queued)."""
        return sorted(self.restarting | {i for i, _ in self.restart_queue})

    def saved(self) -> dict:
        return {"failures": self.failures, "injected": {str(k): v for k, v in self.injected.items()},
                "restarting": self.pending()}

    def restore(self, saved: dict) -> list[int]:
        """A restarted coordinator: the failure records back; returns the agents whose restart its death cut short."""
        self.failures = saved["failures"]
        self.injected = {int(k): v for k, v in saved["injected"].items()}
        return [i for i in saved["restarting"] if i not in self.c.roster.dropped]


    def with_actor_mates(self, failed: list[tuple[int, Exception]], finished: dict) -> list[tuple[int, Exception]]:
        """The failed agents and every agent of their actors not handled yet (one process: they died with it)."""
        seen = {i for i, _ in failed}
        out = list(failed)
        for i, error in failed:
            for j in self.roster.actor_mates(i):
                if j not in seen and j not in finished and j not in self.roster.dropped and j not in self.restarting:
                    seen.add(j)
                    out.append((j, error))
        return sorted(out, key=lambda pair: pair[0])

    def handle_failures(self, failed: list[tuple[int, Exception]]) -> None:
        """Agents whose actor died: record it, tell the others, then restart, drop or abort (runtime.on_failure)."""
        detected = time.time()
        ids = [i for i, _ in failed]
        policy = self.c.config.runtime.on_failure
        injected = {i: self.injected.pop(i) for i in ids if i in self.injected}  # this life's injected deaths
        killed_at = {self.roster.group_of[i]: e["time_s"] for i, e in injected.items()}  # (mates die with them)
        for i, error in failed:
            record = {"agent": i, "incarnation": self.roster.incarnations[i], "error": type(error).__name__,
                      "detected_at_s": detected - self.c.started, "policy": policy}
            if i in injected and injected[i]["round"] is not None:  # (the driver's chaos kills at a time)
                record["injected_round"] = injected[i]["round"]
            if self.roster.group_of[i] in killed_at:
                record["detection_s"] = detected - self.c.started - killed_at[self.roster.group_of[i]]
            self.failures.append(record)
            self.c.event("agent_failed", **{k: v for k, v in record.items() if k != "policy"})
        if policy == "abort":
            self.c.abort({"agents": ids, "reason": f"agent {ids[0]} died and runtime.on_failure is abort"})
            self.c.event("run_aborted", agents=ids)
            return
        others = self.roster.live(exclude=ids)
        self.roster.gather([host.peers_down.remote(ids) for host in self.roster.hosts(others)])
        restart = [i for i in ids if policy == "restart" and self.roster.restarts[i] < self.c.config.runtime.max_restarts]
        for i in ids:
            if i not in restart:
                self.drop(i, reason="on_failure is drop" if policy == "drop" else "max_restarts reached")
        if restart:
            self.queue_restarts(restart, detected)
        if not self.roster.live():
            self.c.abort({"agents": ids, "reason": "every agent was dropped"})

    def drop(self, agent: int, reason: str) -> None:
        with self.c.condition:
            self.roster.dropped.add(agent)
            self.c.loops.runs.pop(agent, None)
        others = self.roster.live()
        self.roster.gather([host.peer_dropped.remote(agent) for host in self.roster.hosts(others)])
        self.c.event("agent_dropped", agent=agent, reason=reason, agents_left=len(others))
        for record in self.failures:
            if record["agent"] == agent and "action" not in record:
                record["action"] = "dropped"
        with self.c.condition:
            complete = self.c.records.book.complete(others)
            barriers = self.c.checkpoints.complete(others)
        for step in complete:
            self.c.records.finish(step)
        for step in barriers:
            threading.Thread(target=write_run_checkpoint, args=(self.c, step), daemon=True).start()

    def drop_lost_after_finish(self) -> list[int]:
        """Before the final merge: the live agents whose process died after their loop had finished (a chaos death
        of the actor, or of an actor mate, after the loop's end) took their model with them, so they leave the merge,
        each with a failure record (action lost_after_finish). Returns them."""
        by_actor: dict[Any, list[int]] = {}  # one call per actor (its agents live or die with it)
        for i in self.roster.live():
            by_actor.setdefault(self.roster.agents[i], []).append(i)
        refs = {handle: handle.position.remote(agents[0]) for handle, agents in by_actor.items()}
        lost = []
        for handle, ref in refs.items():
            try:
                ray.get(ref, timeout=self.c.config.runtime.wait_timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError) as error:
                lost.extend((i, error) for i in by_actor[handle])
        for i, error in lost:
            with self.c.condition:
                self.roster.dropped.add(i)
                self.c.loops.runs.pop(i, None)
            record = {"agent": i, "incarnation": self.roster.incarnations[i], "error": type(error).__name__,
                      "detected_at_s": time.time() - self.c.started, "policy": self.c.config.runtime.on_failure,
                      "action": "lost_after_finish"}
            self.failures.append(record)
            self.c.event("agent_lost_after_finish", agent=i, error=record["error"])
        others = self.roster.live()
        for i, _ in lost:  # (the survivors' rule state forgets it, as after any drop)
            self.roster.gather([host.peer_dropped.remote(i) for host in self.roster.hosts(others)])
        return [i for i, _ in lost]

    def queue_restarts(self, agents: list[int], detected: float) -> None:
        """Restart these agents on the restart thread (started if none runs)."""
        with self.c.condition:
            self.restart_queue.extend((i, detected) for i in agents)
            self.restarting.update(agents)
            if self.restart_worker is None:
                self.restart_worker = threading.Thread(target=self.restart_loop, daemon=True)
                self.restart_worker.start()
        self.c.ledger.touch()

    def restart_loop(self) -> None:
        """The restart thread: restart the queued agents, a batch at a time, until none is left."""
        while True:
            with self.c.condition:
                if not self.restart_queue:
                    self.restart_worker = None
                    return
                batch, self.restart_queue = self.restart_queue, []
            ids = [i for i, _ in batch]
            try:
                self.restart(ids, min(t for _, t in batch))
            finally:
                with self.c.condition:
                    self.restarting.difference_update(ids)
                    self.c.condition.notify_all()

    def restart(self, ids: list[int], detected: float) -> None:
        """New actors for `ids` (one per agent group), from their latest snapshots; every live peer resends its
        public copy to them."""
        roster = self.roster
        others = roster.live(exclude=ids)
        frontier = [p for p in roster.gather([roster.agents[j].position.remote(j) for j in others]) if p is not None] or [0]
        groups: dict[int, list[int]] = {}
        for i in ids:
            groups.setdefault(roster.group_of[i], []).append(i)
            roster.incarnations[i] += 1
            roster.restarts[i] += 1
        new = {}
        for g, members in groups.items():  # named and detached: a restarted coordinator finds them again
            name = f"{self.c.recipe['name']}-g{g}-i{max(roster.incarnations[i] for i in members)}-c{self.c.deaths}"
            stale = roster.host_names.get(g)
            new[g] = spawn_host(self.c.recipe, g, dict(enumerate(roster.incarnations)), members, name=name)
            with self.c.condition:
                roster.replace(g, members, new[g], name)
            if stale is not None and stale != name:
                kill_named(stale)
        peers = {j: roster.agents[j] for j in roster.live()}
        me = ray.get_runtime_context().current_actor
        with self.c.condition:  # peers that are dead and not yet back: the new agents must not wait for them
            down = sorted(set(self.pending()) - set(ids))
        deadline = time.time() + self.c.config.runtime.wait_timeout_s
        connected = {g: host.connect.remote(peers, me, self.snapshot_dir, dict(enumerate(self.roster.incarnations)),
                                            sorted(self.roster.dropped), down)
                     for g, host in new.items()}
        placed, restored, sources = {}, {}, {}
        for g, members in groups.items():  # a new actor that fails to start is dropped; the others go on
            try:
                for info in ray.get(connected[g], timeout=max(0.1, deadline - time.time())):
                    placed[info["agent"]] = info
                for i in members:
                    snapshot, sources[i] = self.latest_snapshot(i)
                    restored[i] = ray.get(new[g].restore_snapshot.remote(i, snapshot),
                                          timeout=max(0.1, deadline - time.time())) if snapshot is not None else 0
            except (ray.exceptions.RayError, TimeoutError) as error:
                ray.kill(new[g])
                for i in members:
                    restored.pop(i, None)
                    self.c.event("restart_failed", agent=i, error=type(error).__name__)
                    self.drop(i, reason=f"restart failed ({type(error).__name__})")
        ids = [i for i in ids if i in restored]
        if not ids:
            return
        self.c.brief([new[g] for g, members in groups.items() if any(i in restored for i in members)])
        self.roster.gather([host.peer_restarted.remote(i, self.roster.agents[i], self.roster.incarnations[i])
                     for host in self.roster.hosts(others) for i in ids])
        with self.c.condition:
            for g, members in groups.items():
                started = [i for i in members if i in restored]
                same_step = len({restored[i] for i in started}) == 1  # lockstep needs one step (snapshots may differ)
                self.c.loops.launch(started, self.c.checkpoints.directory is not None, together=same_step)
        if self.c.stopping:  # a bounded/async run's quorum already finished
            self.roster.gather([self.roster.agents[i].stop.remote(i) for i in ids])
        recovered = time.time()
        rejoined_at = [p for p in self.roster.gather([self.roster.agents[j].position.remote(j) for j in others]) if p is not None] or frontier
        local = self.c.plan.local_steps
        failed_at = {r["agent"]: r["injected_round"] for r in self.failures if "injected_round" in r and "action" not in r}
        for i in ids:
            info = placed[i]
            restored_round = restored[i] // local
            died_round = failed_at.get(i, int(np.median(frontier)) // local)  # injected, else the others' round
            facts = {"restored_step": restored[i], "snapshot": sources[i],
                     "rounds_lost": max(0, died_round - restored_round),
                     "rounds_behind": max(0, int(np.median(rejoined_at)) // local - restored_round),
                     "recovery_s": recovered - detected, "node": info["node"]}
            for record in self.failures:
                if record["agent"] == i and "action" not in record:
                    record.update(action="restarted", **facts)
            self.c.event("agent_restarted", agent=i, incarnation=self.roster.incarnations[i], **facts)

    def latest_snapshot(self, agent: int) -> tuple[tuple[dict[str, np.ndarray], dict] | None, str | None]:
        """The newer, by step, of the agent's snapshot file (it ran on this node) and the snapshot it sent (it
        ran elsewhere, or a resumed run's checkpoint), and which it was ("file" or "sent"); (None, None)
        when there is neither."""
        kept = [(self.snapshots.get(agent), "sent")]
        if self.snapshot_dir is not None:
            kept.append((read_snapshot(self.snapshot_dir[1], agent), "file"))
        kept = [(snapshot, source) for snapshot, source in kept if snapshot is not None]
        return max(kept, key=lambda pair: pair[0][1]["step"]) if kept else (None, None)


def kill_named(name: str) -> None:
    """Kill the (detached) actor of that name if it is alive: a replacement the run no longer uses."""
    try:
        ray.kill(ray.get_actor(name))
    except ValueError:
        pass
