"""Fault injection, pure and seeded: which agents die at which round, which messages are lost or late."""

from __future__ import annotations

import numpy as np

from ..config import FaultsConfig


def kill_schedule(faults: FaultsConfig, n: int, total_rounds: int, seed: int) -> dict[int, int]:
    """agent -> the round at whose start its process exits: the listed kills, plus a seeded random
    `kill_fraction` of the other agents at `kill_round` (or at seeded rounds in the middle half of training)."""
    schedule = {kill.agent: kill.round for kill in faults.kill}
    count = int(round(faults.kill_fraction * n))
    others = [i for i in range(n) if i not in schedule]
    if count and others:
        rng = np.random.default_rng([seed, 0xDEAD])
        chosen = rng.choice(others, size=min(count, len(others)), replace=False)
        for agent in sorted(int(i) for i in chosen):
            if faults.kill_round is not None:
                schedule[agent] = faults.kill_round
            else:
                schedule[agent] = int(rng.integers(total_rounds // 4, max(total_rounds // 4 + 1, 3 * total_rounds // 4)))
    return schedule


class MessageFate:
    """Per sender and incarnation: whether each outgoing message is lost and how much extra delay it gets."""

    def __init__(self, faults: FaultsConfig, seed: int, agent: int, incarnation: int) -> None:
        self.drop = faults.drop_messages
        self.delay_fraction = faults.delay_messages
        self.delay_s = faults.delay_s
        self.active = self.drop > 0 or (self.delay_fraction > 0 and self.delay_s > 0)
        self.rng = np.random.default_rng([seed, agent, incarnation, 0xFA7E])

    def __call__(self) -> tuple[bool, float]:
        """(lost, extra delay in seconds) of the next message on any link."""
        if not self.active:
            return False, 0.0
        lost = bool(self.rng.random() < self.drop)
        late = bool(self.rng.random() < self.delay_fraction)
        return lost, self.delay_s if late else 0.0
