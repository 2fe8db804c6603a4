"""Non-IID partitioners: pure functions (labels, n_agents, seed, **params) -> one index array per agent."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from raygossip.errors import UserError
from raygossip.registry import keyword_params

MAX_TRIES = 1000  # resampling attempts before a Dirichlet partitioner gives up
LIN_GROUP = 10  # dirichlet_lin draws its bins for this many agents at a time
HOLD_SHARE = 0.01  # a class counts as "held" by an agent at >= this share of the agent's samples

Partitioner = Callable[..., list[np.ndarray]]


def _labels(labels: np.ndarray) -> np.ndarray:
    """Labels as a 1-D int64 array of non-negative class ids."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise UserError("data.labels", "labels must be a non-empty 1-D array of non-negative integers")
    return y.astype(np.int64, copy=False)


def _check_agents(y: np.ndarray, n_agents: int) -> None:
    """At least one agent, and no more agents than training samples."""
    if isinstance(n_agents, bool) or not isinstance(n_agents, (int, np.integer)) or n_agents < 1:
        raise UserError("agents.count", f"must be an integer >= 1, got {n_agents!r}")
    if n_agents > y.size:
        raise UserError("agents.count", f"{n_agents} agents but only {y.size} training samples")


def _check_alpha(alpha: float) -> float:
    """A Dirichlet concentration must be a finite number > 0."""
    number = isinstance(alpha, (int, float, np.integer, np.floating)) and not isinstance(alpha, bool)
    if not number or not math.isfinite(alpha) or alpha <= 0:
        raise UserError("data.partition.alpha", f"must be a number > 0, got {alpha!r}")
    return float(alpha)


def _check_count(field: str, value: int) -> int:
    """A positive integer parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"data.partition.{field}", f"must be an integer >= 1, got {value!r}")
    return int(value)


def _rng(seed: int) -> np.random.Generator:
    """The partition's only source of randomness: a generator from an explicit integer seed."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UserError("seed", f"must be an integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def _by_class(y: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of each present class, each list shuffled by rng."""
    return [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]


def _cut_counts(p: np.ndarray, total: int) -> np.ndarray:
    """Split `total` items by proportions p with cumulative floor cuts (the reference code's rule)."""
    cuts = np.minimum((np.cumsum(p) * total).astype(np.int64), total)
    cuts[-1] = total
    return np.diff(cuts, prepend=0)


def _balanced(p: np.ndarray, sizes: np.ndarray, cap: float) -> np.ndarray:
    """Zero the share of bins already holding >= cap items and renormalize (kept as is if all are full)."""
    q = p * (sizes < cap)
    return q / q.sum() if q.sum() > 0 else p


def _deal(classes: list[np.ndarray], counts: np.ndarray) -> list[np.ndarray]:
    """Given counts[c, k] (class c items for bin k), slice each class's indices into the bins."""
    parts: list[list[np.ndarray]] = [[] for _ in range(counts.shape[1])]
    for idx, row in zip(classes, counts):
        for k, chunk in enumerate(np.split(idx, np.cumsum(row)[:-1])):
            parts[k].append(chunk)
    return [np.concatenate(p).astype(np.int64) for p in parts]


def _dirichlet_counts(
    sizes: list[int], n_bins: int, alpha: float, rng: np.random.Generator, cap: float | None
) -> np.ndarray:
    """One draw of a class x bin count matrix: per class, Dir(alpha) over bins (optionally balanced)."""
    counts = np.zeros((len(sizes), n_bins), dtype=np.int64)
    for c, m in enumerate(sizes):
        p = rng.dirichlet(np.full(n_bins, alpha))
        if cap is not None:
            p = _balanced(p, counts.sum(axis=0), cap)
        counts[c] = _cut_counts(p, m)
    return counts


def iid(labels: np.ndarray, n_agents: int, seed: int) -> list[np.ndarray]:
    """Shuffle and split into n nearly equal parts (sizes differ by at most one); every sample once."""
    y = _labels(labels)
    _check_agents(y, n_agents)
    perm = _rng(seed).permutation(y.size)
    return [part.astype(np.int64) for part in np.array_split(perm, n_agents)]


def dirichlet(
    labels: np.ndarray, n_agents: int, seed: int, *, alpha: float = 1.0, balance: bool = False, min_samples: int = 1
) -> list[np.ndarray]:
    """Per class, draw Dir(alpha) over agents and split that class's samples accordingly; every sample once.

    The whole draw is repeated (same rng, up to MAX_TRIES times) until every agent holds at least
    `min_samples` samples (the common implementations' rule, e.g. NIID-Bench's min_require_size). With
    `balance`, agents already holding >= N/n samples get no share of later classes (the FedML /
    Hsu et al. rule), which keeps sizes closer and makes tiny alphas feasible for more agents.
    """
    y = _labels(labels)
    _check_agents(y, n_agents)
    alpha = _check_alpha(alpha)
    if not isinstance(balance, bool):
        raise UserError("data.partition.balance", f"must be true or false, got {balance!r}")
    need = _check_count("min_samples", min_samples)
    if need * n_agents > y.size:
        raise UserError("data.partition.min_samples",
                        f"{n_agents} agents x {need} samples exceed the {y.size} training samples")
    rng = _rng(seed)
    classes = _by_class(y, rng)
    sizes = [len(c) for c in classes]
    cap = y.size / n_agents if balance else None
    for _ in range(MAX_TRIES):
        counts = _dirichlet_counts(sizes, n_agents, alpha, rng, cap)
        if counts.sum(axis=0).min() >= need:
            return [rng.permutation(p) for p in _deal(classes, counts)]
    hint = "" if balance else ", balance: true"
    raise UserError(
        "data.partition.min_samples",
        f"no draw in {MAX_TRIES} gave every one of {n_agents} agents >= {need} samples with alpha {alpha:g} "
        f"({len(sizes)} classes); use a larger alpha{hint}, a smaller min_samples, fewer agents or kind 'shards'",
    )


def _lin_groups(n_samples: int, n_agents: int) -> list[tuple[int, int, int]]:
    """(start, stop, agents) of each chunk: LIN_GROUP agents each, the last chunk takes what is left."""
    size = min(LIN_GROUP, n_agents)
    n_groups = math.ceil(n_agents / size)
    step = int(size / n_agents * n_samples)
    groups = []
    for g in range(n_groups):
        stop = n_samples if g == n_groups - 1 else (g + 1) * step
        agents = size if g < n_groups - 1 else n_agents - size * (n_groups - 1)
        groups.append((g * step, stop, agents))
    return groups


def _lin_bins(
    idx: np.ndarray, y: np.ndarray, n_bins: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Balanced Dirichlet bins for one chunk, redrawn until the smallest holds half the average."""
    classes = [idx[y[idx] == c] for c in np.unique(y)]
    sizes = [len(c) for c in classes]
    need = int(0.5 * idx.size / n_bins)
    for _ in range(MAX_TRIES):
        counts = _dirichlet_counts(sizes, n_bins, alpha, rng, idx.size / n_bins)
        if counts.sum(axis=0).min() >= need:
            return _deal(classes, counts)
    raise UserError(
        "data.partition.alpha",
        f"dirichlet_lin could not give every agent of a {n_bins}-agent chunk at least {need} samples "
        f"in {MAX_TRIES} draws with alpha {alpha:g}; use a larger alpha",
    )


def dirichlet_lin(labels: np.ndarray, n_agents: int, seed: int, *, alpha: float = 1.0) -> list[np.ndarray]:
    """The two-stage Dirichlet split of the ARS / AdaGossip code (after Lin et al.'s quasi-global momentum).

    1. Shuffle all sample indices. Cut them into ceil(n/10) contiguous chunks: chunk g serves
       10 agents (min(10, n) when n < 10; the last chunk serves the rest) and holds
       int(10/n * N) samples, the last chunk everything left.
    2. Per chunk with m agents: for each class present, draw Dir(alpha) over the m bins, zero the
       share of bins already holding >= chunk/m samples, renormalize, and cut the class's indices
       by cumulative floor. Redraw the whole chunk (same rng, up to MAX_TRIES) until the smallest
       bin holds >= int(0.5 * chunk/m) samples.
    3. Concatenate all bins (chunk by chunk, bin by bin, each bin in class order) and cut the list
       into n contiguous shards of N // n samples: agent k gets positions [k*L, (k+1)*L). Every
       agent has the same size; the last N - n*L samples go unused; no sample is used twice.
    Shards straddle bin boundaries, so an agent mixes the tail of one bin with the head of the next.
    """
    y = _labels(labels)
    _check_agents(y, n_agents)
    alpha = _check_alpha(alpha)
    rng = _rng(seed)
    perm = rng.permutation(y.size)
    bins = []
    for start, stop, m in _lin_groups(y.size, n_agents):
        bins += _lin_bins(perm[start:stop], y, m, alpha, rng)
    flat = np.concatenate(bins).astype(np.int64)
    shard = y.size // n_agents
    return [flat[k * shard : (k + 1) * shard].copy() for k in range(n_agents)]


_PREFERENCE_STREAM = 0x9AEF  # resample mode: the preferences' own stream of the seed
_RESAMPLE_STREAM = 0x5A3B  # resample mode: the per-batch draws' stream


ClassPools = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(indices sorted by class, each present class's start in them, its size)."""


def class_pools(labels: np.ndarray) -> ClassPools:
    """The training indices grouped by class, for drawing "a class, then a uniform sample of it"."""
    y = _labels(labels)
    order = np.argsort(y, kind="stable")
    _, starts, sizes = np.unique(y[order], return_index=True, return_counts=True)
    return order, starts, sizes


def preference_draw(pools: ClassPools, p: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` training indices: each a class from p, then a uniformly random sample of that class (with replacement)."""
    order, starts, sizes = pools
    cls = rng.choice(sizes.size, size=size, p=p)
    return order[starts[cls] + rng.integers(0, sizes[cls])].astype(np.int64)


def preference_weights(n_agents: int, n_classes: int, seed: int, alpha: float) -> np.ndarray:
    """Resample mode's class preferences: row k is agent k's p_k ~ Dir(alpha), a pure function of the seed."""
    return np.random.default_rng([int(seed), _PREFERENCE_STREAM]).dirichlet(np.full(n_classes, alpha), size=n_agents)


def holdout_split(train_size: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out validation indices), sorted: `fraction` of range(train_size) held out, drawn
    with `seed` (eval.validation_fraction and the run's seed), the same for every agent and engine."""
    count = round(fraction * train_size)
    order = np.random.default_rng([seed, 0x5A1]).permutation(train_size)
    return np.sort(order[count:]), np.sort(order[:count])


def agent_preference(labels: np.ndarray, n_agents: int, seed: int, alpha: float, agent: int) -> tuple[ClassPools, np.ndarray]:
    """What agent `agent` draws its resample-mode batches from: the class pools and its preference p_k."""
    pools = class_pools(labels)
    return pools, preference_weights(n_agents, pools[2].size, seed, alpha)[agent]


def resample_batch(pools: ClassPools, p: np.ndarray, size: int, seed: int, agent: int, draw: int) -> np.ndarray:
    """Batch number `draw` of an agent in resample mode: fresh draws from p, a pure function of (seed, agent, draw)."""
    return preference_draw(pools, p, size, np.random.default_rng([int(seed), int(agent), int(draw), _RESAMPLE_STREAM]))


def preference(
    labels: np.ndarray,
    n_agents: int,
    seed: int,
    *,
    alpha: float = 1.0,
    samples_per_agent: int | None = None,
    resample: bool = False,
) -> list[np.ndarray]:
    """Agent k draws a class preference p_k ~ Dir(alpha), then samples_per_agent samples with replacement.

    Each of agent k's samples picks a class from p_k, then a uniformly random training sample of
    that class (so agents may share samples and repeat them). Default size: N // n.
    With `resample` (the single-merge code's data_sampling_mode: resample) the p_k come from
    preference_weights and the agent draws every minibatch afresh from p_k (resample_batch); the shard
    returned is then one such draw, what the heterogeneity report and the size checks see.
    """
    y = _labels(labels)
    _check_agents(y, n_agents)
    alpha = _check_alpha(alpha)
    if not isinstance(resample, bool):
        raise UserError("data.partition.resample", f"must be true or false, got {resample!r}")
    m = y.size // n_agents
    if samples_per_agent is not None:
        m = _check_count("samples_per_agent", samples_per_agent)
    rng = _rng(seed)
    pools = class_pools(y)
    n_classes = pools[2].size
    if resample:
        weights = preference_weights(n_agents, n_classes, seed, alpha)
        return [preference_draw(pools, weights[k], m, rng) for k in range(n_agents)]
    return [preference_draw(pools, rng.dirichlet(np.full(n_classes, alpha)), m, rng) for _ in range(n_agents)]


def shards(labels: np.ndarray, n_agents: int, seed: int, *, shards_per_agent: int = 2) -> list[np.ndarray]:
    """Sort by label (random order within a class), cut into n*k near-equal shards, deal k random shards each.

    Shard sizes differ by at most one, so the remainder is spread; every sample is used once.
    """
    y = _labels(labels)
    _check_agents(y, n_agents)
    k = _check_count("shards_per_agent", shards_per_agent)
    if n_agents * k > y.size:
        raise UserError(
            "data.partition.shards_per_agent",
            f"{n_agents} agents x {k} shards exceed {y.size} training samples",
        )
    rng = _rng(seed)
    perm = rng.permutation(y.size)
    pieces = np.array_split(perm[np.argsort(y[perm], kind="stable")], n_agents * k)
    deal = rng.permutation(n_agents * k).reshape(n_agents, k)
    return [np.concatenate([pieces[s] for s in row]).astype(np.int64) for row in deal]


def by_key(labels: np.ndarray, n_agents: int, seed: int) -> list[np.ndarray]:
    """Samples sorted by their group (labels: the group id data.partition.key gave each sample), in a seeded order
    within a group, cut into n contiguous parts of nearly equal size: each agent holds few groups, for any data."""
    y = _labels(labels)
    _check_agents(y, n_agents)
    order = _rng(seed).permutation(y.size)
    order = order[np.argsort(y[order], kind="stable")]
    return [part.astype(np.int64) for part in np.array_split(order, n_agents)]


def group_ids(split, key: str) -> np.ndarray:
    """Group id (0, 1, ... in sorted order of the groups) of every sample of a split under the user function
    `key` (an import path, f((input, target)) -> group; the groups must sort among themselves)."""
    import torch

    from raygossip.registry import import_object, one_line

    fn = import_object(key, "data.partition.key")
    try:
        groups = [fn(tuple(t[0] for t in split.batch(torch.tensor([i])))) for i in range(len(split))]
        groups = [g.item() if hasattr(g, "item") else g for g in groups]
        _, ids = np.unique(np.asarray(groups), return_inverse=True)
    except Exception as err:  # the user's key function failed, or its groups do not sort
        raise UserError("data.partition.key", f"{key} raised {one_line(err)}") from None
    return ids.astype(np.int64).reshape(-1)


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid,
    "by_key": by_key,
    "dirichlet": dirichlet,
    "dirichlet_lin": dirichlet_lin,
    "preference": preference,
    "shards": shards,
}


def allowed_params(kind: str) -> list[str]:
    """The keyword parameters a partitioner accepts beyond (labels, n_agents, seed)."""
    return list(keyword_params(PARTITIONERS[kind]))


def partition(
    kind: str, labels: np.ndarray, n_agents: int, seed: int, params: dict | None = None
) -> list[np.ndarray]:
    """Validate kind and params, then run the registered partitioner."""
    if kind not in PARTITIONERS:
        raise UserError("data.partition.kind", f"unknown kind '{kind}' (known: {', '.join(PARTITIONERS)})")
    params = dict(params or {})
    allowed = allowed_params(kind)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise UserError(
            f"data.partition.{unknown[0]}",
            f"not a parameter of '{kind}' (allowed: {', '.join(allowed) or 'none'})",
        )
    return PARTITIONERS[kind](labels, n_agents, seed, **params)


def heterogeneity_report(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> dict:
    """JSON-able summary of how non-IID a partition is.

    - samples_per_agent: min / mean / max of len(part) (repeats counted).
    - classes_per_agent: min / mean / max number of classes making up >= 1% of an agent's samples.
    - dominant_class_share: min / mean / max over agents of the largest class's share of the agent.
    - tv_distance: mean / max over agents of 0.5 * sum_c |p_agent(c) - p_global(c)|, where p_global
      is the label distribution of `labels` (the whole train set); 0 is IID, 1 is disjoint support.
    - class_counts: agents x classes matrix of sample counts.
    An empty agent has distribution all zeros (share 0, TV 0.5).
    """
    y = _labels(labels)
    counts = np.stack([np.bincount(y[p], minlength=num_classes)[:num_classes] for p in parts])
    sizes = counts.sum(axis=1)
    dist = counts / np.maximum(sizes, 1)[:, None]
    glob = np.bincount(y, minlength=num_classes)[:num_classes] / y.size
    held = (dist >= HOLD_SHARE).sum(axis=1)
    tv = 0.5 * np.abs(dist - glob).sum(axis=1)
    return {
        "agents": len(parts),
        "num_classes": int(num_classes),
        "samples_per_agent": _stats(sizes),
        "classes_per_agent": _stats(held) | {"threshold": HOLD_SHARE},
        "dominant_class_share": _stats(dist.max(axis=1)),
        "tv_distance": {"mean": float(tv.mean()), "max": float(tv.max())},
        "class_counts": counts.astype(int).tolist(),
    }


def _stats(v: np.ndarray) -> dict:
    """min / mean / max as plain floats."""
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}
