"""Each part of a gossip node alone, without Ray and without the node: the peer table's liveness, the outbox's
streams, the inbox's absorbing and counting, the graph's weights, the supervisor's news, the checkpoint barrier."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from raygossip.algorithms.consensus import RULES, make_rule, sends_whole_models
from raygossip.algorithms.compressors import make_compressor
from raygossip.core.agent import AgentCore
from raygossip.core.graph_links import GraphChanges
from raygossip.core.inbox import Inbox
from raygossip.core.mailbox import Mailbox
from raygossip.core.outbox import Outbox
from raygossip.core.peer_news import PeerNews
from raygossip.core.peers import PeerTable
from raygossip.core.phases import PhaseClock
from raygossip.core.restore_points import RestorePoints
from raygossip.core.wire import Kind, Letter
from raygossip.engines.common import prepare
from raygossip.presets import quickstart
from raygossip.validation import load_config

RING4 = np.array([[1, 1, 0, 1], [1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 1]])


# ---------------------------------------------------------------- the peer table (liveness, once)

def _apply(table: PeerTable, events: list[tuple]) -> list:
    """Apply (method, *args) events in order; returns what each returned."""
    return [getattr(table, name)(*args) for name, *args in events]


@pytest.mark.parametrize("events, absent, live, returned", [
    ([], False, True, []),
    ([("mark_down", 1)], True, False, [None]),
    # its letter from a new life comes before the supervisor's news: it is back (waits wait for it again), but this
    # agent's stream still addresses its old life, so nothing is sent to it until the news opens a new stream
    ([("mark_down", 1), ("heard", 1, 1)], False, False, [None, None]),
    ([("mark_down", 1), ("heard", 1, 1), ("restarted", 1, 1)], False, True, [None, None, True]),
    ([("mark_down", 1), ("restarted", 1, 1)], False, True, [None, True]),
    ([("restarted", 1, 1), ("restarted", 1, 1)], False, True, [True, False]),  # the same life twice: one stream
    # it died again before its first letter came: a late letter of the life the news announced does not revive it
    ([("mark_down", 1), ("restarted", 1, 1), ("mark_down", 1), ("heard", 1, 1)], True, False, [None, True, None, None]),
    ([("drop", 1), ("drop", 1)], True, False, [True, False]),
    ([("learn", {1: 2}), ("restarted", 1, 2)], False, True, [None, False]),  # a restarted agent's streams are new
    ([("learn", {1: 2}), ("restarted", 1, 3)], False, True, [None, True]),
])
def test_the_peer_table_tracks_each_peers_life_and_this_agents_stream_to_it(events, absent, live, returned):
    table = PeerTable(0, RING4)
    table.next_seq(1)
    assert _apply(table, events) == returned
    assert table.absent(1) is absent and (table.live([1, 3]) == ([1, 3] if live else [3]))
    if returned and returned[-1] is True:
        assert table.next_seq(1) == 0  # a new stream starts at seq 0


def test_the_peer_table_knows_neighbours_from_the_runs_support_and_moves_a_dropped_senders_weight():
    table = PeerTable(0, RING4, {1: 1 / 3, 3: 1 / 3})
    assert table.in_neighbours == [1, 3] and table.out_neighbours == [1, 3] and not table.is_neighbour(2)
    table.drop(3)
    assert table.moved_weight({1: 0.25, 3: 0.5}) == 0.5 and table.in_weights == {1: 0.25, 3: 0.5}


def test_the_mailbox_refuses_a_dropped_senders_letters_and_reads_absence_from_the_table():
    table = PeerTable(0, RING4)
    box = Mailbox([1, 2, 3], table)
    box.put(Letter(1, 0, Kind.GOSSIP, None, 0.0, 0.0, seq=0))
    table.drop(1)
    box.wake(gone=[1])
    box.put(Letter(1, 1, Kind.GOSSIP, None, 0.0, 0.0, seq=1))
    assert box.refused == 1 and not box.queues[1] and box.absent(1) and box.has_round(1, 9, 0.0)
    assert not box.has_round(3, 0, 0.0)
    table.mark_down(3)
    assert box.has_round(3, 0, 0.0)


# ---------------------------------------------------------------- one agent's parts over a recording transport

class Recorder:
    """A transport that keeps what it is given (receiver, letter) and delivers nothing."""

    pulls = False

    def __init__(self) -> None:
        self.posted: list[tuple[int, Letter]] = []

    def post(self, receiver: int, letter: Letter) -> None:
        self.posted.append((receiver, letter))

    def pull(self, sender, satisfied, deadline, stopped):
        return iter(())

    def open(self, letters):
        return [letter.payload for letter in letters]

    def close(self, peer: int) -> None:
        pass


@pytest.fixture(scope="module")
def setup():
    data = quickstart()
    data["agents"] = {"count": 4}
    data["model"] = {"name": "mlp", "hidden": [8]}
    data["train"].update(epochs=1, steps_per_epoch=4)
    data["gossip"] = {"rule": "choco", "gamma": 0.5, "compressor": {"name": "top_k", "ratio": 0.2}}
    config = load_config(base=data)
    return config, prepare(config)


class Parts:
    """Agent `agent`'s parts as a node wires them, over a Recorder."""

    def __init__(self, setup, agent: int = 0, fate=None) -> None:
        config, run = setup
        self.plan = run.plan
        self.core = AgentCore(agent, config, run.dataset, run.shards[agent], run.plan.total_steps, track_links=True)
        self.transport = Recorder()
        self.lock = threading.Lock()
        self.events: list[tuple[str, dict]] = []
        event = lambda kind, **fields: self.events.append((kind, fields))  # noqa: E731
        self.peers = PeerTable(agent, self.plan.support())
        self.outbox = Outbox(self.core, self.plan, self.transport, self.peers, self.lock, fate=fate)
        self.graph = GraphChanges(self.core, self.plan, self.outbox)
        self.stopped = threading.Event()
        self.inbox = Inbox(self.core, self.plan, self.transport, Mailbox([0, 1, 2, 3], self.peers), self.graph,
                           self.outbox, self.lock, PhaseClock(), self.stopped, event, mode="sync", staleness=1, wait_timeout_s=0.05,
                           wait_past_timeout=False, timed=False)
        self.news = PeerNews(self.core, self.outbox, self.inbox, self.graph, event)

    def letters(self) -> list[tuple[int, str, int]]:
        return [(receiver, letter.kind.value, letter.seq) for receiver, letter in self.transport.posted]


def test_the_outbox_numbers_each_stream_sends_to_live_receivers_only_and_marks_a_lost_message(setup):
    fates = iter([(True, 0.0), (False, 0.0), (False, 0.0)])
    parts = Parts(setup, fate=lambda: next(fates))
    parts.peers.mark_down(3)
    parts.outbox.send(0, [1, 3])
    parts.outbox.send(1, [1])
    assert parts.letters() == [(1, "lost", 0), (1, "q", 1)]
    assert parts.core.traffic.messages_sent == 2  # (a lost message was sent: it cost its bytes)


def test_the_outbox_resyncs_a_restarted_peer_with_the_whole_public_copy_and_its_final_letter(setup):
    parts = Parts(setup)
    parts.outbox.send(0, [1, 3])
    parts.outbox.finish(lambda: [])
    parts.transport.posted.clear()
    with parts.lock:
        assert parts.peers.restarted(3, 1)
        parts.outbox.restarted(3)
    assert parts.letters() == [(3, "full", 0), (3, "fin", 1)]
    full = parts.transport.posted[0][1].payload.arrays["x_hat"]
    assert torch.equal(full, parts.core.state.x_hat) and parts.core.state.x_hat.abs().sum() > 0


@pytest.mark.parametrize("asks, rounds, sent", [
    ([(1, 3)], [4], []),  # one round after the lost message: not yet
    ([(1, 3)], [4, 5], [(1, 5)]),  # two rounds after: the whole copy, ahead of that round's message
    ([(1, 3), (1, 4)], [5, 6], [(1, 5)]),  # the copy of round 5 holds the message of round 4 too: one answer
    ([(1, 3), (3, 3)], [5], [(1, 5), (3, 5)]),
    ([(1, 7)], [8, 9], [(1, 9)]),
])
def test_the_outbox_answers_a_resync_request_two_rounds_after_the_lost_message_once(setup, asks, rounds, sent):
    parts = Parts(setup)
    answered = []
    for k, round_index in enumerate(rounds):
        parts.outbox.round_reached = round_index
        with parts.lock:
            parts.outbox.answer(asks if k == 0 else [])
        answered += [(receiver, letter.round) for receiver, letter in parts.transport.posted
                     if letter.kind is Kind.RESYNC]
        parts.transport.posted.clear()
    assert answered == sent
    assert parts.outbox.counters["resyncs_sent"] == len(sent)
    assert parts.outbox.counters["resync_bytes"] == len(sent) * parts.core.state.x_hat.numel() * 4
    parts.outbox.finish(lambda: [(2, 99)])  # the loop ended: every open request is answered at once
    finals = [(r, letter.kind.value) for r, letter in parts.transport.posted]
    assert (2, "resync") in finals and ((1, "resync") in finals) is (not sent) and not parts.outbox.asked


def test_the_inbox_absorbs_with_the_rounds_weights_and_counts_lost_letters_and_resyncs(setup):
    receiver, sender = Parts(setup, 0), Parts(setup, 1)
    sender.outbox.send(0, [0])
    sender.outbox.send(1, [0])
    message = sender.transport.posted[0][1].payload
    receiver.inbox.accept(sender.transport.posted[0][1])
    receiver.inbox.accept(Letter(1, 1, Kind.LOST, None, 0.0, 0.0, seq=1))
    row = receiver.plan.round_plan(1)
    receiver.inbox.absorb_ready(1, [1], row)
    weight = row.weights[0][1][1]
    dense = receiver.core.rule.compressor.decompress(message)
    torch.testing.assert_close(receiver.core.state.s, weight * dense)
    assert receiver.inbox.counters["lost_messages"] == 1 and receiver.inbox.counters["resyncs"] == 0
    # the sender's whole public copy replaces what the receiver knew of it: s = w x_hat_1
    with sender.lock:
        sender.outbox.post_resync(0)
    receiver.inbox.accept(sender.transport.posted[-1][1])
    receiver.inbox.absorb_ready(2, [], receiver.plan.round_plan(2))
    torch.testing.assert_close(receiver.core.state.s, weight * sender.core.state.x_hat)
    assert receiver.inbox.counters["resyncs"] == 1


def test_news_of_a_dropped_peer_takes_its_known_public_copy_out_of_s(setup):
    receiver, sender = Parts(setup, 0), Parts(setup, 1)
    sender.outbox.send(0, [0])
    receiver.inbox.accept(sender.transport.posted[0][1])
    receiver.inbox.absorb_ready(0, [1], receiver.plan.round_plan(0))
    assert receiver.core.state.s.abs().sum() > 0 and 1 in receiver.core.known_copies()
    receiver.news.peer_dropped(1)
    assert receiver.core.state.s.abs().max() < 1e-7 and receiver.core.known_copies() == {}
    assert receiver.peers.dropped == {1} and receiver.peers.live([1]) == []


def test_news_of_dead_peers_ends_the_wait_for_them(setup):
    parts = Parts(setup, 0)
    parts.inbox.wait_past_timeout = True
    waiter = threading.Thread(target=parts.inbox.wait_for, args=([1, 3], 0, 0))
    waiter.start()
    parts.news.peers_down([1, 3])
    waiter.join(timeout=10)
    assert not waiter.is_alive() and [kind for kind, _ in parts.events] == ["neighbour_down", "neighbour_down"]


def test_graph_changes_on_a_static_graph_use_the_rounds_weights(setup):
    parts = Parts(setup, 0)
    assert parts.graph.links is None and parts.graph.opened(3) == []
    weights = {1: 0.25}
    assert parts.graph.weights_for(1, 0, weights) is weights
    assert parts.graph.weight(1) == pytest.approx(parts.plan.mixing_at(0)[0, 1])


def test_a_checkpoint_barrier_is_released_by_its_own_step_only_or_by_a_stop(setup):
    parts = Parts(setup, 0)
    points = RestorePoints(parts.core, parts.outbox, parts.graph, parts.stopped, lambda kind, **f: None,
                           snapshot_every=0, wait_timeout_s=30.0)

    class Keeper:
        def keep_checkpoint(self, agent, incarnation, step, tensors, meta):
            self.kept = (agent, step, sorted(tensors)[:2])

    keeper = Keeper()
    points.offer_checkpoint(5, keeper)
    assert keeper.kept[:2] == (0, 5)
    points.release(4)
    assert not points.barrier.is_set()
    points.release(5)
    points.await_release(5)  # returns at once
    points.offer_checkpoint(6, keeper)
    parts.stopped.set()
    points.await_release(6)  # a stop ends it
    assert not points.barrier.is_set()


@pytest.mark.parametrize("name", list(RULES))
def test_the_registry_says_which_rules_send_whole_models_as_the_rules_themselves(name):
    rule = make_rule(name, make_compressor("identity", [4]))
    assert rule.whole_models is sends_whole_models(name) and rule.public_copies is not rule.whole_models
