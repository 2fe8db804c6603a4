"""CHOCO/AdaGossip under a timeline that changes the graph: each in-link's weight in s, moved round by round."""

from __future__ import annotations

from .plan import RunPlan


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
