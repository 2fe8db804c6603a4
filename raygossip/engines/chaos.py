"""The driver's chaos (faults.chaos): at seeded exponential times it kills agent actors, a node's actors or the
coordinator, for the whole run (round-rate agent deaths are core.faults.death_rounds', inside the agents)."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import ray

from raygossip.config import Config
from raygossip.core.faults import chaos_times

CALL_TIMEOUT_S = 30.0  # a call to the coordinator while it restarts


def kill_times(rng: np.random.Generator, every_s: float | None, at_s: list[float], start: float,
               stop: float | None, limit: int | None) -> list[float]:
    """Seconds of the run at which to kill: exponential gaps of mean every_s from `start` (until `stop`, at most
    `limit`), and the listed times; sorted. Without a stop only the first 10,000 gaps are drawn."""
    times = [t for t in at_s if t >= start and (stop is None or t < stop)]
    if every_s is not None:
        at, drawn = float(start), []
        while len(drawn) < (limit or 10_000):
            at += float(rng.exponential(every_s))
            if stop is not None and at >= stop:
                break
            drawn.append(at)
        times += drawn
    return sorted(times)


class ChaosDriver:
    """A thread of the driver: kills at the times kill_times gives (agents: every_s; the coordinator:
    coordinator_every_s and coordinator_at_s). An agent kill is announced to the coordinator first (a
    fault_injected event, so its failure record has a detection time), then the actor dies by ray.kill."""

    def __init__(self, config: Config, coordinator: Any, placement: list[dict]) -> None:
        chaos = config.faults.chaos
        self.chaos = chaos
        self.coordinator = coordinator
        self.node_of = {p["agent"]: p["node"] for p in placement}  # (a restarted actor keeps its bundle's node)
        agents_rng, coordinator_rng = chaos_times(chaos, config.seed)
        self.pick = np.random.default_rng([config.seed, 0xC4A05, 3])
        plan = [(t, "agents") for t in kill_times(agents_rng, chaos.every_s, [], chaos.start, chaos.stop,
                                                   chaos.max_deaths)]
        plan += [(t, "coordinator") for t in kill_times(coordinator_rng, chaos.coordinator_every_s,
                                                         chaos.coordinator_at_s, chaos.start, chaos.stop, None)]
        self.plan = sorted(plan)
        self.kills: list[dict] = []  # what was killed, when (seconds since start)
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.began = 0.0

    def start(self) -> None:
        if self.plan:
            self.began = time.time()
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def stop(self) -> list[dict]:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=CALL_TIMEOUT_S)
        return self.kills

    def _run(self) -> None:
        for at, what in self.plan:
            if self.stopped.wait(max(0.0, self.began + at - time.time())):
                return
            try:
                if what == "coordinator":
                    ray.kill(self.coordinator, no_restart=False)  # Ray restarts it; it goes on from its ledger
                    self.kills.append({"time_s": time.time() - self.began, "target": "coordinator"})
                else:
                    self._kill_agents()
            except (ray.exceptions.RayError, TimeoutError, ValueError):
                continue  # (the run is ending, or the coordinator is still restarting)

    def _kill_agents(self) -> None:
        live: dict[int, Any] = ray.get(self.coordinator.live_agents.remote(), timeout=CALL_TIMEOUT_S)
        if not live:
            return
        ids = sorted(live)
        target = self.chaos.target
        if target == "agent":
            chosen = [ids[int(self.pick.integers(len(ids)))]]
        elif target == "actor":
            hosts: dict[str, list[int]] = {}
            for i in ids:
                hosts.setdefault(live[i]._actor_id.hex(), []).append(i)
            chosen = list(hosts.values())[int(self.pick.integers(len(hosts)))][:1]
        else:
            nodes = sorted({self.node_of[i] for i in ids})
            node = nodes[int(self.pick.integers(len(nodes)))]
            chosen = [i for i in ids if self.node_of[i] == node]
        now = time.time()
        ray.get(self.coordinator.record_events.remote(
            [{"kind": "fault_injected", "agent": i, "round": None, "by": f"chaos {target}", "time": now}
             for i in chosen]), timeout=CALL_TIMEOUT_S)
        for handle in {live[i]._actor_id.hex(): live[i] for i in chosen}.values():
            ray.kill(handle, no_restart=True)
        self.kills.append({"time_s": now - self.began, "target": target, "agents": chosen})
