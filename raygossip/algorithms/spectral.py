"""The spectral and structural report of a built topology: lambda2, spectral gap, degrees, stochasticity, edges."""

from __future__ import annotations

import networkx as nx
import numpy as np

from .topology import Topology

TOL = 1e-9  # stochasticity / symmetry checks
ZERO = 1e-12  # eigenvalue magnitudes below this are exactly zero (before taking roots)
REPORT_SAMPLES = 8  # rounds (seed 0) whose W(t) a random topology's stochasticity flags are read from


def _period_product(topo: Topology) -> np.ndarray:
    prod = np.eye(topo.n)
    for t in range(topo.period()):
        prod = topo.mixing(t) @ prod  # x(t+1) = W(t) x(t)
    return prod


def _second_magnitude(w: np.ndarray) -> float:
    mags = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
    second = float(mags[1]) if len(mags) > 1 else 0.0
    return 0.0 if second < ZERO else second


def _pairs(topo: Topology) -> set[tuple[int, int]]:
    rounds, agents = range(topo.period()), range(topo.n)
    return {(min(i, j), max(i, j)) for t in rounds for i in agents for j in topo.in_neighbors(i, t)}


def spectral_report(topo: Topology) -> dict:
    """Spectral and structural summary of a topology (JSON-able).

    lambda2 is the second largest eigenvalue magnitude of W; spectral_gap = 1 - lambda2. For a
    time-varying topology, lambda2 = |lambda_2(W(p-1) ... W(0))| ** (1/p) over one period p (the
    per-round contraction; 0 for one-peer exponential, whose period product is the exact average),
    degrees are per-round in-degrees, edges counts distinct undirected pairs used in a period, and
    diameter is null. For a random topology (period 0), lambda2 is that of the expected W, degrees are the
    pulls per round, edges the candidate pairs, and the stochasticity flags hold for each of its first
    REPORT_SAMPLES rounds' W(t) (seed 0); pulls_per_round is r.
    """
    if topo.pulls is not None:
        ws = [topo.pulls.sample(t, 0) for t in range(REPORT_SAMPLES)]
        lam = _second_magnitude(topo.pulls.expected())
        whole = int(topo.pulls.r)
        degrees = [whole, whole + int(topo.pulls.r > whole)]
        edges = len({(min(i, j), max(i, j)) for i, row in enumerate(topo.pulls.candidates) for j in row})
    else:
        ws = [topo.mixing(t) for t in range(topo.period())]
        if topo.time_varying:
            lam = _second_magnitude(_period_product(topo)) ** (1.0 / topo.period())
            degrees = [len(topo.in_neighbors(i, t)) for t in range(topo.period()) for i in range(topo.n)]
        else:
            lam = _second_magnitude(ws[0])
            degrees = [d for _, d in topo.graph.degree()]
        edges = topo.graph.number_of_edges() if topo.graph is not None else len(_pairs(topo))
    ones = np.ones(topo.n)
    rows = all(np.allclose(w.sum(axis=1), ones, atol=TOL) and (w >= 0).all() for w in ws)
    cols = all(np.allclose(w.sum(axis=0), ones, atol=TOL) for w in ws)
    report = {
        "name": topo.name,
        "agents": topo.n,
        "weights": topo.weights,
        "lambda2": lam,
        "spectral_gap": 1.0 - lam,
        "min_degree": int(min(degrees)),
        "max_degree": int(max(degrees)),
        "doubly_stochastic": bool(rows and cols),
        "symmetric": bool(all(np.allclose(w, w.T, atol=TOL) for w in ws)),
        "row_stochastic": bool(rows),
        "time_varying": topo.time_varying,
        "period": topo.period(),
        "edges": edges,
        "diameter": None if topo.time_varying else int(nx.diameter(topo.graph)),
    }
    if topo.pulls is not None:
        report["pulls_per_round"] = topo.pulls.r
    return report
