"""One agent's peer table: which peers are down, dropped or in which life (liveness, once: the mailbox reads it too),
and the agent's outgoing stream to each (weights come from the round's plan)."""

from __future__ import annotations

import numpy as np


class PeerTable:
    """Pure bookkeeping of one agent's view of the others (no transport, no locks: the node holds its lock).

    A peer is `down` while it is dead and may come back (nothing is sent to it, nobody waits for it), `dropped` once it
    is gone for good (a round's weight on it moves to the self weight, so rows stay stochastic). Each restart of a peer
    is a new life (`life`: the newest one heard of, from the supervisor or from the peer's own letters). This agent's
    stream to a peer addresses one life of it (`sent_life`) and numbers its letters from 0 (`sent_seq`); a peer that
    came back in a newer life gets letters again once the supervisor's news opened a new stream to it (`restarted`),
    which begins with this agent's resync letter.

    The table holds no weights of its own: every weight comes from the round's plan row (`moved_weight`). Who is a
    neighbour at all is the run's support (RunPlan.support: the union of its edges, whatever the round)."""

    def __init__(self, agent: int, support: np.ndarray, first_row: dict[int, float] | None = None) -> None:
        self.agent = agent
        n = len(support)
        self.others = [j for j in range(n) if j != agent]
        self.in_neighbours = [j for j in self.others if support[agent, j]]  # who may ever send to this agent
        self.out_neighbours = [j for j in self.others if support[j, agent]]  # whom this agent may ever send to
        self.down: set[int] = set()
        self.dropped: set[int] = set()
        self.life: dict[int, int] = {}
        self.sent_life: dict[int, int] = {}
        self.sent_seq: dict[int, int] = {}
        # the in-weights of the last round's row, and the weight moved from dropped senders to the self weight in it
        self.in_weights: dict[int, float] = dict(first_row or {})
        self.dropped_weight = 0.0

    def live(self, receivers: list[int]) -> list[int]:
        """The receivers this agent may send to now: neither down nor dropped, and its stream addresses their life."""
        return [j for j in receivers if j not in self.down and j not in self.dropped
                and self.sent_life.get(j, 0) >= self.life.get(j, 0)]

    def absent(self, j: int) -> bool:
        """Whether nothing is to be waited for from j (it is dead or gone)."""
        return j in self.down

    def next_seq(self, receiver: int) -> int:
        seq = self.sent_seq.get(receiver, 0)
        self.sent_seq[receiver] = seq + 1
        return seq

    def is_neighbour(self, j: int) -> bool:
        """Whether j sends to or receives from this agent at some round of the run."""
        return j in self.in_neighbours or j in self.out_neighbours

    def mark_down(self, j: int) -> None:
        self.down.add(j)

    def drop(self, j: int) -> bool:
        """Forget peer j for good; False when it was dropped before."""
        if j in self.dropped:
            return False
        self.dropped.add(j)
        self.down.add(j)
        return True

    def moved_weight(self, row: dict[int, float]) -> float:
        """This round's in-weights `row` (sender -> W_ij of the round's plan): the part on dropped senders, which
        goes to the self weight. Recorded as in_weights and dropped_weight (for reports and checks)."""
        self.in_weights = dict(row)
        self.dropped_weight = sum(w for j, w in row.items() if j in self.dropped)
        return self.dropped_weight

    def restarted(self, j: int, life: int) -> bool:
        """The supervisor says peer j came back as `life`: True (a new stream to it begins at seq 0) unless this
        agent's stream already addresses that life or a newer one."""
        if life <= self.sent_life.get(j, 0):
            return False
        self.heard(j, life)
        self.sent_life[j] = life
        self.sent_seq[j] = 0
        self.down.discard(j)
        return True

    def heard(self, j: int, life: int) -> None:
        """A letter (or news) of j's life `life`: a life newer than any known means j is back (no longer down)."""
        if life > self.life.get(j, 0):
            self.life[j] = life
            self.down.discard(j)

    def learn(self, lives: dict[int, int]) -> None:
        """A restarted agent learns each peer's life (its own streams are new: they address those lives)."""
        for j, life in lives.items():
            self.life[j] = self.sent_life[j] = life
