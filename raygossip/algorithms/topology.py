"""Communication graphs and their mixing matrices W (who averages with whom, and with what weight).

Over 400 lines because it is the registry: a dozen small graph factories share the weights and checks here (the
spectral report of a built topology is algorithms/spectral.py).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

import networkx as nx
import numpy as np

from ..errors import UserError
from ..registry import keyword_params

WEIGHTS = ("metropolis", "uniform")
_MAX_TRIES = 100  # random graphs are resampled with seed, seed+1, ... until connected


@dataclass(frozen=True)
class RandomPulls:
    """Each round every agent pulls floor(r) distinct random candidates, plus one more with probability frac(r).

    Agent i's row of W(t) is 1/(pulls+1) on itself and on each agent it pulled (row-stochastic, as in the
    single-merge paper's code); candidates[i] are the agents i may pull from (all others, or a base graph's
    neighbours). W(t) is a pure function of (seed, t): every agent derives the same one.
    """

    r: float
    candidates: tuple[tuple[int, ...], ...]

    def sample(self, t: int, seed: int) -> np.ndarray:
        """W(t) for the run's seed."""
        n = len(self.candidates)
        whole, frac = int(self.r), self.r - int(self.r)
        rng = np.random.default_rng([seed, t, 0x4A2D0])
        w = np.zeros((n, n))
        for i, candidates in enumerate(self.candidates):
            pulls = whole + int(rng.random() < frac)
            pulled = rng.choice(np.asarray(candidates), size=pulls, replace=False) if pulls else []
            w[i, i] = 1.0 / (pulls + 1)
            w[i, pulled] = 1.0 / (pulls + 1)
        return w

    def expected(self) -> np.ndarray:
        """E[W(t)] over the draws: self weight E[1/(m+1)], each candidate E[m/(deg (m+1))], m the pulls."""
        n = len(self.candidates)
        whole, frac = int(self.r), self.r - int(self.r)
        w = np.zeros((n, n))
        for i, candidates in enumerate(self.candidates):
            for pulls, chance in ((whole, 1.0 - frac), (whole + 1, frac)):
                if chance > 0:
                    w[i, i] += chance / (pulls + 1)
                    w[i, list(candidates)] += chance * pulls / (len(candidates) * (pulls + 1))
        return w


@dataclass(frozen=True)
class Topology:
    """A communication graph with its mixing matrices; W(t)[i, j] > 0 means agent i receives from j.

    Static topologies have one W (period 1). Time-varying ones cycle through `_rounds`, one W per
    communication round; `graph` is then None. Random ones (`pulls`) draw a fresh W(t) every round from
    the run's seed and never repeat (period 0).
    """

    name: str
    n: int
    time_varying: bool
    graph: nx.Graph | None
    weights: str
    _rounds: tuple[np.ndarray, ...] = field(default=(), repr=False, compare=False)
    pulls: RandomPulls | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pulls is not None:
            return
        if not self._rounds:
            if self.graph is None:
                raise ValueError("Topology needs a graph or explicit per-round mixing matrices")
            object.__setattr__(self, "_rounds", (mixing_matrix(self.graph, self.weights),))
        rounds = tuple(np.array(w, dtype=np.float64) for w in self._rounds)  # private, read-only copies
        for w in rounds:
            if w.shape != (self.n, self.n):
                raise ValueError(f"mixing matrix has shape {w.shape}, expected ({self.n}, {self.n})")
            w.setflags(write=False)
        object.__setattr__(self, "_rounds", rounds)

    def mixing(self, t: int = 0, seed: int = 0) -> np.ndarray:
        """W (n x n, float64) used at communication round t (a fresh copy); `seed` matters only to random ones."""
        if self.pulls is not None:
            return self.pulls.sample(t, seed)
        return self._rounds[t % len(self._rounds)].copy()

    def in_neighbors(self, i: int, t: int = 0, seed: int = 0) -> list[int]:
        """Sorted agents j != i that agent i receives from at round t (W[i, j] > 0)."""
        if not 0 <= i < self.n:
            raise IndexError(f"agent {i} out of range 0..{self.n - 1}")
        row = self.mixing(t, seed)[i] if self.pulls is not None else self._rounds[t % len(self._rounds)][i]
        return [int(j) for j in np.flatnonzero(row > 0) if j != i]

    def support(self) -> np.ndarray:
        """The union of the run's edges: support[i, j] (i != j) when agent i may receive from j at some round, whatever
        the seed (a random topology: every candidate it may pull). What channels and placement are set up for."""
        if self.pulls is not None:
            out = np.zeros((self.n, self.n), dtype=bool)
            for i, candidates in enumerate(self.pulls.candidates):
                out[i, list(candidates)] = True
        else:
            out = np.logical_or.reduce([w > 0 for w in self._rounds])
        np.fill_diagonal(out, False)
        return out

    def period(self) -> int:
        """Rounds after which W(t) repeats: 1 for static graphs, log2(n) for one-peer exponential, 0 (never) for
        random ones."""
        return len(self._rounds)


# ---------------------------------------------------------------- mixing weights


def _check_weights(weights: Any) -> str:
    if weights not in WEIGHTS:
        allowed = ", ".join(WEIGHTS)
        raise UserError("topology.weights", f"unknown weights {weights!r}; allowed: {allowed}")
    return weights


def _node_order(graph: nx.Graph) -> list[Any]:
    """Nodes in sorted order, or insertion order when the labels are not mutually comparable."""
    try:
        return sorted(graph.nodes)
    except TypeError:
        return list(graph.nodes)


def mixing_matrix(graph: nx.Graph, weights: str) -> np.ndarray:
    """W for an undirected graph (rows/columns in sorted node order; self-loops and edge data ignored).

    uniform: W_ij = 1/(deg_i+1) for j in N(i) and j = i.
    metropolis: W_ij = 1/(1+max(deg_i, deg_j)) for j in N(i), W_ii = 1 - sum of the row.
    """
    _check_weights(weights)
    adj = nx.to_numpy_array(graph, nodelist=_node_order(graph), weight=None, dtype=np.float64)
    adj = (adj > 0).astype(np.float64)
    np.fill_diagonal(adj, 0.0)
    deg = adj.sum(axis=1)
    if weights == "uniform":
        return (adj + np.eye(len(deg))) / (deg + 1.0)[:, None]
    w = adj / (1.0 + np.maximum.outer(deg, deg))
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return w


# ---------------------------------------------------------------- validation helpers


def _param(key: str) -> str:
    return f"topology.params.{key}"


def _int(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UserError(_param(key), f"must be an integer, got {value!r}")
    if value < minimum:
        raise UserError(_param(key), f"must be >= {minimum}, got {value}")
    return int(value)


def _need_agents(name: str, n: int, minimum: int) -> None:
    if n < minimum:
        raise UserError("agents.count", f"topology {name!r} needs at least {minimum} agents, got {n}")


def _check_graph(graph: nx.Graph, where: str) -> None:
    """Reject graphs that cannot gossip: directed, empty, self-loops, isolated nodes, disconnected."""
    if graph.is_directed():
        raise UserError(where, "directed graphs are not supported; give an undirected graph")
    if graph.number_of_nodes() == 0:
        raise UserError(where, "graph has no nodes")
    loops = sorted(u for u, _ in nx.selfloop_edges(graph))
    if loops:
        raise UserError(where, f"self-loops are not allowed (at nodes {loops[:5]})")
    isolated = sorted(nx.isolates(graph)) if graph.number_of_nodes() > 1 else []
    if isolated:
        raise UserError(where, f"isolated nodes have no neighbours: {isolated[:5]}")
    if not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise UserError(where, f"graph is disconnected ({parts} components); gossip needs it connected")


def _from_graph(graph: nx.Graph, weights: str, name: str, where: str) -> Topology:
    _check_weights(weights)
    _check_graph(graph, where)
    order = _node_order(graph)
    simple = nx.Graph()
    simple.add_nodes_from(range(len(order)))
    index = {node: k for k, node in enumerate(order)}
    simple.add_edges_from((index[u], index[v]) for u, v in graph.edges())
    return Topology(name, len(order), time_varying=False, graph=nx.freeze(simple), weights=weights)


def topology_from_graph(graph: nx.Graph, weights: str = "uniform", name: str = "custom") -> Topology:
    """A static topology from any undirected networkx graph; nodes relabelled 0..n-1 in sorted order."""
    return _from_graph(graph, weights, name, "topology.graph")


def edges_from_graph(graph: nx.Graph, weights: str = "uniform") -> tuple[int, dict[str, Any]]:
    """(agents.count, topology section) for any undirected networkx graph: the `edges` topology over its
    nodes relabelled 0..n-1 as topology_from_graph does, edges sorted, so a config.yaml records it whole."""
    if not isinstance(graph, nx.Graph):
        raise UserError("topology", f"expected a networkx graph or a mapping, got {type(graph).__name__}")
    _check_weights(weights)
    _check_graph(graph, "topology")
    index = {node: k for k, node in enumerate(_node_order(graph))}
    edges = sorted({tuple(sorted((index[u], index[v]))) for u, v in graph.edges()})
    return len(index), {"name": "edges", "weights": weights, "params": {"edges": [[u, v] for u, v in edges]}}


# ---------------------------------------------------------------- factories (n, **params)


def _ring(n: int) -> nx.Graph:
    _need_agents("ring", n, 3)
    return nx.cycle_graph(n)


def _square_factors(n: int) -> tuple[int, int] | None:
    for rows in range(math.isqrt(n), 2, -1):
        if n % rows == 0 and n // rows >= 3:
            return rows, n // rows
    return None


def _torus(n: int, *, rows: int | None = None, cols: int | None = None) -> nx.Graph:
    _need_agents("torus", n, 9)
    if rows is None and cols is None:
        shape = _square_factors(n)
        if shape is None:
            msg = f"topology 'torus' needs rows*cols = agents.count with rows, cols >= 3; {n} has none"
            raise UserError("agents.count", msg)
        rows, cols = shape
    elif rows is None or cols is None:
        given, key = (rows, "rows") if cols is None else (cols, "cols")
        given = _int(given, key, 3)
        if n % given:
            raise UserError(_param(key), f"{given} does not divide agents.count {n}")
        rows, cols = (given, n // given) if key == "rows" else (n // given, given)
    rows, cols = _int(rows, "rows", 3), _int(cols, "cols", 3)
    if rows * cols != n:
        raise UserError(_param("rows"), f"rows*cols = {rows}*{cols} must equal agents.count {n}")
    return nx.grid_2d_graph(rows, cols, periodic=True)


def _circulant(n: int, *, offsets: list[int] | None = None) -> nx.Graph:
    _need_agents("circulant", n, 3)
    offsets = [1, 4] if offsets is None else offsets
    if not isinstance(offsets, (list, tuple)) or not offsets:
        raise UserError(_param("offsets"), f"must be a non-empty list of integers, got {offsets!r}")
    ks = [_int(k, "offsets", 1) for k in offsets]
    if max(ks) > n // 2:
        raise UserError(_param("offsets"), f"offsets must lie in 1..{n // 2} for {n} agents, got {ks}")
    if len(set(ks)) != len(ks):
        raise UserError(_param("offsets"), f"duplicate offsets {ks}")
    if math.gcd(n, *ks) != 1:
        gcd = math.gcd(n, *ks)
        raise UserError(_param("offsets"), f"C_{n}{tuple(ks)} is disconnected (gcd(n, offsets) = {gcd})")
    return nx.circulant_graph(n, ks)


def _exactly(name: str, n: int, count: int) -> None:
    if n != count:
        raise UserError("agents.count", f"topology {name!r} has exactly {count} nodes, got {n}")


def _dyck(n: int) -> nx.Graph:
    """The Dyck graph F032A: LCF [5,-5,13,-13]^8 (192 automorphisms, spectrum +-3, +-sqrt5, +-1).

    Not [5,-5]^16, which is a different cubic graph on 32 nodes (32 automorphisms).
    """
    _exactly("dyck", n, 32)
    return nx.LCF_graph(32, [5, -5, 13, -13], 8)


def _lcf(n: int, *, shifts: list[int] | None = None, repeats: int | None = None) -> nx.Graph:
    """A cubic graph in LCF notation: a Hamiltonian cycle plus chords `shifts`, repeated `repeats` times.

    LCF [13,-13]^16 on 32 nodes has |lambda_2| = 0.854 with uniform weights, the value of the AdaGossip code's
    "Dyck" graph (`adagossip_dyck`, another graph with the same lambda_2); LCF [5,-5]^16 gives 0.913.
    """
    where = _param("shifts")
    if not isinstance(shifts, (list, tuple)) or not shifts or not all(
        isinstance(k, int) and not isinstance(k, bool) for k in shifts
    ):
        raise UserError(where, f"must be a non-empty list of integers, got {shifts!r}")
    reps = _int(repeats if repeats is not None else n // len(shifts), "repeats", 1)
    if reps * len(shifts) != n:
        raise UserError(_param("repeats"), f"len(shifts) * repeats must equal agents.count {n}, got {len(shifts)} * {reps}")
    graph = nx.Graph(nx.LCF_graph(n, list(shifts), reps))
    graph.remove_edges_from(nx.selfloop_edges(graph))
    _check_graph(graph, where)
    return graph


# The AdaGossip code's DyckGraph (gossip_choco/graph_manager.py), agent by agent: four 8-cycles and their chords.
_ADAGOSSIP_DYCK = (
    (1, 7, 8), (2, 0, 17), (3, 1, 10), (4, 2, 19), (5, 3, 12), (6, 4, 21), (7, 5, 14), (0, 6, 23),
    (9, 15, 0), (10, 8, 25), (11, 9, 2), (12, 10, 27), (13, 11, 4), (14, 12, 29), (15, 13, 6), (8, 14, 31),
    (17, 23, 24), (18, 16, 1), (19, 17, 26), (20, 18, 3), (21, 19, 28), (22, 20, 5), (23, 21, 30), (16, 22, 7),
    (25, 31, 16), (26, 24, 9), (27, 25, 18), (28, 26, 11), (29, 27, 20), (30, 28, 13), (31, 29, 22), (24, 30, 15),
)


def _adagossip_dyck(n: int) -> nx.Graph:
    """The AdaGossip code's 32-node "Dyck" graph, its own labelling: cubic, |lambda_2| = 0.854 with weights 1/4.

    Not the Dyck graph (`dyck`, 0.809) and not isomorphic to LCF [13,-13]^16 either, which has the same lambda_2.
    """
    _exactly("adagossip_dyck", n, 32)
    return nx.Graph([(i, j) for i, peers in enumerate(_ADAGOSSIP_DYCK) for j in peers])


def _petersen(n: int) -> nx.Graph:
    _exactly("petersen", n, 10)
    return nx.petersen_graph()


def _exponential(n: int) -> nx.Graph:
    _need_agents("exponential", n, 2)
    graph = nx.empty_graph(n)
    hops = [2**k for k in range(n.bit_length()) if 2**k < n]
    graph.add_edges_from((i, (i + h) % n) for i in range(n) for h in hops)
    return graph


def _one_peer_round(n: int, hop: int) -> np.ndarray:
    w = 0.5 * np.eye(n)
    rows = np.arange(n)
    w[rows, (rows - hop) % n] += 0.5
    return w


def _one_peer_exponential(n: int) -> Topology:
    _need_agents("one_peer_exponential", n, 2)
    if n & (n - 1):
        msg = f"topology 'one_peer_exponential' needs a power of 2 agents, got {n}"
        raise UserError("agents.count", msg)
    rounds = tuple(_one_peer_round(n, 2**k) for k in range(n.bit_length() - 1))
    return Topology("one_peer_exponential", n, True, None, "uniform", _rounds=rounds)


def _random_candidates(n: int, base: Any) -> tuple[tuple[int, ...], ...]:
    """Whom each agent may pull from: every other agent (base null) or its neighbours in a static base graph."""
    if base is None:
        return tuple(tuple(j for j in range(n) if j != i) for i in range(n))
    where = _param("base")
    if not isinstance(base, dict) or "name" not in base or set(base) - {"name", "params"}:
        raise UserError(where, f"must be null or a topology mapping {{name: ..., params: {{...}}}}, got {base!r}")
    if base["name"] == "random":
        raise UserError(f"{where}.name", "the base of a random topology must be a static graph, not random")
    try:
        topo = build_topology(base["name"], n, "uniform", base.get("params") or {})
    except UserError as error:
        raise UserError(f"{where}: {error.field}", error.message) from None
    if topo.time_varying:
        raise UserError(f"{where}.name", f"{base['name']!r} changes every round; the base must be a static graph")
    return tuple(tuple(topo.in_neighbors(i)) for i in range(n))


def _random(n: int, *, r: float, base: Any = None) -> Topology:
    """Each round each agent pulls floor(r) random others, plus one more with probability frac(r) (RandomPulls)."""
    _need_agents("random", n, 2)
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
        raise UserError(_param("r"), f"must be a number > 0 (pulls per agent and round), got {r!r}")
    candidates = _random_candidates(n, base)
    fewest = min(len(c) for c in candidates)
    if r > fewest:
        among = "other agents" if base is None else f"neighbours in base {base['name']!r}"
        raise UserError(_param("r"), f"must be <= {fewest}, the fewest {among} an agent has; got {r}")
    return Topology("random", n, True, None, "uniform", pulls=RandomPulls(float(r), candidates))


def _complete(n: int) -> nx.Graph:
    _need_agents("complete", n, 1)
    return nx.complete_graph(n)


def _connected_sample(sample: Callable[[int], nx.Graph], seed: int, key: str, what: str) -> nx.Graph:
    """sample(seed), sample(seed + 1), ... until the graph is connected."""
    for s in range(seed, seed + _MAX_TRIES):
        graph = sample(s)
        if nx.is_connected(graph):
            return graph
    last = seed + _MAX_TRIES - 1
    raise UserError(_param(key), f"no connected {what} in {_MAX_TRIES} tries (seeds {seed}..{last})")


def _random_regular(n: int, *, degree: int = 3, seed: int = 0) -> nx.Graph:
    _need_agents("random_regular", n, 3)
    d, seed = _int(degree, "degree", 2), _int(seed, "seed", 0)
    if d >= n or (n * d) % 2:
        msg = f"need degree < agents.count and degree*agents.count even, got {d} with {n} agents"
        raise UserError(_param("degree"), msg)
    what = f"{d}-regular graph on {n} nodes"
    return _connected_sample(partial(nx.random_regular_graph, d, n), seed, "degree", what)


def _erdos_renyi(n: int, *, p: float = 0.3, seed: int = 0) -> nx.Graph:
    _need_agents("erdos_renyi", n, 2)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
        raise UserError(_param("p"), f"must be a number in (0, 1], got {p!r}")
    seed = _int(seed, "seed", 0)
    return _connected_sample(partial(nx.gnp_random_graph, n, float(p)), seed, "p", f"G({n}, {p}) sample")


def _edges(n: int, *, edges: list[list[int]]) -> nx.Graph:
    where = _param("edges")
    if not isinstance(edges, (list, tuple)):
        raise UserError(where, f"must be a list of [u, v] pairs, got {type(edges).__name__}")
    graph = nx.empty_graph(n)
    for pair in edges:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2
        if not ok or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in pair):
            raise UserError(where, f"each edge must be a pair of integers [u, v], got {pair!r}")
        if not all(0 <= v < n for v in pair):
            raise UserError(where, f"edge {list(pair)} has a node outside 0..{n - 1} (agents.count {n})")
        graph.add_edge(int(pair[0]), int(pair[1]))
    _check_graph(graph, where)
    return graph


TOPOLOGIES: dict[str, Callable[..., nx.Graph | Topology]] = {
    "ring": _ring,
    "torus": _torus,
    "circulant": _circulant,
    "dyck": _dyck,
    "adagossip_dyck": _adagossip_dyck,
    "lcf": _lcf,
    "petersen": _petersen,
    "exponential": _exponential,
    "one_peer_exponential": _one_peer_exponential,
    "complete": _complete,
    "random": _random,
    "random_regular": _random_regular,
    "erdos_renyi": _erdos_renyi,
    "edges": _edges,
}
"""Name -> factory(n, **params). Params are the factory's keyword-only arguments."""


def _check_params(name: str, factory: Callable[..., Any], params: Any) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise UserError("topology.params", f"must be a mapping, got {type(params).__name__}")
    allowed = keyword_params(factory)
    for key in params:
        if key not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            msg = f"unknown parameter for topology {name!r}; allowed: {names}"
            raise UserError(_param(str(key)), msg)
    for key, p in allowed.items():
        if p.default is inspect.Parameter.empty and key not in params:
            raise UserError(_param(key), f"required for topology {name!r}")
    return params


def build_topology(name: str, n: int, weights: str = "uniform", params: dict | None = None) -> Topology:
    """The named topology on n agents (see TOPOLOGIES), with `uniform` or `metropolis` weights."""
    if not isinstance(name, str) or name not in TOPOLOGIES:
        allowed = ", ".join(sorted(TOPOLOGIES))
        raise UserError("topology.name", f"unknown topology {name!r}; allowed: {allowed}")
    _check_weights(weights)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError("agents.count", f"must be a positive integer, got {n!r}")
    factory = TOPOLOGIES[name]
    built = factory(int(n), **_check_params(name, factory, {} if params is None else params))
    if isinstance(built, Topology) and built.pulls is not None and weights != "uniform":
        raise UserError("topology.weights", "a random topology weighs each pull 1/(pulls+1); use uniform")
    if isinstance(built, Topology):
        return replace(built, name=name, weights=weights)
    return _from_graph(built, weights, name, "topology.name")
