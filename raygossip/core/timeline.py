"""A run's timeline compiled: the conditions in force at every round (slowdowns, links, partition, graph, gamma)."""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..algorithms.consensus import sends_whole_models
from ..config import CommunicationKindConfig, Config, TimelineEventConfig, TopologyConfig
from ..errors import UserError
from .timing import slowdown_factors


@dataclass(frozen=True)
class LinkState:
    """One directed link's simulated conditions: latency, bandwidth (None: unlimited), loss rate, and what a receiver
    with public copies does after a lost message (consensus.RECOVERIES: resync asks the sender for its whole copy)."""

    latency_s: float = 0.0
    bandwidth_mbps: float | None = None
    loss: float = 0.0
    recovery: str = "resync"

    def delay(self, nbytes: int) -> float:
        """Seconds a message of `nbytes` spends on this link: latency + bytes / bandwidth."""
        seconds = self.latency_s
        if self.bandwidth_mbps is not None:
            seconds += nbytes * 8 / (self.bandwidth_mbps * 1e6)
        return seconds


@dataclass(frozen=True)
class Conditions:
    """What is in force from one round on. topology, gamma, communication: None keeps the config's."""

    factors: tuple[float, ...]
    link: LinkState
    links: tuple[tuple[tuple[int, int], LinkState], ...] = ()  # per directed link, overriding `link`
    groups: tuple[tuple[int, ...], ...] | None = None  # a partition in force: no link between groups
    absent: frozenset[int] = frozenset()  # agents that left
    topology: TopologyConfig | None = None
    gamma: float | None = None
    communication: CommunicationKindConfig | None = None

    def link_of(self, sender: int, receiver: int) -> LinkState:
        return dict(self.links).get((sender, receiver), self.link)

    def cut(self, i: int, j: int) -> bool:
        """Whether the partition in force separates agents i and j."""
        if self.groups is None:
            return False
        return group_index(self.groups, i) != group_index(self.groups, j)


def group_index(groups: tuple[tuple[int, ...], ...], agent: int) -> int:
    """The group an agent is in; agents in no listed group form one more group together."""
    for k, members in enumerate(groups):
        if agent in members:
            return k
    return len(groups)


def cut_mixing(mixing: np.ndarray, groups: tuple[tuple[int, ...], ...] | None) -> np.ndarray:
    """W with every link between groups removed, its weight added to the receiver's self weight (rows stay
    stochastic). A fresh array; W itself when there is no partition."""
    if groups is None:
        return mixing
    n = mixing.shape[0]
    where = np.array([group_index(groups, i) for i in range(n)])
    cross = where[:, None] != where[None, :]
    out = np.where(cross, 0.0, mixing)
    out[np.arange(n), np.arange(n)] += np.where(cross, mixing, 0.0).sum(axis=1)
    return out


def remove_absent(mixing: np.ndarray, absent: frozenset[int]) -> np.ndarray:
    """W without the agents that left: every weight on them goes to the receiver's self weight, and theirs is 1 on
    themselves alone (rows stay stochastic). A fresh array; W itself when nobody is away."""
    if not absent:
        return mixing
    n = mixing.shape[0]
    away = np.zeros(n, dtype=bool)
    away[list(absent)] = True
    off = ~np.eye(n, dtype=bool) & (away[:, None] | away[None, :])
    out = np.where(off, 0.0, mixing)
    out[np.arange(n), np.arange(n)] += np.where(off, mixing, 0.0).sum(axis=1)
    return out


def pick_sponsor(mixing: np.ndarray, present: frozenset[int], agent: int) -> int | None:
    """Whose model a joining agent starts from: its lowest-numbered in-neighbour that is there, else the
    lowest-numbered agent that is there (None when nobody is)."""
    neighbours = [j for j in sorted(present) if j != agent and mixing[agent, j] > 0]
    others = [j for j in sorted(present) if j != agent]
    return (neighbours or others or [None])[0]


JOIN_STARTS = ("neighbour", "scratch")
"""What a joining agent starts from: a neighbour's current model, or the initial model (as at round 0)."""


# ---------------------------------------------------------------- the actions


@dataclass(frozen=True)
class Action:
    """One timeline action: the event keys it takes (and needs), how it changes the conditions, and
    whether it changes the graph (CHOCO/AdaGossip then re-weight, drop or open links: core.graph_links)."""

    keys: tuple[str, ...]
    required: tuple[str, ...]
    apply: Callable[[Conditions, TimelineEventConfig, "Base", str], Conditions]
    doc: str
    changes_graph: bool = False


@dataclass(frozen=True)
class Base:
    """The config's own conditions, which `restore` and `heal` return to."""

    n: int
    factors: tuple[float, ...]
    link: LinkState
    rule: str


def _agents(event: TimelineEventConfig, base: Base, where: str) -> list[int]:
    agents = list(event.agents or [])
    _require(bool(agents), f"{where}.agents", "must list at least one agent")
    for k, agent in enumerate(agents):
        _require(0 <= agent < base.n, f"{where}.agents[{k}]", f"must be an agent index in 0..{base.n - 1}, got {agent}")
    _require(len(set(agents)) == len(agents), f"{where}.agents", f"lists an agent twice: {agents}")
    return agents


def _slow(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    _require(e.factor >= 1, f"{where}.factor", f"must be >= 1 (a compute slowdown), got {e.factor}")
    factors = list(c.factors)
    for agent in _agents(e, base, where):
        factors[agent] = float(e.factor)
    return replace(c, factors=tuple(factors))


def _restore(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    factors = list(c.factors)
    for agent in _agents(e, base, where):
        factors[agent] = base.factors[agent]
    return replace(c, factors=tuple(factors))


def _partition(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    groups = [list(g) for g in e.groups]
    _require(len(groups) >= 1 and all(groups), f"{where}.groups", "must list non-empty groups of agents")
    seen: list[int] = []
    for k, members in enumerate(groups):
        for m, agent in enumerate(members):
            _require(0 <= agent < base.n, f"{where}.groups[{k}][{m}]",
                     f"must be an agent index in 0..{base.n - 1}, got {agent}")
            _require(agent not in seen, f"{where}.groups[{k}][{m}]", f"agent {agent} is in two groups")
            seen.append(agent)
    _require(len(groups) >= 2 or len(seen) < base.n, f"{where}.groups",
             "one group of every agent splits nothing; list two groups or more")
    return replace(c, groups=tuple(tuple(sorted(g)) for g in groups))


def _heal(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    _require(c.groups is not None, f"{where}.action", "heal with no partition in force")
    return replace(c, groups=None)


def _link(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    changes = {key: getattr(e, key) for key in ("latency_s", "bandwidth_mbps", "loss", "recovery")
               if getattr(e, key) is not None}
    _require(bool(changes), f"{where}.action", "link needs at least one of latency_s, bandwidth_mbps, loss, recovery")
    _require(changes.get("latency_s", 0.0) >= 0, f"{where}.latency_s", f"must be >= 0, got {e.latency_s}")
    _require(changes.get("bandwidth_mbps", 1.0) > 0, f"{where}.bandwidth_mbps", f"must be > 0, got {e.bandwidth_mbps}")
    _require(0 <= changes.get("loss", 0.0) < 1, f"{where}.loss", f"must be in [0, 1), got {e.loss}")
    if e.edges is None:  # every link, including those set one by one before
        return replace(c, link=replace(c.link, **changes),
                       links=tuple((pair, replace(state, **changes)) for pair, state in c.links))
    links = dict(c.links)
    _require(bool(e.edges), f"{where}.edges", "must list at least one edge [i, j] (or leave it out: every link)")
    for k, edge in enumerate(e.edges):
        _require(len(edge) == 2 and edge[0] != edge[1], f"{where}.edges[{k}]",
                 f"must be a pair [i, j] of two different agents, got {edge}")
        for agent in edge:
            _require(0 <= agent < base.n, f"{where}.edges[{k}]", f"must hold agent indices in 0..{base.n - 1}, got {edge}")
        i, j = edge
        for pair in ((i, j), (j, i)):  # an edge is both directions of the link
            links[pair] = replace(links.get(pair, c.link), **changes)
    return replace(c, links=tuple(sorted(links.items())))


def _topology(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    from ..algorithms.topology import build_topology

    spec = e.topology
    try:
        topology = build_topology(spec.name, base.n, spec.weights, spec.params)
    except UserError as error:
        field = error.field if error.field.startswith("topology.") else "topology.name"  # (agents.count: its size)
        raise UserError(f"{where}.{field}", error.message) from None
    _require(not topology.time_varying or sends_whole_models(base.rule), f"{where}.topology.name",
             f"{spec.name!r} changes every round; {base.rule} needs a static graph")
    return replace(c, topology=spec)


def _gamma(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    _require(0 < e.value <= 1, f"{where}.value", f"must be an averaging rate in (0, 1], got {e.value}")
    return replace(c, gamma=float(e.value))


def _communication(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    spec = e.communication  # its keys' values and ranges: the loader and validation.py
    _require(spec.kind != "allreduce" or sends_whole_models(base.rule), f"{where}.communication.kind",
             f"allreduce averages full models; {base.rule} sends compressed differences (use gossip.rule: dpsgd)")
    return replace(c, communication=spec)


def _leave(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    agents = _agents(e, base, where)
    for k, agent in enumerate(agents):
        _require(agent not in c.absent, f"{where}.agents[{k}]", f"agent {agent} has already left")
    _require(len(c.absent | set(agents)) < base.n, f"{where}.agents", "at least one agent must stay")
    return replace(c, absent=c.absent | frozenset(agents))


def _join(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    agents = _agents(e, base, where)
    for k, agent in enumerate(agents):
        _require(agent in c.absent, f"{where}.agents[{k}]",
                 f"agent {agent} is there already (a new agent first leaves at round 0)")
    _require(e.start is None or e.start in JOIN_STARTS, f"{where}.start",
             f"must be one of {', '.join(JOIN_STARTS)}; got {e.start!r}")
    return replace(c, absent=c.absent - frozenset(agents))


def _kill(c: Conditions, e: TimelineEventConfig, base: Base, where: str) -> Conditions:
    _agents(e, base, where)
    return c


ACTIONS: dict[str, Action] = {
    "slow": Action(("agents", "factor"), ("agents", "factor"), _slow,
                   "multiply these agents' simulated step time by factor (Ray engine)"),
    "restore": Action(("agents",), ("agents",), _restore, "these agents' step time back to the config's"),
    "partition": Action(("groups",), ("groups",), _partition,
                        "no link between the groups (agents in none form one more)", changes_graph=True),
    "heal": Action((), (), _heal, "end the partition", changes_graph=True),
    "link": Action(("latency_s", "bandwidth_mbps", "loss", "recovery", "edges"), (), _link,
                   "latency, bandwidth, loss (and the recovery after a loss) of every link or of the listed edges "
                   "(Ray engine)"),
    "topology": Action(("topology",), ("topology",), _topology, "switch the graph", changes_graph=True),
    "gamma": Action(("value",), ("value",), _gamma, "the averaging rate from this round on"),
    "communication": Action(("communication",), ("communication",), _communication,
                            "the communication kind from this round on"),
    "leave": Action(("agents",), ("agents",), _leave, "these agents go away: no steps, no messages, out of the "
                    "records; their neighbours' weights on them go to their self weights", changes_graph=True),
    "join": Action(("agents", "start"), ("agents",), _join, "agents that left come back, from a neighbour's current "
                   "model (start: neighbour, the default) or from the initial model (start: scratch)",
                   changes_graph=True),
    "kill": Action(("agents",), ("agents",), _kill, "these agents' processes exit, as faults.kill (Ray engine)"),
}
"""Every timeline action by name: the config's allowed values come from here."""

EVENT_KEYS = tuple(f.name for f in dataclasses.fields(TimelineEventConfig) if f.name not in ("round", "time_s", "action"))


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise UserError(where, message)


# ---------------------------------------------------------------- compiling


def base_conditions(config: Config) -> Base:
    timing, n = config.runtime.timing, config.agents.count
    factors = tuple(slowdown_factors(timing, n, config.seed)) if len(timing.slowdown or [1.0] * n) == n else (1.0,) * n
    return Base(n, factors, LinkState(timing.latency_s, timing.bandwidth_mbps, 0.0), config.gossip.rule)


def check_event(event: TimelineEventConfig, where: str, rule: str) -> Action:
    """The event's action, after checking its keys (one UserError naming the first wrong one)."""
    action = ACTIONS.get(event.action)
    _require(action is not None, f"{where}.action",
             f"unknown action {event.action!r} (allowed: {', '.join(ACTIONS)})")
    for key in EVENT_KEYS:
        given = getattr(event, key) is not None
        _require(not given or key in action.keys, f"{where}.{key}",
                 f"action {event.action} does not take {key} (it takes: {', '.join(action.keys) or 'no keys'})")
        _require(given or key not in action.required, f"{where}.{key}", f"action {event.action} needs {key}")
    _require((event.round is None) != (event.time_s is None), f"{where}.round",
             "give exactly one of round (a communication round) and time_s (seconds of wall-clock time)")
    _require(event.round is None or event.round >= 0, f"{where}.round", f"must be >= 0, got {event.round}")
    _require(event.time_s is None or event.time_s >= 0, f"{where}.time_s", f"must be >= 0 seconds, got {event.time_s}")
    return action


def changes_graph(events: list[TimelineEventConfig]) -> bool:
    """Whether some event changes the graph: CHOCO/AdaGossip agents then keep each neighbour's public copy, so that
    every change re-weights, drops or (by a link letter) opens the links it touches (core.graph_links)."""
    return any(event.action in ACTIONS and ACTIONS[event.action].changes_graph for event in events)


class CompiledTimeline:
    """The conditions in force at every round: one segment per round at which some event happens. Pure.

    Round events are in force from their round. A wall-clock event (time_s) is in force only once it is
    scheduled at a round (`scheduled`: event index -> round; the Ray engine's coordinator picks the round when its
    time comes); while compiling without schedule, the wall-clock events are checked as if they came after every
    round event, in the order of their times."""

    def __init__(self, events: list[TimelineEventConfig], base: Base, scheduled: dict[int, int] | None = None,
                 generation: int = 0) -> None:
        self.events = list(events)
        self.base = base
        self.scheduled = dict(scheduled or {})
        self.generation = generation  # RunPlan counts recompilations: memos of an older timeline are never read
        actions = [check_event(event, f"timeline[{k}]", base.rule) for k, event in enumerate(self.events)]
        self._check_order("round")
        self._check_order("time_s")
        self.effective = sorted((self.round_of(k), k) for k in range(len(self.events)) if self.round_of(k) is not None)
        conditions = Conditions(factors=base.factors, link=base.link)
        self.starts: list[int] = [0]
        self.segments: list[Conditions] = [conditions]
        for round_index, k in self.effective:
            conditions = actions[k].apply(conditions, self.events[k], base, f"timeline[{k}]")
            if self.starts[-1] == round_index:
                self.segments[-1] = conditions
            else:
                self.starts.append(round_index)
                self.segments.append(conditions)
        timed = sorted((e.time_s, k) for k, e in enumerate(self.events) if e.time_s is not None and k not in self.scheduled)
        trial = conditions
        for _, k in timed:  # (only to check them now: they are not in force)
            trial = actions[k].apply(trial, self.events[k], base, f"timeline[{k}]")
        self.rounds = frozenset(round_index for round_index, _ in self.effective)
        self.slowed = frozenset(i for i in range(base.n) if any(c.factors[i] != 1.0 for c in self.segments))
        self.has_links = any(self.events[k].action == "link" for _, k in self.effective)
        self.has_leaves = any(self.events[k].action == "leave" for _, k in self.effective)
        self.changes_graph = changes_graph(self.events)  # (wall-clock events too: they may be scheduled later)

    def _check_order(self, key: str) -> None:
        previous, where = None, None
        for k, event in enumerate(self.events):
            value = getattr(event, key)
            if value is None:
                continue
            _require(previous is None or value >= previous, f"timeline[{k}].{key}",
                     f"must not come before the previous event's {key} {previous} (timeline[{where}]), got {value}")
            previous, where = value, k

    def round_of(self, index: int) -> int | None:
        """The round event `index` is in force from (None: a wall-clock event not scheduled yet)."""
        event = self.events[index]
        return event.round if event.round is not None else self.scheduled.get(index)

    def segment(self, round_index: int) -> int:
        """The index of the segment in force at this round."""
        return bisect.bisect_right(self.starts, round_index) - 1

    def at(self, round_index: int) -> Conditions:
        return self.segments[self.segment(round_index)]

    def events_at(self, round_index: int) -> list[tuple[int, TimelineEventConfig]]:
        """(index, event) of the events that take effect at this round."""
        if round_index not in self.rounds:
            return []
        return [(k, self.events[k]) for r, k in self.effective if r == round_index]

    def reporter(self, event: TimelineEventConfig) -> int:
        """The agent that records this event on the Ray engine: the first it names, else agent 0."""
        return min(event.agents) if event.agents else 0

    def factor(self, agent: int, step: int, local_steps: int) -> float:
        """The slowdown factor of local step `step` (it belongs to round step // local_steps)."""
        return self.at(step // local_steps).factors[agent]

    def slows(self, agent: int) -> bool:
        """Whether this agent's factor ever differs from 1."""
        return agent in self.slowed

    def kills(self) -> dict[int, int]:
        """agent -> the round its first `kill` event in force names."""
        out: dict[int, int] = {}
        for round_index, k in self.effective:
            if self.events[k].action == "kill":
                for agent in self.events[k].agents:
                    out.setdefault(agent, round_index)
        return out

    def check_rounds(self, total_rounds: int) -> None:
        """Every round event falls inside the run (UserError naming the first past its end)."""
        for k, event in enumerate(self.events):
            _require(event.round is None or event.round < total_rounds, f"timeline[{k}].round",
                     f"must be below the run's {total_rounds} rounds, got {event.round}")

    @property
    def timed(self) -> list[tuple[float, int]]:
        """(time_s, index) of the wall-clock events, in time order."""
        return sorted((e.time_s, k) for k, e in enumerate(self.events) if e.time_s is not None)

    def schedule(self, index: int, round_index: int) -> "CompiledTimeline":
        """This timeline with wall-clock event `index` in force from `round_index` (UserError if it cannot be)."""
        return CompiledTimeline(self.events, self.base, {**self.scheduled, index: round_index}, self.generation + 1)


def schedule_round(steps: list[int], elapsed_s: float, local_steps: int, lead_s: float = 0.5) -> int:
    """The round a wall-clock event is scheduled at: past the farthest agent's round by what the agents go through
    in `lead_s` seconds at their pace so far (at least 2), so that no agent is there before it is told."""
    farthest = max(steps) // local_steps
    pace = farthest / elapsed_s if elapsed_s > 0 else 0.0
    return farthest + max(2, math.ceil(pace * lead_s))


def compile_timeline(config: Config) -> CompiledTimeline:
    """The config's timeline compiled (UserError naming the first wrong event)."""
    return CompiledTimeline(config.timeline, base_conditions(config))


def timeline_record(index: int, event: TimelineEventConfig, round_index: int, step: int) -> dict:
    """The summary.json event of a timeline event that took effect at `step` (the first local step of its round);
    a wall-clock event also says the time it was due at (scheduled_time_s)."""
    keys = {k: getattr(event, k) for k in EVENT_KEYS if getattr(event, k) is not None}
    for key in ("topology", "communication"):
        if key in keys:
            keys[key] = dataclasses.asdict(keys[key])
    if event.time_s is not None:
        keys["scheduled_time_s"] = event.time_s
    return {"kind": "timeline", "index": index, "round": round_index, "step": step, "action": event.action, **keys}


def lost_on_link(loss: float, seed: int, sender: int, receiver: int, round_index: int, incarnation: int = 0) -> bool:
    """Whether the timeline's loss rate drops this round's message on this link (seeded, the same every run)."""
    if loss <= 0:
        return False
    return bool(np.random.default_rng([seed, sender, receiver, round_index, incarnation, 0x1055]).random() < loss)

