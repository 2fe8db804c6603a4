"""CHOCO/AdaGossip under a timeline that changes the graph: each in-link's weight in s, moved round by round
(GraphLinks, pure), and a node's part that applies it to the rule state and its streams (GraphChanges)."""

from __future__ import annotations

from .agent import AgentCore
from .outbox import Outbox
from .plan import RunPlan
from .wire import Kind


class GraphLinks:
    """One agent's links under a changing graph (a timeline's partition, leave, join, topology): the weight with which
    each in-neighbour's known public copy is counted in s, the round that weight is of, and the links that open at a
    round. Pure bookkeeping over the run's plan; the node applies what it says to the rule state.

    The invariant s_i = sum_j weight[j] * known_j holds at every moment; a weight only moves forward in rounds
    (at the receiver's round boundary, or with a letter of a later round: in bounded/async mode a sender may be
    ahead), so a late letter of an earlier round is counted with the weight in force, never an older one."""

    def __init__(self, plan: RunPlan, agent: int, round_index: int = -1) -> None:
        self.plan = plan
        self.agent = agent
        row = plan.mixing_at(round_index)[agent]
        self.weight = {j: float(row[j]) for j in range(len(row)) if j != agent}
        self.round = dict.fromkeys(self.weight, round_index)
        self.graph_round = round_index  # the last round whose graph change was looked at (changed)

    def move(self, j: int, round_index: int) -> tuple[float, float] | None:
        """Link j takes its weight W_ij of `round_index`, if that round is later than its weight's: (old, new) when
        the weight changes (the caller re-weights s), else None."""
        if round_index <= self.round.get(j, -1):
            return None
        self.round[j] = round_index
        target = float(self.plan.mixing_at(round_index)[self.agent, j])
        old = self.weight.get(j, 0.0)
        if old == target:
            return None
        self.weight[j] = target
        return old, target

    def changed(self, round_index: int) -> bool:
        """Whether this round, looked at for the first time now, has another graph than the round before."""
        if round_index <= self.graph_round:
            return False
        self.graph_round = round_index
        return round_index > 0 and self.plan.mixing_at(round_index - 1) is not self.plan.mixing_at(round_index)

    def opened(self, round_index: int, *, outgoing: bool) -> list[int]:
        """The agents whose link from this agent (outgoing) or to it opens at this round (W was 0 the round before)."""
        if round_index == 0:
            return []
        before, now = self.plan.mixing_at(round_index - 1), self.plan.mixing_at(round_index)
        me = self.agent
        others = [k for k in range(len(now)) if k != me]
        if outgoing:
            return [k for k in others if before[k, me] == 0 and now[k, me] > 0]
        return [j for j in others if before[me, j] == 0 and now[me, j] > 0]


class GraphChanges:
    """A node's in-links as the run's graph changes: the weight with which each sender's known public copy is counted
    in s, and, under a timeline that changes the graph with a rule with public copies, the re-weighting of s and the
    link letters when the graph changes (`links` is a GraphLinks then, else None and every weight is the plan's).
    Call everything but `step` with the node's lock held."""

    def __init__(self, core: AgentCore, plan: RunPlan, outbox: Outbox) -> None:
        self.core = core
        self.plan = plan
        self.outbox = outbox
        self.agent = core.agent_id
        self.links = GraphLinks(plan, self.agent) if core.rule.public_copies and plan.timeline.changes_graph else None

    def weight(self, sender: int) -> float:
        """The weight with which `sender`'s known public copy is counted in s now (CHOCO/AdaGossip)."""
        if self.links is not None:
            return self.links.weight.get(sender, 0.0)
        return float(self.plan.mixing_at(self.outbox.round_reached)[self.agent, sender])

    def weights_for(self, sender: int, round_index: int, weights: dict[int, float]) -> dict[int, float]:
        """The in-weights to absorb a letter of `round_index` from `sender` with: the link's weight in force at that
        round (or a later one) under a changing graph, else `weights` (the round's plan row)."""
        if self.links is None:
            return weights
        self.move(sender, round_index)
        return self.links.weight

    def step(self, round_index: int) -> None:
        """Once per round, before this round's message: the in-links whose weight W_ij changes now are re-weighted in
        s (s += (new - old) x_hat_j as known) or dropped, and this agent's whole public copy goes, as a link letter,
        to every agent whose link from it opens now (the rule's resync adds it there), so that s_i = sum_j W_ij x_hat_j
        holds for the new W."""
        if self.links is None or not self.links.changed(round_index):
            return
        peers = self.outbox.peers
        with self.outbox.lock:
            for j in peers.others:
                self.move(j, round_index)
            for k in peers.live(self.links.opened(round_index, outgoing=True)):
                self.outbox.post_whole(k, Kind.LINK, round_index, {"x_hat": self.core.public_copy()})

    def move(self, sender: int, round_index: int) -> None:
        """The in-link from `sender` takes its weight of this round, if that round is later than its weight's."""
        change = self.links.move(sender, round_index)
        if change is not None:
            self.core.reweight_link(sender, *change)

    def opened(self, round_index: int) -> list[int]:
        """The agents whose link to this one opens at this round (their link letters come this round)."""
        if self.links is None:
            return []
        return self.outbox.peers.live(self.links.opened(round_index, outgoing=False))

    def restored(self, round_index: int) -> None:
        """A snapshot of `round_index` was restored: its s counts its links with the weights of that round, and it
        may predate drops this agent already knows of."""
        if self.links is not None:
            self.links = GraphLinks(self.plan, self.agent, round_index)
        for j in self.outbox.peers.dropped:
            self.core.drop_link(j, self.weight(j))
