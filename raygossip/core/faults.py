"""Fault injection, pure and seeded: which agents die at which round (in each of their lives), which messages are
lost or late, and when the driver's chaos kills an actor, a node or the coordinator."""

from __future__ import annotations

import math

import numpy as np

from ..config import ChaosConfig, FaultsConfig


def kill_schedule(faults: FaultsConfig, n: int, total_rounds: int, seed: int, listed: bool = True) -> dict[int, int]:
    """agent -> the round at whose start its first life's process exits: the listed kills (an agent's earliest),
    plus a seeded random `kill_fraction` of the other agents at `kill_round` (or at seeded rounds in the middle half
    of training). listed=False: the kill_fraction part alone."""
    schedule: dict[int, int] = {}
    for kill in sorted(faults.kill, key=lambda k: k.round):
        schedule.setdefault(kill.agent, kill.round)
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
    if not listed:
        return {agent: r for agent, r in schedule.items() if agent not in {kill.agent for kill in faults.kill}}
    return schedule


def chaos_rounds(chaos: ChaosConfig, n: int, total_rounds: int, seed: int) -> dict[int, list[int]]:
    """agent -> the rounds at whose start round-rate chaos kills it: deaths of the whole network come at seeded
    exponential gaps of mean `every_rounds` from round `start` until `stop` (or the run's end), at most
    `max_deaths`, each hitting a uniformly drawn agent."""
    out: dict[int, list[int]] = {}
    if chaos.every_rounds is None:
        return out
    rng = np.random.default_rng([seed, 0xC4A05])
    end = total_rounds if chaos.stop is None else min(total_rounds, chaos.stop)
    at, deaths = float(chaos.start), 0
    while chaos.max_deaths is None or deaths < chaos.max_deaths:
        at += rng.exponential(chaos.every_rounds)
        if at >= end:
            break
        out.setdefault(int(rng.integers(n)), []).append(int(math.floor(at)))
        deaths += 1
    return out


def death_rounds(faults: FaultsConfig, n: int, total_rounds: int, seed: int) -> dict[int, list[int]]:
    """agent -> the rounds at whose start its process exits, one per life in order: life k (incarnation k, the k-th
    restart) dies at the k-th round. The listed kills (an agent may be listed more than once), kill_fraction's and
    round-rate chaos's; rounds that coincide in one agent's list move to the next free round, so that each life dies
    past the round the previous one died at (a restart resumes from a snapshot at or before it). An agent killed with
    its actor mate starts its next life too, and so skips the death of the life it did not live: deaths of packed
    agents come somewhat rarer than the rate says."""
    rounds: dict[int, list[int]] = {}
    for kill in faults.kill:
        rounds.setdefault(kill.agent, []).append(kill.round)
    for agent, round_index in kill_schedule(faults, n, total_rounds, seed, listed=False).items():
        rounds.setdefault(agent, []).append(round_index)
    for agent, chaos in chaos_rounds(faults.chaos, n, total_rounds, seed).items():
        rounds.setdefault(agent, []).extend(chaos)
    out = {}
    for agent, listed in rounds.items():
        strictly = []
        for round_index in sorted(listed):
            strictly.append(max(round_index, strictly[-1] + 1) if strictly else round_index)
        out[agent] = [r for r in strictly if r < total_rounds] if total_rounds > 0 else strictly
    return {agent: listed for agent, listed in out.items() if listed}


def death_round(deaths: dict[int, list[int]], timeline_kills: dict[int, int], agent: int, life: int) -> int | None:
    """The round at whose start this life of the agent dies (death_rounds), or its timeline kill in its first life
    (an agent the faults kill is not on a timeline kill: validation), or None."""
    listed = deaths.get(agent, [])
    if life < len(listed):
        return listed[life]
    return timeline_kills.get(agent) if life == 0 and not listed else None


def chaos_times(chaos: ChaosConfig, seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """The seeded generators of time-rate chaos: (agent kills: gaps and picks, coordinator kills: gaps)."""
    return np.random.default_rng([seed, 0xC4A05, 1]), np.random.default_rng([seed, 0xC4A05, 2])


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
