"""Who is in a Ray run: each agent's actor, its incarnation and restarts, who was dropped, replacement actors' names."""

from __future__ import annotations

import time
from typing import Any

import ray


class Roster:
    """The coordinator's view of the agents (its supervision, records and checkpoints read it; supervision changes
    it). runtime.agents_per_actor agents share one actor: they live and die together."""

    def __init__(self, agents: list[Any], groups: list[list[int]], wait_timeout_s: float) -> None:
        self.agents = list(agents)  # agent -> the actor that hosts it
        self.groups = [list(members) for members in groups]
        self.group_of = {i: g for g, members in enumerate(self.groups) for i in members}
        self.wait_timeout_s = wait_timeout_s
        self.incarnations = [0] * len(self.agents)
        self.restarts = [0] * len(self.agents)
        self.dropped: set[int] = set()
        self.host_names: dict[int, str] = {}  # group -> the name of its replacement actor (named and detached)

    def live(self, exclude: set[int] | list[int] = ()) -> list[int]:
        return [i for i in range(len(self.agents)) if i not in self.dropped and i not in exclude]

    def hosts(self, agents: list[int]) -> list[Any]:
        """The actors that host these agents, each once."""
        return list({self.group_of[i]: self.agents[i] for i in agents}.values())

    def actor_mates(self, agent: int) -> list[int]:
        """The agents that share `agent`'s actor (itself included)."""
        return list(self.groups[self.group_of[agent]])

    def replace(self, group: int, members: list[int], handle: Any, name: str) -> None:
        """A new actor hosts these agents of `group`."""
        self.host_names[group] = name
        for i in members:
            self.agents[i] = handle

    def gather(self, refs: list[Any]) -> list[Any]:
        """Results of calls to agents, None for an agent that died meanwhile (its own loop's reference tells the
        coordinator, which handles it next) or that did not answer within runtime.wait_timeout_s."""
        deadline = time.time() + self.wait_timeout_s
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=max(0.1, deadline - time.time())))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append(None)
        return out

    def saved(self) -> dict:
        return {"incarnations": list(self.incarnations), "restarts": list(self.restarts),
                "dropped": sorted(self.dropped), "host_names": {str(g): name for g, name in self.host_names.items()}}

    def restore(self, saved: dict) -> None:
        """What a previous life of the coordinator saved; the replacement actors found again by name (one that
        died meanwhile keeps the old handle: its loop fails to answer and is handled as a death)."""
        self.incarnations, self.restarts = list(saved["incarnations"]), list(saved["restarts"])
        self.dropped = set(saved["dropped"])
        for group, name in sorted((int(g), name) for g, name in saved["host_names"].items()):
            self.host_names[group] = name
            try:
                handle = ray.get_actor(name)
            except ValueError:
                continue
            for i in self.groups[group]:
                self.agents[i] = handle
