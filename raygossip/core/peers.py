"""One agent's peer table: mixing weights of the static graph, and which peers are down, dropped or restarted."""

from __future__ import annotations

import numpy as np


class PeerTable:
    """Pure bookkeeping of one agent's view of the others (no transport, no locks: the node holds its lock).

    A peer is `down` while it is dead and may come back (nothing is sent to it), `dropped` once it is gone for
    good (its weight W_ij moves to the self weight, so rows stay stochastic). Each restart of a peer is a new
    incarnation and starts a new stream of letters to it at seq 0."""

    def __init__(self, agent: int, base_mixing: np.ndarray) -> None:
        self.agent = agent
        self.base_mixing = base_mixing
        row = base_mixing[agent]
        self.in_weights = {j: float(row[j]) for j in range(len(row)) if j != agent and row[j] > 0}
        self.out_neighbours = [j for j in range(len(row)) if j != agent and base_mixing[j, agent] > 0]
        self.others = [j for j in range(len(row)) if j != agent]
        self.down: set[int] = set()
        self.dropped: set[int] = set()
        self.dropped_weight = 0.0
        self.incarnation: dict[int, int] = {}
        self.sent_seq: dict[int, int] = {}

    def live(self, receivers: list[int]) -> list[int]:
        """The receivers that are neither down nor dropped."""
        return [j for j in receivers if j not in self.down and j not in self.dropped]

    def next_seq(self, receiver: int) -> int:
        seq = self.sent_seq.get(receiver, 0)
        self.sent_seq[receiver] = seq + 1
        return seq

    def is_neighbour(self, j: int) -> bool:
        return j in self.in_weights or j in self.out_neighbours

    def mark_down(self, j: int) -> None:
        self.down.add(j)

    def drop(self, j: int) -> float | None:
        """Forget peer j for good; returns W_ij (0.0 when j is no in-neighbour), None when it was dropped before."""
        if j in self.dropped:
            return None
        self.dropped.add(j)
        self.down.add(j)
        weight = self.in_weights.get(j, 0.0)
        self.dropped_weight += weight
        return weight

    def restarted(self, j: int, incarnation: int) -> bool:
        """Peer j came back as `incarnation`: True (a new stream to it begins) unless that life is not newer."""
        if incarnation <= self.incarnation.get(j, 0):
            return False
        self.incarnation[j] = incarnation
        self.sent_seq[j] = 0
        self.down.discard(j)
        return True


class LinkWeights:
    """CHOCO/AdaGossip under a changing graph (a timeline's partition, leave, join, topology): the weight with which
    each in-neighbour's known public copy is counted in s, and the round that weight is of. Pure bookkeeping.

    The invariant s_i = sum_j weight[j] * known_j holds at every moment; a weight only moves forward in rounds
    (at the receiver's round boundary, or with a letter of a later round: in bounded/async mode a sender may be
    ahead), so a late letter of an earlier round is counted with the weight in force, never an older one."""

    def __init__(self, row: np.ndarray, agent: int, round_index: int = -1) -> None:
        self.agent = agent
        self.weight = {j: float(row[j]) for j in range(len(row)) if j != agent}
        self.round = dict.fromkeys(self.weight, round_index)

    def move(self, j: int, round_index: int, target: float) -> tuple[float, float] | None:
        """Link j's weight at `round_index` is `target`: (old, new) when it changes (the caller re-weights s), None
        when it stays or the round is not later than the weight's."""
        if round_index <= self.round.get(j, -1):
            return None
        self.round[j] = round_index
        old = self.weight.get(j, 0.0)
        if old == target:
            return None
        self.weight[j] = float(target)
        return old, float(target)
