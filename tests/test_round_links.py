"""Each round's own links: after a drop, every surviving agent mixes with that round's plan row (no Ray).

A dropped peer's weight of the round goes to the self weight; a peer that is no neighbour this round changes
nothing. Checked on graphs whose rows change from round to round: one-peer exponential, random pulls, a random
topology (two seeds), communication phases and a timeline's topology switch.
"""

from __future__ import annotations

import pytest
import torch

from raygossip.validation import load_config
from raygossip.core.agent import AgentCore
from raygossip.core.node import GossipNode, NodeOptions
from raygossip.core.transports import InProcessTransport
from raygossip.engines.common import prepare
from raygossip.presets import quickstart

DROPPED = 3
ROUNDS = 4

GRAPHS = {
    "one_peer_exponential": {"topology": {"name": "one_peer_exponential"}},
    "random_peer": {"schedule": {"communication": {"pull": "random_peer"}}},
    "random_seed_0": {"topology": {"name": "random", "params": {"r": 1}}, "seed": 0},
    "random_seed_1": {"topology": {"name": "random", "params": {"r": 1}}, "seed": 1},
    "phases": {"schedule": {"communication": {"phases": [{"until": 0.25, "kind": "every"},
                                                         {"until": 1.0, "kind": "every", "pull": "random_peer"}]}}},
    "timeline_topology": {"timeline": [{"round": 2, "action": "topology",
                                        "topology": {"name": "one_peer_exponential"}}]},
}


def config_of(graph: dict, corrupt: bool, engine: str | None = None) -> object:
    """8 agents (ring unless the graph says otherwise), digits MLP, D-PSGD with gamma 1, a round every step; with an
    engine, a whole run of 2 epochs in which a diverged agent is dropped."""
    data = quickstart()
    data["agents"] = {"count": 8}
    data["model"] = {"name": "mlp", "hidden": [8]}
    data["train"].update(epochs=1, steps_per_epoch=8)
    data["gossip"] = {"rule": "dpsgd"}
    data["schedule"]["averaging_rate"] = {"kind": "constant", "gamma0": 1.0}
    for key, value in graph.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    if engine is not None:
        data["train"].update(epochs=2, on_divergence="drop")
        data["eval"] = {"every": 1}
        data["runtime"] = {"engine": engine, "num_cpus_per_agent": 0.5, "progress": False, "wait_timeout_s": 30.0}
    if corrupt:  # agent 3's parameters become NaN at round 1: it diverges and is dropped
        data["faults"] = {"corrupt": [{"agent": DROPPED, "round": 1}]}
    return load_config(base=data)


def make_nodes(config) -> list[GossipNode]:
    setup = prepare(config)
    nodes: dict[int, GossipNode] = {}
    transport = InProcessTransport(nodes)
    for i in range(config.agents.count):
        core = AgentCore(i, config, setup.dataset, setup.shards[i], setup.plan.total_steps)
        nodes[i] = GossipNode(core, setup.plan, transport, NodeOptions(mode="sync", wait_timeout_s=5.0))
    return [nodes[i] for i in range(config.agents.count)]


def hand_mix(plan, round_index: int, halves: dict[int, torch.Tensor], agent: int, dropped: set[int]) -> torch.Tensor:
    """Agent's model after round `round_index` with gamma 1: its plan row, each dropped sender's weight on itself."""
    self_weight, row = plan.round_plan(round_index).weights[agent]
    moved = sum(w for j, w in row.items() if j in dropped)
    total = (self_weight + moved) * halves[agent].double()
    for j, w in row.items():
        if j not in dropped:
            total += w * halves[j].double()
    return (total / (self_weight + sum(row.values()))).float()


def drop_diverged(live: list[GossipNode], dropped: set[int]) -> list[GossipNode]:
    """As an engine does with train.on_divergence: drop: the others forget a diverged agent for good."""
    diverged = [node.agent_id for node in live if node.divergence is not None]
    assert diverged in ([], [DROPPED])
    survivors = [node for node in live if node.divergence is None]
    for j in diverged:
        dropped.add(j)
        for node in survivors:
            node.news.peer_dropped(j)
    return survivors


@pytest.mark.parametrize("how", ["failure", "divergence"])
@pytest.mark.parametrize("graph", list(GRAPHS), ids=list(GRAPHS))
def test_a_survivor_mixes_with_the_rounds_own_row_after_a_drop(graph, how):
    config = config_of(GRAPHS[graph], corrupt=how == "divergence")
    nodes = make_nodes(config)
    plan = nodes[0].plan
    live = list(nodes)
    dropped: set[int] = set()
    rows_changed = False
    for r in range(ROUNDS):
        if how == "failure" and r == 1:  # the supervisor's news: agent 3 is gone for good
            live = [node for node in live if node.agent_id != DROPPED]
            dropped.add(DROPPED)
            for node in live:
                node.news.peer_dropped(DROPPED)
        for node in live:
            node.local_step()
        live = drop_diverged(live, dropped)
        halves = {node.agent_id: node.core.parameters_vector() for node in live}
        for node in live:
            node.send_round(r)
        live = drop_diverged(live, dropped)
        for node in live:
            node.finish_round(r)
        for node in live:
            want = hand_mix(plan, r, halves, node.agent_id, dropped)
            torch.testing.assert_close(node.core.parameters_vector(), want, rtol=1e-5, atol=1e-6)
        if r > 0:
            rows_changed |= plan.round_plan(r).weights != plan.round_plan(0).weights
    assert dropped == {DROPPED} and rows_changed  # (the graph did change: round 0's row would be wrong)


def test_one_peer_exponential_after_a_drop_averages_with_the_rounds_one_peer():
    """The issue's figure: with peer 3 dropped, agent 0 of 4 ends round 1 at (x0 + x2) / 2, not (2 x0 + x2) / 3."""
    config = config_of({"agents": {"count": 4}, **GRAPHS["one_peer_exponential"]}, corrupt=False)
    nodes = make_nodes(config)
    live = nodes[:3]
    for node in live:
        node.news.peer_dropped(DROPPED)
    for r in range(2):
        for node in live:
            node.local_step()
        halves = [node.core.parameters_vector() for node in live]
        for node in live:
            node.send_round(r)
        for node in live:
            node.finish_round(r)
    torch.testing.assert_close(nodes[0].core.parameters_vector(), (halves[0] + halves[2]) / 2)
    assert nodes[0].peers.dropped_weight == 0.0  # agent 3 is no neighbour of agent 0 in round 1


def test_the_support_is_every_edge_of_the_run_whatever_the_seed():
    config = config_of(GRAPHS["timeline_topology"], corrupt=False)
    support = prepare(config).plan.support()
    n = config.agents.count
    ring = {(i, (i + 1) % n) for i in range(n)} | {(i, (i - 1) % n) for i in range(n)}
    hops = {(i, (i - h) % n) for i in range(n) for h in (1, 2, 4)}
    assert {(int(i), int(j)) for i, j in zip(*support.nonzero())} == ring | hops
    random = [prepare(config_of(GRAPHS[f"random_seed_{s}"], corrupt=False)).plan.support() for s in (0, 1)]
    assert (random[0] == random[1]).all() and random[0].sum() == n * (n - 1)


@pytest.mark.parametrize("graph", ["one_peer_exponential", "random_peer", "random_seed_1", "timeline_topology"])
def test_the_ray_engine_drops_on_a_changing_graph_as_the_reference_engine_does(ray_cluster, graph):
    """Sync mode, agent 3 diverges at round 1 and is dropped: bit for bit the reference engine's models and records.

    Only the traffic may differ: on a graph that changes, an agent that does not wait on agent 3 in round 1 may send
    to it in round 2 before the coordinator's news of the drop reaches it (the reference engine drops it at once)."""
    from conftest import run_ray
    from raygossip.engines.reference import ReferenceEngine

    spec = {**GRAPHS[graph], "agents": {"count": 4}}
    if graph == "timeline_topology":
        spec["timeline"] = [{"round": 2, "action": "topology", "topology": {"name": "complete"}}]
    config = config_of(spec, corrupt=True, engine="ray")
    reference = ReferenceEngine(config)
    expected = reference.run(progress=False)
    engine, outcome = run_ray(config)
    try:
        assert outcome["extra"]["dropped_agents"] == [DROPPED]
        for got, want in zip(engine.agent_vectors(), reference.agent_vectors()):
            assert torch.equal(got, want)
        assert len(outcome["records"]) == len(expected["records"])
        for got, want in zip(outcome["records"], expected["records"]):
            for key in ("local_test_accuracy", "merged_test_accuracy", "consensus_distance", "train_loss", "gamma",
                        "round", "communication_rounds", "agents"):
                assert got.get(key) == want.get(key), key
            assert got["messages_sent"] >= want["messages_sent"]
        assert outcome["merged_accuracy"] == expected["merged_accuracy"]
    finally:
        engine.close()


def test_choco_forgets_a_dropped_agents_public_copy_on_the_reference_engine():
    """A diverged CHOCO agent dropped: its known public copy leaves every neighbour's s (s_i = sum_j W_ij x_hat_j
    over the agents left, public_copy_error 0), so its weight on the self weight is not counted twice."""
    from raygossip.engines.reference import ReferenceEngine
    from test_divergence import diverging

    data = diverging("drop")
    data["gossip"] = {"rule": "choco", "gamma": 0.5, "compressor": {"name": "top_k", "ratio": 0.2}}
    data["train"].update(epochs=2)
    outcome = ReferenceEngine(load_config(base=data)).run(progress=False)
    assert [e["agent"] for e in outcome["events"] if e["kind"] == "agent_dropped"] == [2]
    assert outcome["extra"]["public_copy_error"] < 1e-5


def test_graph_links_move_close_and_open_with_a_timelines_partition():
    """GraphLinks alone: on a ring of 8 split into halves at round 2 and healed at round 4, agent 3's link from 4
    goes to weight 0 at round 2 (once), and opens again, both ways, at round 4."""
    from raygossip.core.graph_links import GraphLinks

    config = config_of({"timeline": [{"round": 2, "action": "partition", "groups": [[0, 1, 2, 3], [4, 5, 6, 7]]},
                                     {"round": 4, "action": "heal"}]}, corrupt=False)
    links = GraphLinks(prepare(config).plan, 3)
    assert links.weight[4] == pytest.approx(1 / 3) and links.weight[5] == 0.0
    assert [links.changed(r) for r in (0, 1, 2, 2, 3, 4)] == [False, False, True, False, False, True]
    assert links.move(4, 2) == (pytest.approx(1 / 3), 0.0) and links.move(4, 2) is None and links.move(4, 1) is None
    assert links.move(2, 2) is None  # (same half: its weight stays)
    assert links.opened(2, outgoing=False) == [] and links.opened(4, outgoing=False) == [4]
    assert links.opened(4, outgoing=True) == [4]
