"""Averaging-rate schedules (Callable[[epoch], float]) and communication schedules (which rounds gossip)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


Schedule = Callable[[int], float]


def as_schedule(value: float | Schedule) -> Schedule:
    """Anywhere a schedule is accepted a number is too."""
    if callable(value):
        return value
    constant_value = float(value)
    return lambda _epoch: constant_value


# ---------------------------------------------------------------- averaging rate (gamma), by epoch


def constant(gamma: float) -> Schedule:
    return lambda _epoch: float(gamma)


def ars_exponential(gamma0: float, growth: float) -> Schedule:
    """ARS as in the authors' code: before epoch e's first averaging gamma <- min(1, gamma*growth).

    So epoch e uses min(1, gamma0 * growth**(e+1)).
    """
    return lambda epoch: min(1.0, gamma0 * growth ** (epoch + 1))


def linear_ramp(gamma0: float, ramp_epochs: int) -> Schedule:
    """gamma0 at epoch 0, rising linearly to 1 at epoch ramp_epochs, 1 after."""
    span = max(1, ramp_epochs)
    return lambda epoch: min(1.0, gamma0 + (1.0 - gamma0) * epoch / span)


def cosine_ramp(gamma0: float, ramp_epochs: int) -> Schedule:
    """gamma0 at epoch 0, rising along a half cosine to 1 at epoch ramp_epochs, 1 after."""
    span = max(1, ramp_epochs)

    def rate(epoch: int) -> float:
        if epoch >= span:
            return 1.0
        return gamma0 + (1.0 - gamma0) * 0.5 * (1.0 - math.cos(math.pi * epoch / span))

    return rate


def step_ramp(gamma0: float, milestones: Sequence[int], factor: float) -> Schedule:
    """gamma0, multiplied by factor at each milestone epoch, capped at 1."""
    marks = sorted(int(m) for m in milestones)
    return lambda epoch: min(1.0, gamma0 * factor ** sum(epoch >= m for m in marks))


def adaptive_gamma(previous: float, reference: float, distance: float, gamma0: float, exponent: float = 1.0) -> float:
    """The adaptive averaging rate after one more measured consensus distance (the coordinator runs it each epoch).

    gamma = clip(gamma0 * (reference / distance) ** exponent, gamma0, 1), never below `previous`: a ratchet, so
    gamma is monotone non-decreasing, as ARS (a noisy distance would otherwise make it jitter). `reference` is the
    largest distance measured so far (the agents start from one model, so the distance first rises; a
    first-epoch reference would pin gamma at gamma0). With exponent 1, gamma * distance is held at
    gamma0 * reference: the consensus step (gamma times the disagreement it corrects) keeps its size while the
    agents come closer, so gamma rises toward 1 as they agree. A distance of 0 gives 1; a non-finite one (or a
    non-positive reference) changes nothing."""
    if not (math.isfinite(distance) and math.isfinite(reference)) or reference <= 0.0:
        return previous
    if distance <= 0.0:
        return 1.0
    return max(previous, min(1.0, max(gamma0, gamma0 * (reference / distance) ** exponent)))


def adaptive_gammas(gamma0: float, distances: Sequence[float], exponent: float = 1.0) -> list[float]:
    """gamma after each of these per-epoch consensus distances: the fold of adaptive_gamma from gamma0, the
    reference being the largest distance so far. Element k is gamma from the epoch after the k-th distance."""
    out: list[float] = []
    gamma, reference = gamma0, 0.0
    for distance in distances:
        if math.isfinite(distance):
            reference = max(reference, distance)
        gamma = adaptive_gamma(gamma, reference, distance, gamma0, exponent)
        out.append(gamma)
    return out


AVERAGING_RATES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "ars": ars_exponential,
    "linear": linear_ramp,
    "cosine": cosine_ramp,
    "step": step_ramp,
}
"""The averaging-rate kinds that depend on the epoch alone; `adaptive` (adaptive_gamma) also on the run."""
AVERAGING_RATE_KINDS = (*AVERAGING_RATES, "adaptive")


# ---------------------------------------------------------------- communication: which rounds gossip

COMMUNICATION_KINDS = ("every", "probability", "late", "window", "none", "allreduce")
"""When rounds gossip: every round, with probability p per agent, densely late or in a window, never, or an exact
all-reduce of all agents every round."""
PULLS = ("neighbours", "random_peer")
"""Whom a D-PSGD agent pulls from in a round: all its in-neighbours, or one random one."""


@dataclass(frozen=True)
class RoundPlan:
    """Who sends to whom in one communication round, and who mixes.

    edges: directed (sender, receiver) pairs; mixers: agents that apply the consensus step;
    weights[i]: (self weight, {sender: weight}) that agent i mixes with this round.
    """

    round: int
    edges: tuple[tuple[int, int], ...]
    mixers: frozenset[int]
    weights: dict[int, tuple[float, dict[int, float]]]

    def senders_to(self, receiver: int) -> list[int]:
        return sorted(src for src, dst in self.edges if dst == receiver)

    def receivers_of(self, sender: int) -> list[int]:
        return sorted(dst for src, dst in self.edges if src == sender)


def is_dense(kind: str, progress: float, params: dict) -> bool:
    """Whether a round at this fraction of training is in the dense part of a late/window schedule."""
    if kind == "late":
        return progress >= params["start"]
    if kind == "window":
        return params["start"] <= progress < params["start"] + params["width"]
    return True


def phase_index(untils: Sequence[float], progress: float) -> int:
    """Which phase a round at fraction `progress` of training is in: phase k covers [untils[k-1], untils[k]),
    the last one also its end (progress 1)."""
    for k, until in enumerate(untils):
        if progress < until:
            return k
    return len(untils) - 1


def round_communicates(kind: str, round_index: int, progress: float, params: dict) -> bool:
    """Whether round `round_index` (at fraction `progress` of training) exchanges anything at all."""
    if kind in ("every", "probability", "allreduce"):
        return True
    if kind == "none":
        return False
    if is_dense(kind, progress, params):
        return True
    sparse_every = int(params.get("sparse_every", 0))
    return sparse_every > 0 and round_index % sparse_every == 0


def active_agents(n: int, round_index: int, p: float, seed: int) -> np.ndarray:
    """Seeded per-round coin flips: which agents gossip this round (same answer on every agent)."""
    rng = np.random.default_rng([seed, round_index, 0x60551])
    return rng.random(n) < p


def random_peers(mixing: np.ndarray, round_index: int, seed: int) -> np.ndarray:
    """One random in-neighbour per agent for this round (seeded, same answer on every agent)."""
    rng = np.random.default_rng([seed, round_index, 0x9EE5])
    n = mixing.shape[0]
    peers = np.empty(n, dtype=np.int64)
    for i in range(n):
        candidates = [j for j in range(n) if j != i and mixing[i, j] > 0]
        peers[i] = candidates[rng.integers(len(candidates))] if candidates else -1  # -1: cut off (a partition)
    return peers


def allreduce_plan(n: int, round_index: int, agents: Sequence[int] | None = None) -> RoundPlan:
    """An exact all-reduce as a D-PSGD round: every agent (of `agents`, default all) receives from every other, all
    weights 1/n (so gamma = 1 gives every agent the exact uniform average)."""
    agents = list(range(n)) if agents is None else sorted(agents)
    weight = 1.0 / len(agents)
    edges = tuple((j, i) for j in agents for i in agents if i != j)
    weights = {i: (weight, {j: weight for j in agents if j != i}) for i in agents}
    return RoundPlan(round_index, tuple(sorted(edges)), frozenset(agents), weights)


def plan_round(
    mixing: np.ndarray,
    round_index: int,
    *,
    whole_models: bool,
    pull: str = "neighbours",
    active: np.ndarray | None = None,
    seed: int = 0,
) -> RoundPlan:
    """The message plan of one communication round.

    whole_models (D-PSGD): every active agent pulls from its in-neighbours (or one random peer) and mixes with
    the weights of its row renormalised over what it pulls (row-stochastic).
    Otherwise (CHOCO-SGD, AdaGossip): every active agent pushes its compressed difference to all neighbours; all
    agents mix with their unchanged W row (the x_hat bookkeeping requires the fixed W).
    """
    n = mixing.shape[0]
    active = np.ones(n, dtype=bool) if active is None else active
    edges: list[tuple[int, int]] = []
    weights: dict[int, tuple[float, dict[int, float]]] = {}
    if whole_models:
        peers = random_peers(mixing, round_index, seed) if pull == "random_peer" else None
        mixers = frozenset(int(i) for i in np.flatnonzero(active))
        for i in sorted(mixers):
            if peers is not None:
                sources = [int(peers[i])] if peers[i] >= 0 else []
                row = {j: 0.5 for j in sources}
                self_weight = 0.5 if sources else 1.0
            else:
                sources = [j for j in range(n) if j != i and mixing[i, j] > 0]
                total = mixing[i, i] + sum(mixing[i, j] for j in sources)
                row = {j: float(mixing[i, j] / total) for j in sources}
                self_weight = float(mixing[i, i] / total)
            edges.extend((j, i) for j in sources)
            weights[i] = (self_weight, row)
    else:
        mixers = frozenset(range(n))
        for j in np.flatnonzero(active):
            edges.extend((int(j), i) for i in range(n) if i != j and mixing[i, j] > 0)
        for i in range(n):
            row = {j: float(mixing[i, j]) for j in range(n) if j != i and mixing[i, j] > 0}
            weights[i] = (float(mixing[i, i]), row)
    return RoundPlan(round_index, tuple(sorted(edges)), mixers, weights)
