"""Pure pieces of failure handling: fault schedules, mailbox streams across restarts, CHOCO link resync and drop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raygossip.config import FaultsConfig, KillConfig
from raygossip.validation import load_config
from raygossip.core.agent import AgentCore
from raygossip.core.faults import MessageFate, kill_schedule
from raygossip.data.datasets import load_dataset
from raygossip.core.mailbox import Mailbox
from raygossip.core.peers import PeerTable
from raygossip.core.wire import Kind, Letter
from raygossip.errors import UserError
from raygossip.presets import quickstart


@pytest.mark.parametrize(
    "faults, n, rounds, check",
    [
        (FaultsConfig(), 8, 100, lambda s: s == {}),
        (FaultsConfig(kill=[KillConfig(agent=3, round=10)]), 8, 100, lambda s: s == {3: 10}),
        (FaultsConfig(kill_fraction=0.25, kill_round=5), 8, 100, lambda s: len(s) == 2 and set(s.values()) == {5}),
        (FaultsConfig(kill_fraction=0.5), 8, 100, lambda s: len(s) == 4 and all(25 <= r < 75 for r in s.values())),
        (FaultsConfig(kill=[KillConfig(agent=0, round=1)], kill_fraction=0.25, kill_round=9), 8, 100,
         lambda s: s[0] == 1 and len(s) == 3 and sorted(s.values()) == [1, 9, 9]),
    ],
    ids=["none", "listed", "fraction-at-round", "fraction-random-rounds", "listed-plus-fraction"],
)
def test_kill_schedule(faults, n, rounds, check):
    schedule = kill_schedule(faults, n, rounds, seed=0)
    assert check(schedule), schedule
    assert schedule == kill_schedule(faults, n, rounds, seed=0)  # seeded


def test_message_fate_rates_are_seeded_and_close_to_the_asked_fractions():
    faults = FaultsConfig(drop_messages=0.2, delay_messages=0.5, delay_s=0.1)
    fate = MessageFate(faults, 0, 1, 0)
    fates = [fate() for _ in range(4000)]
    again = MessageFate(faults, 0, 1, 0)
    assert fates == [again() for _ in range(4000)]
    lost = sum(f[0] for f in fates) / len(fates)
    late = sum(f[1] > 0 for f in fates) / len(fates)
    assert 0.17 < lost < 0.23 and 0.46 < late < 0.54
    assert MessageFate(FaultsConfig(), 0, 1, 0)() == (False, 0.0)


@pytest.mark.parametrize(
    "faults, field",
    [
        ({"kill": [{"agent": 9, "round": 1}]}, "faults.kill[0].agent"),
        ({"kill": [{"agent": 1}]}, "faults.kill[0].round"),
        ({"kill": [{"agent": 1, "round": 1}, {"agent": 1, "round": 1}]}, "faults.kill"),
        ({"drop_messages": 1.0}, "faults.drop_messages"),
        ({"kill_fraction": -0.1}, "faults.kill_fraction"),
        ({"kill_fraction": 0.05}, "faults.kill_fraction"),  # 0.05 of 8 agents: nobody
        ({"kill": [{"agent": 1, "round": 1, "when": 3}]}, "faults.kill[0].when"),
    ],
)
def test_bad_fault_configs_name_the_field(faults, field):
    data = quickstart()
    data["runtime"] = {"engine": "ray"}
    data["faults"] = faults
    with pytest.raises(UserError) as error:
        load_config(base=data)
    assert error.value.field == field


def test_faults_need_the_ray_engine_and_a_known_policy():
    data = quickstart()
    data["runtime"] = {"engine": "reference"}
    data["faults"] = {"delay_messages": 0.1, "delay_s": 0.1}  # (seeded message losses run on both engines)
    with pytest.raises(UserError, match="faults: fault injection needs runtime.engine: ray"):
        load_config(base=data)
    data["runtime"] = {"on_failure": "retry"}
    data["faults"] = {}
    with pytest.raises(UserError, match="runtime.on_failure: must be one of restart, drop, abort"):
        load_config(base=data)


def letter(sender: int, seq: int, round_index: int, incarnation: int = 0, kind: str = "q") -> Letter:
    return Letter(sender, round_index, Kind(kind), None, 0.0, 0.0, seq=seq, incarnation=incarnation)


def test_mailbox_new_incarnation_replaces_the_old_stream_and_refuses_late_old_letters():
    peers = PeerTable(2, np.ones((3, 3)))
    box = Mailbox([0, 1], peers)
    box.put(letter(1, 0, 0))
    box.put(letter(1, 2, 2))  # seq 1 still on its way: held
    peers.mark_down(1)
    assert box.has_round(1, 5, 1.0)  # down: nobody waits for it
    box.put(letter(1, 0, 3, incarnation=1, kind="full"))  # the restarted sender's first letter
    assert 1 not in peers.down and peers.life[1] == 1 and peers.live([1]) == []  # (no stream to its new life yet)
    assert [l.kind for l in box.queues[1]] == [Kind.FULL]
    box.put(letter(1, 1, 1))  # the old life's late letter
    assert box.refused == 1 and len(box.queues[1]) == 1
    assert box.has_round(1, 3, 1.0) and not box.has_round(1, 4, 1.0)


def test_mailbox_gone_and_finished_senders_are_not_waited_for():
    peers = PeerTable(3, np.ones((4, 4)))
    box = Mailbox([0, 1, 2], peers)
    peers.drop(2)
    box.wake(gone=[2])
    box.put(letter(2, 0, 0, incarnation=5))
    assert box.refused == 1 and box.has_round(2, 99, 0.0)
    box.put(letter(0, 1, 9, kind="fin"))  # ahead of seq 0: held, so not yet finished
    assert not box.has_round(0, 1, 0.0)
    box.put(letter(0, 0, 0))
    assert 0 in box.finished and box.has_round(0, 99, 0.0)
    assert [l.round for l in box.take_ready(0)] == [0]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def choco_core(agent_id: int, digits) -> AgentCore:
    data = quickstart()
    data["gossip"] = {"rule": "choco", "gamma": 0.5, "compressor": {"name": "top_k", "ratio": 0.5}}
    config = load_config(base=data)
    shard = torch.arange(agent_id * 100, agent_id * 100 + 100).numpy()
    return AgentCore(agent_id, config, digits, shard, 100, "cpu", track_links=True)


def test_resync_and_drop_keep_s_equal_to_the_weighted_public_copies(digits):
    """Agent 0 hears agents 1 and 2 (weights 0.3, 0.2); agent 1 restarts from an older x_hat, agent 2 is dropped."""
    a, b, c = (choco_core(i, digits) for i in range(3))
    weights = {1: 0.3, 2: 0.2}
    older_b = None
    for round_index in range(4):
        for core in (a, b, c):
            core.train_step()
        for sender in (b, c):
            a.absorb(sender.emit([0]), weights[sender.agent_id], sender.agent_id)
        if round_index == 1:
            older_b = b.public_copy()  # b's snapshot
    want = weights[1] * b.state.x_hat + weights[2] * c.state.x_hat
    torch.testing.assert_close(a.state.s, want)
    a.resync_link(1, older_b, weights[1])  # b came back from its snapshot and resent its whole public copy
    torch.testing.assert_close(a.state.s, weights[1] * older_b + weights[2] * c.state.x_hat)
    a.drop_link(2, weights[2])
    torch.testing.assert_close(a.state.s, weights[1] * older_b)
    tensors, meta = a.snapshot()
    assert set(k for k in tensors if k.startswith("link.")) == {"link.1"}
    fresh = choco_core(0, digits)
    fresh.restore(tensors, meta)
    torch.testing.assert_close(fresh.link_copies[1], older_b)
