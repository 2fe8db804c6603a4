"""The agents' loops as the coordinator sees them: started, waited on (also after the coordinator restarted), stopped."""

from __future__ import annotations

import time
from typing import Any

import ray

from raygossip.engines.roster import Roster

LOOP_WAIT_S = 0.5  # a restarted coordinator waits on each agent's loop in slices of this (AgentActor.loop_result)


class LoopWatch:
    """One reference per live agent's loop: the result of its `run` call, or (after this coordinator restarted, which
    loses those) of a loop_result call that answers within LOOP_WAIT_S. Not thread-safe: the coordinator holds its
    lock around `runs`."""

    def __init__(self, roster: Roster, sync: bool) -> None:
        self.roster = roster
        self.sync = sync
        self.runs: dict[int, Any] = {}  # agent -> the reference of its loop's result

    def launch(self, members: list[int], checkpoints: bool, resync: bool = False, together: bool = True) -> None:
        """Start the loops of these agents of one actor: in sync mode in lockstep on one thread (together), else a
        thread each."""
        if not members:
            return
        host = self.roster.agents[members[0]]
        if together and self.sync and len(members) > 1:
            refs = host.run_together.options(num_returns=len(members)).remote(members, checkpoints, resync)
            self.runs.update(zip(members, refs))
        else:
            self.runs.update({i: host.run.remote(i, checkpoints, resync) for i in members})

    def watch(self, agent: int) -> None:
        """Wait on the agent's loop through loop_result (a restarted coordinator has lost its run call)."""
        self.runs[agent] = self.roster.agents[agent].loop_result.remote(agent, LOOP_WAIT_S)

    def collect(self, ready: list[Any], waiting: dict[Any, int]) -> tuple[dict[int, dict], list[tuple[int, Exception]]]:
        """The loops among `ready` that ended (agent -> stats) and those whose actor died (agent, error); a
        loop_result that timed out is asked again."""
        ended, failed = {}, []
        for ref in ready:
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as error:
                failed.append((waiting[ref], error))
                continue
            if result is None:
                self.watch(waiting[ref])
            else:
                ended[waiting[ref]] = result
        return ended, failed

    def positions(self, agents: list[int]) -> dict[int, int | None]:
        """Each agent's step now (None: it did not answer)."""
        roster = self.roster
        return dict(zip(agents, roster.gather([roster.agents[i].position.remote(i) for i in agents])))

    def stop(self, agents: list[int], timeout_s: float) -> dict[int, dict]:
        """Stop these agents' loops and collect the stats of those that end within timeout_s."""
        handles = self.roster.agents
        for i in agents:
            handles[i].stop.remote(i)
        out = {}
        deadline = time.time() + timeout_s
        for i in agents:
            try:
                result = ray.get(self.runs[i], timeout=max(0.1, deadline - time.time()))
                if result is None:  # a loop_result: wait on the loop itself
                    result = ray.get(handles[i].loop_result.remote(i, max(0.1, deadline - time.time())))
                if result is not None:
                    out[i] = result
            except (ray.exceptions.RayError, TimeoutError):
                pass
        return out
