"""The run's clock: steps, epochs, rounds, gamma and message plans, the same answer on every agent."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..algorithms.schedules import (
    AVERAGING_RATES,
    RoundPlan,
    Schedule,
    active_agents,
    allreduce_plan,
    phase_index,
    plan_round,
    round_communicates,
)
from ..algorithms.consensus import sends_whole_models
from ..algorithms.topology import Topology, build_topology
from ..config import CommunicationKindConfig, Config
from .timeline import CompiledTimeline, Conditions, compile_timeline, cut_mixing, pick_sponsor, remove_absent


def averaging_rate(config: Config) -> Schedule:
    """The averaging-rate schedule (by epoch) the config asks for."""
    spec = config.schedule.averaging_rate
    gamma0 = spec.gamma0 if spec.gamma0 is not None else config.gossip.gamma
    if spec.kind in ("constant", "adaptive"):  # adaptive: gamma0 until the coordinator sets gamma (set_gamma)
        return AVERAGING_RATES["constant"](gamma0)
    if spec.kind == "ars":
        return AVERAGING_RATES["ars"](gamma0, spec.growth)
    if spec.kind in ("linear", "cosine"):
        return AVERAGING_RATES[spec.kind](gamma0, spec.ramp_epochs or config.train.epochs)
    return AVERAGING_RATES["step"](gamma0, spec.milestones, spec.factor)


@dataclass(frozen=True)
class RunPlan:
    """Pure bookkeeping of when things happen; every agent and engine derives the same plan."""

    config: Config
    topology: Topology
    steps_per_epoch: int

    def __post_init__(self) -> None:
        # Memos (not fields: no effect on equality, repr or replace()): the averaging-rate schedule, gamma by
        # epoch, and the round plans of schedules without per-round randomness by position in W's period.
        object.__setattr__(self, "_rate", averaging_rate(self.config))
        object.__setattr__(self, "_gammas", {})
        object.__setattr__(self, "_plans", {})
        object.__setattr__(self, "_timeline", compile_timeline(self.config))
        object.__setattr__(self, "_topologies", {})  # the topologies timeline events switch to, by their keys
        object.__setattr__(self, "_adaptive", {})  # adaptive averaging rate: epoch -> gamma from that epoch on

    # ------------------------------------------------------------ the adaptive averaging rate

    @property
    def adaptive(self) -> bool:
        """Whether gamma is the adaptive averaging rate, which the coordinator sets during the run (set_gamma)."""
        return self.config.schedule.averaging_rate.kind == "adaptive"

    def set_gamma(self, epoch: int, gamma: float) -> None:
        """The adaptive averaging rate from this epoch on (the coordinator's, from the consensus distance measured
        at the end of epoch - 1). Safe to call from another thread while the agents read gamma."""
        self._adaptive[int(epoch)] = float(gamma)

    def adaptive_gammas(self) -> dict[int, float]:
        """epoch -> adaptive gamma from that epoch on, as set so far."""
        return dict(self._adaptive)

    def gamma_epoch(self, round_index: int) -> int | None:
        """The epoch whose adaptive gamma round `round_index` uses: the latest epoch e >= 1, not after the round's,
        that follows a record (the end of epoch e - 1 is an evaluation step); None: gamma0 (no record before)."""
        epoch = self.epoch_of_step(self.last_step_of_round(round_index))
        for e in range(epoch, 0, -1):
            if self.is_eval_step(e * self.steps_per_epoch - 1):
                return e
        return None

    def has_gamma(self, round_index: int) -> bool:
        """Whether the gamma of this round is known here (always, except an adaptive one not yet set)."""
        if not self.adaptive or self._timeline.at(round_index).gamma is not None:
            return True
        epoch = self.gamma_epoch(round_index)
        return epoch is None or epoch in self._adaptive

    @property
    def timeline(self) -> CompiledTimeline:
        return self._timeline

    def conditions(self, round_index: int) -> Conditions:
        """What the timeline has in force at this round (slowdowns, links, partition, graph, gamma, communication)."""
        return self._timeline.at(round_index)

    def schedule(self, index: int, round_index: int) -> None:
        """Wall-clock timeline event `index` is in force from this round on (the coordinator picked it when its time
        came). Raises UserError, changing nothing, when it cannot be. Memos of the timeline before are never read
        again: their keys hold its generation."""
        object.__setattr__(self, "_timeline", self._timeline.schedule(index, round_index))

    def absent(self, agent: int, step: int) -> bool:
        """Whether this agent is away (a timeline's leave) during local step `step`."""
        return agent in self._timeline.at(step // self.local_steps).absent

    def joins(self, round_index: int) -> dict[int, tuple[str, int | None]]:
        """Agents that come back at this round: agent -> (what it starts from, the present neighbour it waits for:
        whose model it takes, or, from scratch, whose word that it reached the round it waits for)."""
        out = {}
        for _, event in self._timeline.events_at(round_index):
            if event.action != "join":
                continue
            conditions = self.conditions(round_index)
            before = self.conditions(round_index - 1).absent if round_index > 0 else frozenset()
            there = frozenset(range(self.topology.n)) - before - conditions.absent
            mixing = cut_mixing(self.topology_at(round_index).mixing(round_index, self.config.seed), conditions.groups)
            for agent in event.agents:
                start = event.start or "neighbour"
                out[agent] = (start, pick_sponsor(mixing, there, agent))  # scratch: a sponsor to pace the join
        return out

    def mixing_at(self, round_index: int) -> np.ndarray:
        """W in force at this round for a rule with public copies (a static graph): the graph's, with the timeline's
        partition cut and the agents that left removed (rows stay stochastic). Round -1: round 0's."""
        round_index = max(0, round_index)
        timeline = self._timeline
        key = ("mixing", timeline.generation, timeline.segment(round_index))
        mixing = self._plans.get(key)
        if mixing is None:
            conditions = timeline.at(round_index)
            mixing = self._plans[key] = remove_absent(
                cut_mixing(self.topology_at(round_index).mixing(round_index, self.config.seed), conditions.groups),
                conditions.absent)
        return mixing

    def support(self) -> np.ndarray:
        """support[i, j]: agent i may receive from j at some round of this run (i != j): the union of the edges of
        the config's graph, of every graph a timeline event may switch to, and every pair when some round may be an
        all-reduce. A pure function of the config (not of its seed): channels and placement are set up for it, and
        a node's peers are its in- and out-neighbours in it."""
        cached = self._plans.get("support")
        if cached is not None:
            return cached
        out = self.topology.support()
        config = self.config
        comm = config.schedule.communication
        kinds = [comm.kind, *(phase.kind for phase in comm.phases)]
        for event in config.timeline:
            if event.topology is not None:
                out = out | build_topology(event.topology.name, self.topology.n, event.topology.weights,
                                           event.topology.params).support()
            if event.communication is not None:
                kinds.append(event.communication.kind)
        if "allreduce" in kinds:
            out = ~np.eye(self.topology.n, dtype=bool)
        out.setflags(write=False)
        self._plans["support"] = out
        return out

    def topology_at(self, round_index: int) -> Topology:
        """The graph in force at this round: the config's, or the last one a timeline event switched to."""
        spec = self._timeline.at(round_index).topology
        if spec is None:
            return self.topology
        key = (spec.name, spec.weights, repr(spec.params))
        built = self._topologies.get(key)
        if built is None:
            built = self._topologies[key] = build_topology(spec.name, self.topology.n, spec.weights, spec.params)
        return built

    @property
    def total_steps(self) -> int:
        return self.config.train.epochs * self.steps_per_epoch

    @property
    def local_steps(self) -> int:
        return self.config.train.local_steps

    @property
    def total_rounds(self) -> int:
        return self.total_steps // self.local_steps

    def epoch_of_step(self, step: int) -> int:
        return step // self.steps_per_epoch

    def round_after_step(self, step: int) -> int | None:
        """The round index that follows local step `step` (0-based), or None."""
        if (step + 1) % self.local_steps != 0:
            return None
        return (step + 1) // self.local_steps - 1

    def last_step_of_round(self, round_index: int) -> int:
        return (round_index + 1) * self.local_steps - 1

    def is_eval_step(self, step: int) -> bool:
        every = self.config.eval.every
        if step == self.total_steps - 1:
            return True
        return every > 0 and (step + 1) % (every * self.steps_per_epoch) == 0

    def gamma(self, round_index: int) -> float:
        override = self._timeline.at(round_index).gamma
        if override is not None:
            return override
        if self.adaptive:  # the latest gamma set at or before the round's epoch (sync agents wait for theirs)
            epoch = self.epoch_of_step(self.last_step_of_round(round_index))
            known = [e for e in tuple(self._adaptive) if e <= epoch]
            return self._adaptive[max(known)] if known else float(self._rate(0))
        epoch = self.epoch_of_step(self.last_step_of_round(round_index))
        gamma = self._gammas.get(epoch)
        if gamma is None:
            gamma = self._gammas[epoch] = float(self._rate(epoch))
        return gamma

    def progress(self, round_index: int) -> float:
        """The fraction of training done when round `round_index` communicates (its last step's end)."""
        return (self.last_step_of_round(round_index) + 1) / self.total_steps

    def communication(self, round_index: int) -> CommunicationKindConfig:
        """The communication kind and its keys in force at this round: the phase it falls in, if phases are set."""
        override = self._timeline.at(round_index).communication
        if override is not None:
            return override
        comm = self.config.schedule.communication
        if not comm.phases:
            return comm
        return comm.phases[phase_index([phase.until for phase in comm.phases], self.progress(round_index))]

    def round_plan(self, round_index: int) -> RoundPlan | None:
        """Who sends what to whom in this round; None when the round does not communicate.

        Without per-round coin flips (communication kind "probability"), random peers or a random topology, the
        plan of a communicating round depends on the round only through W(t) (or is the all-reduce), so it is built
        once per position in the topology's period (and timeline segment) and reused with the round's index.
        """
        spec = self.communication(round_index)
        params = {"start": spec.start, "width": spec.width, "sparse_every": spec.sparse_every}
        if not round_communicates(spec.kind, round_index, self.progress(round_index), params):
            return None
        timeline = self._timeline
        segment = (timeline.generation, timeline.segment(round_index))
        topology = self.topology_at(round_index)
        if spec.kind == "allreduce":
            key: tuple = (*segment, "allreduce")
        elif spec.kind == "probability" or spec.pull == "random_peer" or topology.period() == 0:
            return _round_plan(self, round_index, spec)
        else:
            key = (*segment, round_index % topology.period())
        cached = self._plans.get(key)
        if cached is None:
            cached = self._plans[key] = _round_plan(self, round_index, spec)
        return cached if cached.round == round_index else replace(cached, round=round_index)


def _round_plan(plan: RunPlan, round_index: int, spec: CommunicationKindConfig | None = None) -> RoundPlan | None:
    """The plan of a communicating round, built from scratch (None when no agent is active)."""
    spec = plan.communication(round_index) if spec is None else spec
    n = plan.topology.n
    seed = plan.config.seed
    conditions = plan.conditions(round_index)
    if spec.kind == "allreduce":
        return allreduce_plan(n, round_index, [i for i in range(n) if i not in conditions.absent])
    active = active_agents(n, round_index, spec.p, seed) if spec.kind == "probability" else np.ones(n, dtype=bool)
    active[list(conditions.absent)] = False
    if not active.any():
        return None
    mixing = remove_absent(cut_mixing(plan.topology_at(round_index).mixing(round_index, seed), conditions.groups),
                           conditions.absent)
    planned = plan_round(mixing, round_index, whole_models=sends_whole_models(plan.config.gossip.rule), pull=spec.pull,
                         active=active, seed=seed)
    if conditions.absent:  # (CHOCO/AdaGossip: every agent mixes, except those away)
        planned = replace(planned, mixers=planned.mixers - conditions.absent)
    return planned


def steps_per_epoch(config: Config, train_size: int) -> int:
    """Steps in one epoch: the whole training set once across all agents (or the configured number)."""
    if config.train.steps_per_epoch is not None:
        return config.train.steps_per_epoch
    return max(1, math.ceil(train_size / (config.agents.count * config.train.batch_size)))
