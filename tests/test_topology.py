"""Table tests for topologies, mixing matrices and their spectral values."""

import json
import math

import networkx as nx
import numpy as np
import pytest

from raygossip.algorithms.topology import (
    TOPOLOGIES,
    Topology,
    build_topology,
    edges_from_graph,
    mixing_matrix,
    topology_from_graph,
)
from raygossip.algorithms.spectral import spectral_report
from raygossip.config_io import dump_yaml
from raygossip.validation import load_config
from raygossip.errors import UserError

WEIGHTS = ["uniform", "metropolis"]

# (name, n, params) covering every registered topology
CASES = [
    ("ring", 16, None),
    ("torus", 16, None),
    ("torus", 12, {"rows": 3}),
    ("circulant", 16, {"offsets": [1, 4]}),
    ("dyck", 32, None),
    ("adagossip_dyck", 32, None),
    ("lcf", 32, {"shifts": [13, -13]}),
    ("petersen", 10, None),
    ("exponential", 16, None),
    ("exponential", 12, None),
    ("one_peer_exponential", 16, None),
    ("complete", 8, None),
    ("random", 16, {"r": 0.2}),
    ("random_regular", 16, {"degree": 3, "seed": 1}),
    ("erdos_renyi", 16, {"p": 0.3, "seed": 2}),
    ("edges", 5, {"edges": [[0, 1], [1, 2], [2, 3], [3, 4], [1, 3]]}),
]
UNIFORM_ONLY = {"random"}  # weights 1/(pulls+1) by definition
REGULAR = {"ring", "torus", "circulant", "dyck", "lcf", "petersen", "exponential", "complete", "random_regular"}


def lam2(name: str, n: int, params: dict | None = None, weights: str = "uniform") -> float:
    return spectral_report(build_topology(name, n, weights, params))["lambda2"]


def test_registry_covers_cases() -> None:
    assert {case[0] for case in CASES} == set(TOPOLOGIES)


# ---------------------------------------------------------------- spectral values

# Uniform weights; the 16/32-ring and circulant values are DESIGN.md's reference numbers.
LAMBDA2 = [
    ("ring", 16, None, 0.949),
    ("ring", 32, None, 0.987),
    ("circulant", 16, {"offsets": [1, 4]}, 0.600),
    ("circulant", 16, {"offsets": [1, 5]}, 0.723),
    ("torus", 16, None, 0.600),  # the 4x4 torus is isomorphic to C16(1, 4)
    ("dyck", 32, None, (1 + math.sqrt(5)) / 4),  # adjacency spectrum +-3, +-sqrt5, +-1: 0.809
    ("adagossip_dyck", 32, None, 0.854),  # the AdaGossip code's own "Dyck" adjacency list
    ("lcf", 32, {"shifts": [13, -13]}, 0.854),  # DESIGN.md's "Dyck-32" reference value is this graph's
    ("lcf", 32, {"shifts": [5, -5]}, 0.913),  # DESIGN.md's LCF [5,-5]^16, which is not the Dyck graph
    ("petersen", 10, None, 0.5),  # adjacency spectrum 3, 1, -2 -> (1 + 1) / 4
    ("complete", 8, None, 0.0),  # W = J / n
    ("exponential", 16, None, 0.5),  # circulant: max over k of |1 + 2 sum cos| / 8
    ("one_peer_exponential", 16, None, 0.0),  # period product is the exact average
]


@pytest.mark.parametrize("name,n,params,expected", LAMBDA2)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_lambda2(name: str, n: int, params: dict | None, expected: float, weights: str) -> None:
    report = spectral_report(build_topology(name, n, weights, params))
    assert report["lambda2"] == pytest.approx(expected, abs=1e-3)
    assert report["spectral_gap"] == pytest.approx(1 - expected, abs=1e-3)


def test_ring_closed_form() -> None:
    for n in (5, 16, 32, 64):
        assert lam2("ring", n) == pytest.approx((1 + 2 * math.cos(2 * math.pi / n)) / 3, abs=1e-12)


def test_path_metropolis_differs_from_uniform() -> None:
    edges = {"edges": [[0, 1], [1, 2], [2, 3]]}
    assert lam2("edges", 4, edges, "uniform") != pytest.approx(lam2("edges", 4, edges, "metropolis"))


# ---------------------------------------------------------------- stochasticity


@pytest.mark.parametrize("name,n,params", CASES)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_mixing_sums(name: str, n: int, params: dict | None, weights: str) -> None:
    weights = "uniform" if name in UNIFORM_ONLY else weights
    topo = build_topology(name, n, weights, params)
    for t in range(topo.period()):
        w = topo.mixing(t)
        assert w.shape == (n, n) and w.dtype == np.float64
        assert (w >= 0).all()
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
        if name in REGULAR or weights == "metropolis" or topo.time_varying:
            np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
        if weights == "metropolis" and not topo.time_varying:
            np.testing.assert_allclose(w, w.T, atol=1e-15)
        for i in range(n):
            assert topo.in_neighbors(i, t) == [j for j in range(n) if j != i and w[i, j] > 0]


def test_uniform_irregular_is_only_row_stochastic() -> None:
    report = spectral_report(build_topology("edges", 3, params={"edges": [[0, 1], [1, 2]]}))
    assert report["row_stochastic"] and not report["doubly_stochastic"] and not report["symmetric"]


@pytest.mark.parametrize(
    "edges,weights,expected",
    [
        ([(0, 1), (1, 2)], "uniform", [[1 / 2, 1 / 2, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 2, 1 / 2]]),
        ([(0, 1), (1, 2)], "metropolis", [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]]),
    ],
)
def test_mixing_matrix_by_hand(edges: list, weights: str, expected: list) -> None:
    np.testing.assert_allclose(mixing_matrix(nx.Graph(edges), weights), expected, atol=1e-15)


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize(
    "name,n,params,nodes,degree,edges",
    [
        ("torus", 16, None, 16, 4, 32),
        ("torus", 15, None, 15, 4, 30),  # 3x5
        ("dyck", 32, None, 32, 3, 48),
        ("adagossip_dyck", 32, None, 32, 3, 48),
        ("petersen", 10, None, 10, 3, 15),
        ("exponential", 16, None, 16, 7, 56),  # distances 1, 2, 4, 8; 8 is its own mirror
        ("circulant", 16, {"offsets": [1, 5]}, 16, 4, 32),
        ("complete", 6, None, 6, 5, 15),
        ("random_regular", 20, {"degree": 4}, 20, 4, 40),
    ],
)
def test_regular_structure(name: str, n: int, params: dict | None, nodes: int, degree: int, edges: int) -> None:
    graph = build_topology(name, n, params=params).graph
    assert graph.number_of_nodes() == nodes and graph.number_of_edges() == edges
    assert {d for _, d in graph.degree()} == {degree}
    assert sorted(graph.nodes) == list(range(nodes))


def test_torus_is_a_wraparound_grid() -> None:
    graph = build_topology("torus", 12, params={"rows": 3, "cols": 4}).graph
    assert nx.is_isomorphic(graph, nx.grid_2d_graph(3, 4, periodic=True))


def test_adagossip_dyck_is_the_authors_adjacency_list_not_the_dyck_graph() -> None:
    graph = build_topology("adagossip_dyck", 32).graph
    assert sorted(graph.neighbors(0)) == [1, 7, 8] and sorted(graph.neighbors(31)) == [15, 24, 30]
    assert sorted(graph.neighbors(17)) == [1, 16, 18]
    assert not nx.is_isomorphic(graph, build_topology("dyck", 32).graph)
    assert not nx.is_isomorphic(graph, build_topology("lcf", 32, params={"shifts": [13, -13]}).graph)


def test_dyck_is_the_dyck_graph() -> None:
    graph = build_topology("dyck", 32).graph
    assert nx.is_bipartite(graph) and nx.girth(graph) == 6 and nx.diameter(graph) == 5
    eig = np.linalg.eigvalsh(nx.to_numpy_array(graph))
    distinct = sorted({round(x, 6) for x in eig})
    np.testing.assert_allclose(distinct, [-3, -math.sqrt(5), -1, 1, math.sqrt(5), 3], atol=1e-6)


def test_random_graphs_are_seeded() -> None:
    for name, params in [("random_regular", {"degree": 3, "seed": 7}), ("erdos_renyi", {"p": 0.2, "seed": 7})]:
        a, b = (build_topology(name, 24, params=params).graph for _ in range(2))
        assert sorted(a.edges) == sorted(b.edges) and nx.is_connected(a)


def test_from_graph_relabels_sorted() -> None:
    topo = topology_from_graph(nx.Graph([("c", "b"), ("b", "a")]), "metropolis", name="path")
    assert (topo.name, topo.n, topo.in_neighbors(0), topo.in_neighbors(1)) == ("path", 3, [1], [0, 2])
    assert topo.graph.has_edge(0, 1) and topo.graph.has_edge(1, 2) and not topo.graph.has_edge(0, 2)


def test_static_topology_basics() -> None:
    topo = build_topology("ring", 8)
    assert isinstance(topo, Topology) and not topo.time_varying and topo.period() == 1
    assert np.array_equal(topo.mixing(0), topo.mixing(5)) and topo.in_neighbors(0) == [1, 7]
    topo.mixing()[0, 0] = 99.0  # callers get a copy
    assert topo.mixing()[0, 0] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- one-peer exponential


@pytest.mark.parametrize("n", [2, 8, 16, 32])
def test_one_peer_exponential(n: int) -> None:
    topo = build_topology("one_peer_exponential", n)
    period = int(math.log2(n))
    assert topo.time_varying and topo.graph is None and topo.period() == period
    prod = np.eye(n)
    for t in range(period):
        w = topo.mixing(t)
        assert ((w > 0).sum(axis=1) == 2).all()
        assert topo.in_neighbors(3 % n, t) == [(3 - 2**t) % n]
        np.testing.assert_array_equal(w, topo.mixing(t + period))
        prod = w @ prod
    if n > 2:
        assert not np.array_equal(topo.mixing(0), topo.mixing(1))
    np.testing.assert_allclose(prod, np.full((n, n), 1.0 / n), atol=1e-12)


def test_one_peer_report() -> None:
    report = spectral_report(build_topology("one_peer_exponential", 16, "metropolis"))
    assert report["weights"] == "metropolis" and report["period"] == 4 and report["diameter"] is None
    assert report["doubly_stochastic"] and not report["symmetric"]
    assert (report["min_degree"], report["max_degree"], report["edges"]) == (1, 1, 56)


# ---------------------------------------------------------------- random pulls (the single-merge paper's topology)


@pytest.mark.parametrize(
    "n,r,base,pulls",
    [
        (16, 0.2, None, {0, 1}),
        (16, 1.0, None, {1}),
        (16, 2.5, None, {2, 3}),
        (8, 7, None, {7}),  # everyone: the exact average
        (16, 1.5, {"name": "ring"}, {1, 2}),
        (16, 2, {"name": "circulant", "params": {"offsets": [1, 4]}}, {2}),
    ],
)
def test_random_rows_pull_floor_r_plus_a_coin_with_equal_weights(n: int, r: float, base: dict | None, pulls: set) -> None:
    topo = build_topology("random", n, params={"r": r, "base": base})
    allowed = build_topology(base["name"], n, params=base.get("params")) if base else build_topology("complete", n)
    seen = set()
    for t in range(40):
        w = topo.mixing(t, seed=3)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
        for i in range(n):
            pulled = topo.in_neighbors(i, t, seed=3)
            seen.add(len(pulled))
            assert set(pulled) <= set(allowed.in_neighbors(i))
            assert w[i, i] == 1 / (len(pulled) + 1) and all(w[i, j] == 1 / (len(pulled) + 1) for j in pulled)
            assert np.count_nonzero(w[i]) == len(pulled) + 1
    assert seen == pulls


def test_random_pulls_with_probability_frac_r_and_uniformly() -> None:
    topo = build_topology("random", 16, params={"r": 0.2})
    ws = np.stack([topo.mixing(t, seed=0) for t in range(3000)])
    pulled = (ws > 0).sum(axis=2) - 1  # rounds x agents
    assert pulled.mean() == pytest.approx(0.2, abs=0.01)
    counts = (ws > 0).sum(axis=0) - np.eye(16) * 3000  # how often i pulled j
    off = counts[~np.eye(16, dtype=bool)]
    assert off.mean() == pytest.approx(0.2 * 3000 / 15, abs=2)
    assert off.min() > 15 and off.max() < 70  # uniform over the 15 others (expected 40 each)


def test_random_is_seeded_time_varying_and_never_periodic() -> None:
    topo = build_topology("random", 16, params={"r": 1.2})
    assert topo.time_varying and topo.period() == 0 and topo.graph is None
    np.testing.assert_array_equal(topo.mixing(5, seed=1), build_topology("random", 16, params={"r": 1.2}).mixing(5, seed=1))
    assert not np.array_equal(topo.mixing(5, seed=1), topo.mixing(6, seed=1))
    assert not np.array_equal(topo.mixing(5, seed=1), topo.mixing(5, seed=2))


def test_random_expected_w_and_report() -> None:
    report = spectral_report(build_topology("random", 16, params={"r": 0.2}))
    # E[W] = 0.9 I + 0.1/15 (J - I): second eigenvalue 0.9 - 0.1/15
    assert report["lambda2"] == pytest.approx(0.9 - 0.1 / 15, abs=1e-12)
    expected = {"min_degree": 0, "max_degree": 1, "edges": 120, "period": 0, "time_varying": True,
                "row_stochastic": True, "doubly_stochastic": False, "symmetric": False, "diameter": None}
    assert {k: report[k] for k in expected} == expected
    assert spectral_report(build_topology("random", 8, params={"r": 7}))["lambda2"] == pytest.approx(0.0, abs=1e-12)
    ring = spectral_report(build_topology("random", 16, params={"r": 2, "base": {"name": "ring"}}))
    assert ring["lambda2"] == pytest.approx(spectral_report(build_topology("ring", 16))["lambda2"], abs=1e-12)
    assert ring["edges"] == 16


# ---------------------------------------------------------------- report


@pytest.mark.parametrize("name,n,params", CASES)
def test_report_is_json(name: str, n: int, params: dict | None) -> None:
    report = spectral_report(build_topology(name, n, "uniform" if name in UNIFORM_ONLY else "metropolis", params))
    keys = {"name", "agents", "weights", "lambda2", "spectral_gap", "min_degree", "max_degree", "doubly_stochastic",
            "symmetric", "row_stochastic", "time_varying", "edges", "diameter"}
    assert keys <= report.keys()
    assert json.loads(json.dumps(report)) == report
    assert (report["name"], report["agents"]) == (name, n)


def test_ring_report_values() -> None:
    report = spectral_report(build_topology("ring", 16))
    expected = {"min_degree": 2, "max_degree": 2, "edges": 16, "diameter": 8, "time_varying": False,
                "doubly_stochastic": True, "symmetric": True, "row_stochastic": True}
    assert {k: report[k] for k in expected} == expected


# ---------------------------------------------------------------- errors

ERRORS = [
    # (name, n, weights, params, field)
    ("rng", 16, "uniform", None, "topology.name"),
    (None, 16, "uniform", None, "topology.name"),
    ("ring", 16, "maxdegree", None, "topology.weights"),
    ("ring", 2, "uniform", None, "agents.count"),
    ("ring", 0, "uniform", None, "agents.count"),
    ("ring", "16", "uniform", None, "agents.count"),
    ("ring", 16, "uniform", {"k": 2}, "topology.params.k"),
    ("ring", 16, "uniform", [1, 4], "topology.params"),
    ("dyck", 16, "uniform", None, "agents.count"),
    ("adagossip_dyck", 16, "uniform", None, "agents.count"),
    ("random", 16, "uniform", None, "topology.params.r"),  # required
    ("random", 16, "uniform", {"r": 0}, "topology.params.r"),
    ("random", 16, "uniform", {"r": "0.2"}, "topology.params.r"),
    ("random", 16, "uniform", {"r": 16}, "topology.params.r"),  # only 15 others
    ("random", 16, "uniform", {"r": 2.5, "base": {"name": "ring"}}, "topology.params.r"),  # 2 ring neighbours
    ("random", 16, "metropolis", {"r": 0.2}, "topology.weights"),
    ("random", 16, "uniform", {"r": 0.2, "base": "ring"}, "topology.params.base"),
    ("random", 16, "uniform", {"r": 0.2, "base": {"name": "ring", "weights": "uniform"}}, "topology.params.base"),
    ("random", 16, "uniform", {"r": 0.2, "base": {"name": "random", "params": {"r": 1}}}, "topology.params.base.name"),
    ("random", 16, "uniform", {"r": 0.2, "base": {"name": "one_peer_exponential"}}, "topology.params.base.name"),
    ("random", 16, "uniform", {"r": 0.2, "base": {"name": "rng"}}, "topology.params.base: topology.name"),
    ("random", 16, "uniform", {"r": 0.2, "base": {"name": "torus", "params": {"rows": 3}}},
     "topology.params.base: topology.params.rows"),
    ("petersen", 12, "uniform", None, "agents.count"),
    ("torus", 14, "uniform", None, "agents.count"),  # 2x7 only
    ("torus", 16, "uniform", {"rows": 3}, "topology.params.rows"),
    ("torus", 16, "uniform", {"rows": 4, "cols": 5}, "topology.params.rows"),
    ("torus", 16, "uniform", {"rows": 2, "cols": 8}, "topology.params.rows"),
    ("torus", 16, "uniform", {"cols": "4"}, "topology.params.cols"),
    ("circulant", 16, "uniform", {"offsets": [2, 4]}, "topology.params.offsets"),  # disconnected
    ("circulant", 16, "uniform", {"offsets": [1, 9]}, "topology.params.offsets"),
    ("circulant", 16, "uniform", {"offsets": [0]}, "topology.params.offsets"),
    ("circulant", 16, "uniform", {"offsets": []}, "topology.params.offsets"),
    ("circulant", 16, "uniform", {"offsets": 4}, "topology.params.offsets"),
    ("circulant", 16, "uniform", {"offsets": [1, 1]}, "topology.params.offsets"),
    ("circulant", 16, "uniform", {"offsets": [1.5]}, "topology.params.offsets"),
    ("exponential", 1, "uniform", None, "agents.count"),
    ("one_peer_exponential", 12, "uniform", None, "agents.count"),
    ("random_regular", 16, "uniform", {"degree": 16}, "topology.params.degree"),
    ("random_regular", 15, "uniform", {"degree": 3}, "topology.params.degree"),  # n*d odd
    ("random_regular", 16, "uniform", {"degree": True}, "topology.params.degree"),
    ("random_regular", 16, "uniform", {"seed": -1}, "topology.params.seed"),
    ("random_regular", 16, "uniform", {"degree": 1}, "topology.params.degree"),  # a matching
    ("erdos_renyi", 16, "uniform", {"p": 0.0}, "topology.params.p"),
    ("erdos_renyi", 16, "uniform", {"p": "0.3"}, "topology.params.p"),
    ("erdos_renyi", 16, "uniform", {"p": 1e-6}, "topology.params.p"),  # never connected
    ("edges", 4, "uniform", None, "topology.params.edges"),  # required
    ("edges", 4, "uniform", {"edges": [[0, 1], [2, 3]]}, "topology.params.edges"),  # disconnected
    ("edges", 4, "uniform", {"edges": [[0, 1], [1, 2]]}, "topology.params.edges"),  # isolated node 3
    ("edges", 3, "uniform", {"edges": [[0, 1], [1, 2], [2, 2]]}, "topology.params.edges"),  # self-loop
    ("edges", 3, "uniform", {"edges": [[0, 1], [1, 3]]}, "topology.params.edges"),  # out of range
    ("edges", 3, "uniform", {"edges": [[0, 1, 2]]}, "topology.params.edges"),
    ("edges", 3, "uniform", {"edges": "0-1"}, "topology.params.edges"),
]


def assert_user_error(excinfo: pytest.ExceptionInfo, field: str) -> None:
    text = str(excinfo.value)
    assert excinfo.value.field == field and text.startswith(f"{field}: ") and "\n" not in text


@pytest.mark.parametrize("name,n,weights,params,field", ERRORS)
def test_build_errors(name: str, n: int, weights: str, params: dict | None, field: str) -> None:
    with pytest.raises(UserError) as excinfo:
        build_topology(name, n, weights, params)
    assert_user_error(excinfo, field)


def test_error_messages_list_allowed() -> None:
    with pytest.raises(UserError, match="allowed: adagossip_dyck, circulant, complete, dyck"):
        build_topology("rng", 16)
    with pytest.raises(UserError, match="allowed: metropolis, uniform"):
        build_topology("ring", 16, "max")
    with pytest.raises(UserError, match="allowed: cols, rows"):
        build_topology("torus", 16, params={"size": 4})
    with pytest.raises(UserError, match="agents.count: topology 'dyck' has exactly 32 nodes, got 16"):
        build_topology("dyck", 16)


@pytest.mark.parametrize(
    "graph,weights",
    [
        (nx.Graph([(0, 1), (2, 3)]), "uniform"),  # disconnected
        (nx.Graph([(0, 1), (1, 1)]), "uniform"),  # self-loop
        (nx.path_graph(3).copy(), "uniform"),  # isolated node added below
        (nx.DiGraph([(0, 1), (1, 0)]), "uniform"),  # directed
        (nx.Graph(), "uniform"),  # empty
    ],
)
def test_from_graph_errors(graph: nx.Graph, weights: str) -> None:
    if graph.number_of_nodes() == 3:
        graph.add_node(7)
    with pytest.raises(UserError) as excinfo:
        topology_from_graph(graph, weights)
    assert_user_error(excinfo, "topology.graph")


def test_from_graph_bad_weights() -> None:
    with pytest.raises(UserError) as excinfo:
        topology_from_graph(nx.path_graph(3), "max")
    assert_user_error(excinfo, "topology.weights")


# ---------------------------------------------------------------- a networkx graph as the config's topology


def test_a_graph_becomes_the_edges_topology_over_sorted_relabelled_nodes():
    graph = nx.Graph([("c", "a"), ("a", "b"), ("b", "c"), ("c", "d")])
    count, section = edges_from_graph(graph, "metropolis")
    assert count == 4
    assert section == {"name": "edges", "weights": "metropolis", "params": {"edges": [[0, 1], [0, 2], [1, 2], [2, 3]]}}
    built = build_topology(section["name"], count, section["weights"], section["params"])
    np.testing.assert_array_equal(built.mixing(), topology_from_graph(graph, "metropolis").mixing())


def test_load_config_takes_a_graph_for_the_topology_and_its_yaml_loads_back(tmp_path):
    graph = nx.petersen_graph()
    config = load_config(base={"topology": graph}, overrides=["topology.weights=metropolis"])
    assert config.agents.count == 10 and config.topology.name == "edges"
    assert config.topology.weights == "metropolis" and len(config.topology.params["edges"]) == 15
    (tmp_path / "config.yaml").write_text(dump_yaml(config))
    assert load_config(tmp_path / "config.yaml") == config
    assert load_config(base={"topology": graph, "agents": {"count": 10}}).agents.count == 10


@pytest.mark.parametrize("base, field, words", [
    ({"topology": nx.petersen_graph(), "agents": {"count": 8}}, "agents.count", "10 nodes"),
    ({"topology": nx.Graph([(0, 1), (2, 3)])}, "topology", "disconnected"),
    ({"topology": nx.DiGraph([(0, 1), (1, 0)])}, "topology", "undirected"),
    ({"topology": nx.Graph([(0, 0), (0, 1)])}, "topology", "self-loops"),
])
def test_a_graph_that_cannot_be_the_topology_is_a_one_line_error(base, field, words):
    with pytest.raises(UserError) as caught:
        load_config(base=base)
    assert caught.value.field == field and words in str(caught.value) and "\n" not in str(caught.value)


def test_edges_from_graph_refuses_what_is_not_a_graph():
    with pytest.raises(UserError) as caught:
        edges_from_graph([[0, 1], [1, 2]])
    assert caught.value.field == "topology" and "networkx graph" in str(caught.value)
