"""The Ray-free gossip node over the in-process transport: which letters count, with what weight, after what."""

from __future__ import annotations

import dataclasses

import torch

from raygossip.validation import load_config
from raygossip.core.agent import AgentCore
from raygossip.core.node import GossipNode, NodeOptions
from raygossip.core.transports import InProcessTransport
from raygossip.core.wire import Kind
from raygossip.engines.common import prepare
from raygossip.presets import quickstart

CHOCO = {"rule": "choco", "gamma": 0.5, "compressor": {"name": "top_k", "ratio": 0.2}}


def make_nodes(gossip: dict, mode: str = "sync", track_links: bool = False) -> list[GossipNode]:
    """4 agents on a ring, digits MLP, D-PSGD or CHOCO every step."""
    data = quickstart()
    data["agents"] = {"count": 4}
    data["model"] = {"name": "mlp", "hidden": [16]}
    data["train"].update(epochs=1, steps_per_epoch=8)
    data["gossip"] = gossip
    data["schedule"]["averaging_rate"] = {"kind": "constant", "gamma0": 1.0 if gossip["rule"] == "dpsgd" else 0.5}
    config = load_config(base=data)
    setup = prepare(config)
    plan = setup.plan
    nodes: dict[int, GossipNode] = {}
    transport = InProcessTransport(nodes)
    for i in range(4):
        core = AgentCore(i, config, setup.dataset, setup.shards[i], plan.total_steps, track_links=track_links)
        nodes[i] = GossipNode(core, plan, transport, NodeOptions(mode=mode, wait_timeout_s=5.0))
    return [nodes[i] for i in range(4)]


def step_round(nodes: list[GossipNode], round_index: int, senders=None) -> list[torch.Tensor]:
    """One local step and one gossip round of these nodes; returns their parameters after the local step."""
    for node in nodes:
        node.local_step()
    halves = [node.core.parameters_vector() for node in nodes]
    for node in nodes:
        if senders is None or node.agent_id in senders:
            node.send_round(round_index)
    for node in nodes:
        node.finish_round(round_index)
    return halves


def test_dpsgd_with_gamma_one_averages_each_agent_with_its_two_ring_neighbours():
    nodes = make_nodes({"rule": "dpsgd"})
    halves = step_round(nodes, 0)
    for i, node in enumerate(nodes):
        want = (halves[i] + halves[(i - 1) % 4] + halves[(i + 1) % 4]) / 3
        torch.testing.assert_close(node.core.parameters_vector(), want)


def test_a_dropped_peer_gives_its_weight_to_the_self_weight():
    nodes = make_nodes({"rule": "dpsgd"})
    live = nodes[:3]
    for node in live:
        node.news.peer_dropped(3)
    halves = step_round(live, 0)
    # agent 0 hears from 1 (1/3) and keeps 3's third for itself: (2 x0 + x1) / 3
    torch.testing.assert_close(live[0].core.parameters_vector(), (2 * halves[0] + halves[1]) / 3)
    assert nodes[0].peers.dropped_weight == nodes[0].peers.in_weights[3]
    assert nodes[1].peers.dropped_weight == 0.0  # 3 is no neighbour of 1


def test_async_dpsgd_counts_a_quiet_neighbour_with_its_last_model():
    nodes = make_nodes({"rule": "dpsgd"}, mode="async")
    step_round(nodes, 0)
    last_of_1 = nodes[1].core.parameters_vector()
    before = [node.core.parameters_vector() for node in nodes]
    step_round(nodes, 1, senders={0, 2, 3})  # agent 1 is slow: nothing from it this round
    assert nodes[0].inbox.counters["reused_models"] == 1 and nodes[2].inbox.counters["reused_models"] == 1
    assert nodes[3].inbox.counters["reused_models"] == 0
    assert all(not torch.equal(a.core.parameters_vector(), b) for a, b in zip(nodes, before))
    # what agent 0 used for agent 1 is the model agent 1 sent in round 0, not its current one
    assert torch.equal(nodes[0].inbox.last_models[1].arrays["values"], nodes[2].inbox.last_models[1].arrays["values"])
    assert not torch.equal(nodes[0].inbox.last_models[1].arrays["values"], last_of_1)


def choco_error(nodes: list[GossipNode]) -> float:
    """max_i |s_i - sum_j W_ij x_hat_j| (0 when every message was applied once and every resync replaced what was known)."""
    error = 0.0
    for node in nodes:
        want = sum(w * nodes[j].core.state.x_hat for j, w in node.peers.in_weights.items())
        error = max(error, float((node.core.state.s - want).abs().max()))
    return error


def test_choco_keeps_s_equal_to_the_weighted_public_copies_and_a_resync_restores_it():
    nodes = make_nodes(CHOCO, track_links=True)
    for r in range(3):
        step_round(nodes, r)
    assert choco_error(nodes) < 1e-6
    # agent 1's message of a round to agent 0 is lost on the way (a LOST letter takes its place)
    for node in nodes:
        node.local_step()
    nodes[1].outbox.transport = InProcessTransport({0: _Swallow(nodes[0]), 2: nodes[2]})
    for node in nodes:
        node.send_round(3)
    for node in nodes:
        node.finish_round(3)
    assert choco_error(nodes) > 1e-4
    nodes[1].outbox.transport = nodes[0].outbox.transport
    nodes[1].outbox.incarnation = 1  # as after a restart: a new stream to agent 0 that opens with the whole public copy
    nodes[1].peers.sent_seq[0] = 0
    with nodes[1].lock:
        nodes[1].outbox.post_resync(0)
    nodes[0].inbox.absorb_ready(4, [], nodes[0].round_plan(3))
    assert nodes[0].inbox.counters["resyncs"] == 1
    assert choco_error(nodes) < 1e-6


class _Swallow:
    """The way to `receiver` loses every gossip letter's message: the receiver gets a LOST letter in its place (as
    from fault injection or a message whose object-store copy died), so a sync round does not wait for it."""

    def __init__(self, receiver: GossipNode) -> None:
        self.receiver = receiver

    def accept(self, letter) -> None:
        assert letter.kind is Kind.GOSSIP
        self.receiver.accept(dataclasses.replace(letter, kind=Kind.LOST, payload=None))
