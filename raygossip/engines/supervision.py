"""The coordinator's supervision: agents (and their actors) that die or diverge are restarted, dropped or abort
the run, as runtime.on_failure and train.on_divergence say."""

from __future__ import annotations

import threading
import time

import numpy as np
import ray

from raygossip.engines.agent_actor import spawn_host
from raygossip.engines.agent_states import copied_state
from raygossip.engines.snapshots import read_snapshot


class Supervision:
    """Part of the Coordinator actor (it mixes this in): failure detection's consequences and restarts."""


    def with_actor_mates(self, failed: list[tuple[int, Exception]], finished: dict) -> list[tuple[int, Exception]]:
        """The failed agents and every agent of their actors not handled yet (one process: they died with it)."""
        seen = {i for i, _ in failed}
        out = list(failed)
        for i, error in failed:
            for j in self.actor_mates(i):
                if j not in seen and j not in finished and j not in self.dropped and j not in self.restarting:
                    seen.add(j)
                    out.append((j, error))
        return sorted(out, key=lambda pair: pair[0])

    def handle_failures(self, failed: list[tuple[int, Exception]]) -> None:
        """Agents whose actor died: record it, tell the others, then restart, drop or abort (runtime.on_failure)."""
        detected = time.time()
        ids = [i for i, _ in failed]
        policy = self.config.runtime.on_failure
        for i, error in failed:
            record = {"agent": i, "incarnation": self.incarnations[i], "error": type(error).__name__,
                      "detected_at_s": detected - self.started, "policy": policy}
            injected = self.injected.pop(i, None)  # this life's injected death (a restarted agent may die again)
            if injected is not None:
                if injected["round"] is not None:  # (the driver's chaos kills at a time, not at a round)
                    record["injected_round"] = injected["round"]
                record["detection_s"] = detected - self.started - injected["time_s"]
            self.failures.append(record)
            self.event("agent_failed", **{k: v for k, v in record.items() if k != "policy"})
        if policy == "abort":
            self.abort({"agents": ids, "reason": f"agent {ids[0]} died and runtime.on_failure is abort"})
            self.event("run_aborted", agents=ids)
            return
        others = self.live(exclude=ids)
        self.gather([host.peers_down.remote(ids) for host in self.hosts(others)])
        restart = [i for i in ids if policy == "restart" and self.restarts[i] < self.config.runtime.max_restarts]
        for i in ids:
            if i not in restart:
                self.drop(i, reason="on_failure is drop" if policy == "drop" else "max_restarts reached")
        if restart:
            self.queue_restarts(restart, detected)
        if not self.live():
            self.abort({"agents": ids, "reason": "every agent was dropped"})

    @ray.method(concurrency_group="control")
    def agent_diverged(self, agent: int, incarnation: int, step: int, what: str) -> None:
        """An agent's loss or parameters went non-finite (it stopped): drop it or abort, as train.on_divergence says."""
        if incarnation != self.incarnations[agent] or agent in self.dropped:
            return
        self.event("diverged", agent=agent, step=step, what=what, unix_s=time.time())  # (when, on the wall clock)
        reason = f"agent {agent}'s {what} became non-finite at step {step}"
        if self.config.train.on_divergence == "drop":
            self.drop(agent, reason=f"diverged ({reason})")
            if not self.live():
                self.abort({"agents": [agent], "field": "train.on_divergence", "status": "diverged",
                            "reason": f"{reason}, the last agent left"})
            return
        self.abort({"agents": [agent], "field": "train.on_divergence", "status": "diverged",
                    "reason": f"{reason} (train.on_divergence is abort)"})

    def abort(self, aborted: dict) -> None:
        """The run ends now: every other live agent is told to stop at once (its wait for a letter, a gamma or a
        checkpoint ends), so nobody waits out runtime.wait_timeout_s; wait_finished collects what they return."""
        self.aborted = aborted
        for i in self.live(exclude=aborted["agents"]):
            self.agents[i].stop.remote(i)

    def drop(self, agent: int, reason: str) -> None:
        with self.condition:
            self.dropped.add(agent)
            self.runs.pop(agent, None)
        others = self.live()
        self.gather([host.peer_dropped.remote(agent) for host in self.hosts(others)])
        self.event("agent_dropped", agent=agent, reason=reason, agents_left=len(others))
        for record in self.failures:
            if record["agent"] == agent and "action" not in record:
                record["action"] = "dropped"
        with self.condition:
            complete = self.book.complete(others)
            barriers = [step for step, arrived in self.arrivals.items() if set(arrived) >= set(others)]
        for step in complete:
            self.finish_record(step)
        for step in barriers:
            threading.Thread(target=self.write_checkpoint, args=(step,), daemon=True).start()

    def queue_restarts(self, agents: list[int], detected: float) -> None:
        """Restart these agents on the restart thread (started if none runs)."""
        with self.condition:
            self.restart_queue.extend((i, detected) for i in agents)
            self.restarting.update(agents)
            if self.restart_worker is None:
                self.restart_worker = threading.Thread(target=self.restart_loop, daemon=True)
                self.restart_worker.start()
        self.ledger.touch()

    def restart_loop(self) -> None:
        """The restart thread: restart the queued agents, a batch at a time, until none is left."""
        while True:
            with self.condition:
                if not self.restart_queue:
                    self.restart_worker = None
                    return
                batch, self.restart_queue = self.restart_queue, []
            ids = [i for i, _ in batch]
            try:
                self.restart(ids, min(t for _, t in batch))
            finally:
                with self.condition:
                    self.restarting.difference_update(ids)
                    self.condition.notify_all()

    def restart(self, ids: list[int], detected: float) -> None:
        """New actors for `ids` (one per agent group), from their latest snapshots; every live peer resends its
        public copy to them."""
        others = self.live(exclude=ids)
        frontier = [p for p in self.gather([self.agents[j].position.remote(j) for j in others]) if p is not None] or [0]
        groups: dict[int, list[int]] = {}
        for i in ids:
            groups.setdefault(self.group_of[i], []).append(i)
            self.incarnations[i] += 1
            self.restarts[i] += 1
        new = {}
        for g, members in groups.items():  # named and detached: a restarted coordinator finds them again
            name = f"{self.recipe['name']}-g{g}-i{max(self.incarnations[i] for i in members)}-c{self.deaths}"
            stale = self.host_names.get(g)
            new[g] = spawn_host(self.recipe, g, dict(enumerate(self.incarnations)), members, name=name)
            with self.condition:
                self.host_names[g] = name
            if stale is not None and stale != name:
                kill_named(stale)
        for g, members in groups.items():
            for i in members:
                self.agents[i] = new[g]
        peers = {j: self.agents[j] for j in self.live()}
        me = ray.get_runtime_context().current_actor
        with self.condition:  # peers that are dead and not yet back: the new agents must not wait for them
            down = sorted((self.restarting | {j for j, _ in self.restart_queue}) - set(ids))
        deadline = time.time() + self.config.runtime.wait_timeout_s
        connected = {g: host.connect.remote(peers, me, self.snapshot_dir, dict(enumerate(self.incarnations)),
                                            sorted(self.dropped), down)
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
                    self.event("restart_failed", agent=i, error=type(error).__name__)
                    self.drop(i, reason=f"restart failed ({type(error).__name__})")
        ids = [i for i in ids if i in restored]
        if not ids:
            return
        self.brief([new[g] for g, members in groups.items() if any(i in restored for i in members)])
        self.gather([host.peer_restarted.remote(i, self.agents[i], self.incarnations[i])
                     for host in self.hosts(others) for i in ids])
        with self.condition:
            for g, members in groups.items():
                started = [i for i in members if i in restored]
                same_step = len({restored[i] for i in started}) == 1  # lockstep needs one step (snapshots may differ)
                self.runs.update(self.launch(started, self.checkpoint_dir is not None, together=same_step))
        if self.stopping:  # a bounded/async run's quorum already finished
            self.gather([self.agents[i].stop.remote(i) for i in ids])
        recovered = time.time()
        rejoined_at = [p for p in self.gather([self.agents[j].position.remote(j) for j in others]) if p is not None] or frontier
        local = self.plan.local_steps
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
            self.event("agent_restarted", agent=i, incarnation=self.incarnations[i], **facts)

    def latest_snapshot(self, agent: int) -> tuple[tuple[dict[str, np.ndarray], dict] | None, str | None]:
        """The newer, by step, of the agent's snapshot file (it ran on this node) and the snapshot it sent (it
        ran elsewhere, or a resumed run's checkpoint), and which it was ("file" or "sent"); (None, None)
        when there is neither."""
        kept = [(self.snapshots.get(agent), "sent")]
        if self.snapshot_dir is not None:
            kept.append((read_snapshot(self.snapshot_dir[1], agent), "file"))
        kept = [(snapshot, source) for snapshot, source in kept if snapshot is not None]
        return max(kept, key=lambda pair: pair[0][1]["step"]) if kept else (None, None)

    @ray.method(concurrency_group="report")
    def keep_snapshot(self, agent: int, incarnation: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """An agent's latest state, copied (the arrays may live in memory its process owns)."""
        if incarnation == self.incarnations[agent]:
            self.snapshots[agent] = copied_state(arrays, meta)


def kill_named(name: str) -> None:
    """Kill the (detached) actor of that name if it is alive: a replacement the run no longer uses."""
    try:
        ray.kill(ray.get_actor(name))
    except ValueError:
        pass
