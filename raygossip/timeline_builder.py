"""Timelines from Python: a builder of the list of events that the config's `timeline:` takes."""

from __future__ import annotations

from typing import Any


class Timeline:
    """Events at rounds, in the order they happen, e.g.
    `Timeline().at(round=20).slow([3], 4).at(round=60).restore([3]).build()`; every action method adds one event
    at the round of the last `at`. `build()` returns plain mappings, as YAML would give them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.round: int | None = None

    def at(self, *, round: int) -> "Timeline":  # noqa: A002 - the config's key
        """The round the next events happen at."""
        self.round = round
        return self

    def event(self, action: str, **keys: Any) -> "Timeline":
        """Any action with its keys (those left None are not set)."""
        if self.round is None:
            raise ValueError("Timeline: call at(round=R) before adding an event")
        self.events.append({"round": self.round, "action": action,
                            **{key: value for key, value in keys.items() if value is not None}})
        return self

    def slow(self, agents: list[int], factor: float) -> "Timeline":
        return self.event("slow", agents=list(agents), factor=factor)

    def restore(self, agents: list[int]) -> "Timeline":
        return self.event("restore", agents=list(agents))

    def partition(self, groups: list[list[int]]) -> "Timeline":
        return self.event("partition", groups=[list(g) for g in groups])

    def heal(self) -> "Timeline":
        return self.event("heal")

    def leave(self, agents: list[int]) -> "Timeline":
        return self.event("leave", agents=list(agents))

    def join(self, agents: list[int], start: str = "neighbour") -> "Timeline":
        """Agents that left come back from a neighbour's current model (neighbour) or the initial one (scratch)."""
        return self.event("join", agents=list(agents), start=start)

    def link(self, *, latency_s: float | None = None, bandwidth_mbps: float | None = None, loss: float | None = None,
             recovery: str | None = None, edges: list[list[int]] | None = None) -> "Timeline":
        return self.event("link", latency_s=latency_s, bandwidth_mbps=bandwidth_mbps, loss=loss, recovery=recovery,
                          edges=None if edges is None else [list(e) for e in edges])

    def topology(self, name: str, **section: Any) -> "Timeline":
        """Switch the graph: `name` and any other keys of the topology section (weights, params)."""
        return self.event("topology", topology={"name": name, **section})

    def gamma(self, value: float) -> "Timeline":
        return self.event("gamma", value=value)

    def communication(self, kind: str, **keys: Any) -> "Timeline":
        """The communication kind and its keys (p, pull, start, width, sparse_every) from this round on."""
        return self.event("communication", communication={"kind": kind, **keys})

    def kill(self, agents: list[int]) -> "Timeline":
        return self.event("kill", agents=list(agents))

    def build(self) -> list[dict[str, Any]]:
        """The events, as the config's `timeline:` list."""
        return [dict(event) for event in self.events]
