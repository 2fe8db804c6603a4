"""Links that heal (issue 27): with CHOCO/AdaGossip a receiver that misses a sender's message asks it for its whole
public copy, so that s_i = sum_j W_ij x_hat_j holds again two rounds later; `recovery: none` keeps the lossy link."""

from __future__ import annotations

import pytest
import torch

from raygossip.engines.reference import ReferenceEngine
from raygossip.errors import UserError
from raygossip.validation import load_config

from conftest import assert_same_run, run_ray, small
from test_node import CHOCO, choco_error, make_nodes, step_round


def test_a_lost_choco_message_is_healed_by_a_resync_two_rounds_later():
    """Agent 1's message of round 3 to agent 0 is lost: agent 0 asks, agent 1 answers with its whole public copy at its
    send of round 5, ahead of that round's message; the invariant holds again after round 5, at float tolerance."""
    nodes = make_nodes(CHOCO, track_links=True)  # (as a run with faults.drop_messages and recovery resync)
    fates = iter([(False, 0.0)] * 6 + [(True, 0.0)] + [(False, 0.0)] * 100)  # rounds 0-2: 2 letters each; round 3: the first
    nodes[1].outbox.fate = lambda: next(fates)
    errors = []
    for r in range(7):
        step_round(nodes, r)
        errors.append(choco_error(nodes))
    assert max(errors[:3]) < 1e-6 and errors[3] > 1e-4 and errors[4] > 1e-4, errors
    assert max(errors[5:]) < 1e-6, errors
    assert nodes[0].inbox.counters["lost_messages"] == 1 and nodes[0].inbox.counters["resyncs_asked"] == 1
    assert nodes[1].outbox.counters["resyncs_sent"] == 1 and nodes[0].inbox.counters["resyncs"] == 1
    assert nodes[1].outbox.counters["resync_bytes"] == nodes[1].core.state.x_hat.numel() * 4


def test_a_request_and_its_answer_travel_between_agents_with_no_link_between_them():
    """A resync request is a letter in the asker's stream to the sender, whatever the graph (the in-process transport
    and the Ray engine's reach every agent): on a ring of 4, agents 0 and 2 are no neighbours, and agent 2 still
    gets agent 0's request and answers it with its whole public copy two rounds later (counted with weight 0)."""
    nodes = make_nodes(CHOCO)
    step_round(nodes, 0)
    with nodes[0].lock:
        nodes[0].outbox.ask(2, 0)
    assert nodes[2].inbox.mailbox.asks == [(0, 0)]
    step_round(nodes, 1)
    assert nodes[2].outbox.counters["resyncs_sent"] == 0
    step_round(nodes, 2)
    assert nodes[2].outbox.counters["resyncs_sent"] == 1 and nodes[0].inbox.mailbox.taken_round[2] == 2
    assert nodes[0].inbox.counters["resyncs"] == 0 and choco_error(nodes) < 1e-6


def reference_run(drop: float, recovery: str, rule: str = "choco") -> dict:
    data = small(runtime__engine="reference", faults__drop_messages=drop, faults__recovery=recovery)
    data["gossip"] = {**CHOCO, "rule": rule}
    data["schedule"]["averaging_rate"] = {"kind": "constant"}
    return ReferenceEngine(load_config(base=data)).run(progress=False)["extra"]


@pytest.mark.parametrize("rule", ["choco", "adagossip"])
def test_ten_percent_of_messages_lost_with_resync_keeps_the_invariant_and_without_does_not(rule):
    healed, lossy = reference_run(0.1, "resync", rule), reference_run(0.1, "none", rule)
    assert healed["lost_messages"] > 10 and healed["lost_messages"] == lossy["lost_messages"]  # (the same seeded losses)
    assert healed["public_copy_error"] <= 1e-4, healed
    assert lossy["public_copy_error"] > 1e-2, lossy
    assert 0 < healed["resyncs_asked"] <= healed["lost_messages"] and healed["resyncs_sent"] == healed["resyncs_asked"]
    assert healed["resync_bytes"] > 0 and lossy["resyncs_asked"] == lossy["resync_bytes"] == 0


@pytest.mark.parametrize("section, field", [
    ({"faults": {"drop_messages": 0.1, "recovery": "retry"}}, "faults.recovery"),
    ({"timeline": [{"round": 2, "action": "link", "loss": 0.1, "recovery": "sometimes"}]}, "timeline[0].recovery"),
    ({"timeline": [{"round": 2, "action": "heal", "recovery": "none"}]}, "timeline[0].recovery"),
])
def test_a_wrong_recovery_is_one_line_naming_its_field(section, field):
    data = small()
    data.update(section)
    with pytest.raises(UserError) as caught:
        load_config(base=data)
    assert caught.value.field == field and "\n" not in str(caught.value), str(caught.value)


def test_sync_ray_engine_heals_the_same_messages_at_the_same_rounds_as_the_reference_engine(ray_cluster):
    """4 agents, CHOCO top-k, 10 % of messages lost, recovery resync: the Ray engine's numbers equal the reference
    engine's bit for bit (each resync is applied at the same round on both), and the invariant holds at the end."""
    data = small(faults__drop_messages=0.1)
    data["gossip"] = CHOCO
    data["schedule"]["averaging_rate"] = {"kind": "constant"}
    config = load_config(base=data)
    reference = ReferenceEngine(config)
    expected = reference.run(progress=False)
    engine, outcome = run_ray(config)
    try:
        assert_same_run(engine, outcome, reference, expected)
        extra = outcome["extra"]
        assert extra["public_copy_error"] <= 1e-4 and extra["lost_messages"] == expected["extra"]["lost_messages"] > 0
        assert extra["resyncs_asked"] == expected["extra"]["resyncs_asked"] > 0
        assert extra["resync_bytes"] == expected["extra"]["resync_bytes"]
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["async", "bounded"])
def test_an_asynchronous_ray_run_heals_its_lost_choco_messages(ray_cluster, mode):
    """Async and bounded mode, 2 agents per actor (links in memory and by call), 20 % of messages lost: every loss
    asked for, and the invariant holds at float tolerance at the end (requests open at the end answered too)."""
    data = small(faults__drop_messages=0.2, runtime__mode=mode, runtime__agents_per_actor=2)
    data["gossip"] = CHOCO
    data["schedule"]["averaging_rate"] = {"kind": "constant"}
    engine, outcome = run_ray(load_config(base=data))
    try:
        extra = outcome["extra"]
        assert extra["lost_messages"] > 0 and 0 < extra["resyncs_asked"] <= extra["lost_messages"]
        assert extra["public_copy_error"] <= 1e-4, extra
    finally:
        engine.close()
