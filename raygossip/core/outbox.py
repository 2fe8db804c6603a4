"""A node's outgoing streams: each round's message to its receivers, whole public copies (resyncs, opened links),
round marks and final letters, numbered per receiver, with simulated link delays and losses."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import torch

from ..algorithms.compressors import Compressed
from ..config import TimingConfig
from .agent import AgentCore
from .faults import MessageFate
from .peers import PeerTable
from .plan import RunPlan
from .timeline import lost_on_link
from .timing import link_delay
from .transports import Transport
from .wire import Kind, Letter


class Outbox:
    """What one agent sends, and to whom. `round_reached` is the round this agent last reached (its sends and resyncs
    are of that round). Every post happens with the node's `lock` held, so the rule state and each outgoing stream
    change together."""

    def __init__(self, core: AgentCore, plan: RunPlan, transport: Transport, peers: PeerTable, lock: threading.Lock,
                 *, timing: TimingConfig | None = None, fate: MessageFate | None = None, incarnation: int = 0) -> None:
        self.core = core
        self.agent_id = core.agent_id
        self.plan = plan
        self.transport = transport
        self.peers = peers
        self.lock = lock
        self.timing = timing  # None: no simulated link delays
        self.fate = fate
        self.incarnation = incarnation
        self.round_reached = core.step // plan.local_steps - 1
        self.finished = False  # the loop ended: every stream got its final letter
        self.asked: dict[int, int] = {}  # receiver -> the earliest round of its lost messages it asked a resync for
        self.answered: dict[int, int] = {}  # receiver -> the round of the last resync letter this agent sent it
        self.counters = {"resyncs_sent": 0, "resync_bytes": 0}

    def post(self, receiver: int, kind: Kind, round_index: int, payload: Any, sent_at: float,
             available_at: float) -> None:
        """Push one letter to `receiver`, next in this agent's stream to it (call with the lock held)."""
        letter = Letter(self.agent_id, round_index, kind, payload, sent_at, available_at,
                        seq=self.peers.next_seq(receiver), incarnation=self.incarnation)
        self.transport.post(receiver, letter)

    def post_whole(self, receiver: int, kind: Kind, round_index: int, arrays: dict[str, torch.Tensor]) -> int:
        """A letter with whole tensors (a public copy, a model), counted in the traffic (call with the lock held).
        Returns its bytes."""
        nbytes = sum(t.numel() * t.element_size() for t in arrays.values())
        now = time.time()
        self.core.traffic.record([receiver], nbytes)
        self.post(receiver, kind, round_index, Compressed(arrays, self.core.flat.data.numel()), now,
                  now + self.delay(nbytes, receiver))
        return nbytes

    def delay(self, nbytes: int, receiver: int) -> float:
        """Seconds on the link to `receiver` (simulated timing only): the timeline's link in force, or the config's."""
        if self.timing is None:
            return 0.0
        if self.plan.timeline.has_links:
            timed = self.plan.conditions(max(0, self.round_reached)).link_of(self.agent_id, receiver).delay(nbytes)
            if timed is not None:
                return timed
        return link_delay(nbytes, self.timing)

    def lost_on_link(self, receiver: int, round_index: int) -> bool:
        """Whether a timeline `link` loss drops this round's message to `receiver` (seeded)."""
        if not self.plan.timeline.has_links:
            return False
        loss = self.plan.conditions(round_index).link_of(self.agent_id, receiver).loss
        return lost_on_link(loss, self.core.config.seed, self.agent_id, receiver, round_index, self.incarnation)

    def send(self, round_index: int, receivers: list[int]) -> None:
        """Emit this round's message once and post it to every live receiver (a lost one as a LOST letter)."""
        with self.lock:
            receivers = self.peers.live(receivers)
            if not receivers:
                return
            message = self.core.emit(receivers)
            sent_at = time.time()
            for receiver in receivers:
                lost, extra = self.fate() if self.fate is not None else (False, 0.0)
                lost = lost or self.lost_on_link(receiver, round_index)
                available_at = sent_at + self.delay(message.nbytes, receiver)
                kind = Kind.LOST if lost else Kind.GOSSIP
                self.post(receiver, kind, round_index, None if lost else message, sent_at, available_at + extra)

    def announce(self) -> None:
        """A restarted (or resumed) agent's first letters: its whole public copy, or a round mark for a rule
        without public copies, to every receiver, which then replaces what it knew of this agent."""
        with self.lock:
            for receiver in self.peers.live(self.resync_receivers()):
                self.post_resync(receiver)

    def resync_receivers(self) -> list[int]:
        """Who gets this agent's resync letters: its out-neighbours in the graph in force now for a rule with public
        copies, else everyone (round marks are tiny, and the graph may change every round)."""
        if self.core.rule.public_copies:
            column = self.plan.mixing_at(self.round_reached)[:, self.agent_id]
            return [k for k in self.peers.others if column[k] > 0]
        return self.peers.others

    def post_resync(self, receiver: int, kind: Kind = Kind.FULL) -> int:
        """This agent's whole public copy (a round mark for a rule without) to `receiver`, as a FULL letter (after a
        restart or resume) or a RESYNC one (asked for); call with the lock held. Returns its bytes."""
        self.answered[receiver] = self.round_reached
        if not self.core.rule.public_copies:
            now = time.time()
            self.post(receiver, Kind.MARK, self.round_reached, None, now, now)
            return 0
        return self.post_whole(receiver, kind, self.round_reached, {"x_hat": self.core.public_copy()})

    def ask(self, sender: int, round_index: int) -> None:
        """This agent missed `sender`'s message of `round_index`: ask it for its whole public copy (a letter in this
        agent's stream to it, whatever the graph: a request goes to any live peer; call with the lock held)."""
        if self.peers.live([sender]):
            now = time.time()
            self.post(sender, Kind.ASK, round_index, None, now, now)

    def answer(self, asks: list[tuple[int, int]], *, now: bool = False) -> None:
        """Resync requests (receiver, round of its lost message): each is answered with this agent's whole public copy
        two rounds after the lost message (`now`: at once, the loop has ended), once for every request it covers (a
        copy sent after a lost message holds it). Two rounds, not one, so that in sync mode both engines answer at
        the same round: the request travels in the receiver's stream ahead of its next round's letter, which this
        agent waits for before that round ends (call with the lock held)."""
        for receiver, round_index in asks:
            if round_index >= self.answered.get(receiver, -1):
                self.asked[receiver] = min(round_index, self.asked.get(receiver, round_index))
        for receiver, round_index in sorted(self.asked.items()):
            if not now and round_index + 2 > self.round_reached:
                continue
            del self.asked[receiver]
            if self.peers.live([receiver]):
                self.counters["resync_bytes"] += self.post_resync(receiver, Kind.RESYNC)
                self.counters["resyncs_sent"] += 1

    def restarted(self, receiver: int) -> None:
        """A peer came back (its new stream from this agent begins): the resync letter it needs, and the final
        letter too when this agent's loop already ended (call with the lock held)."""
        self.asked.pop(receiver, None)  # (its requests were its old life's: the resync below is what it needs)
        if receiver in self.resync_receivers():
            self.post_resync(receiver)
            if self.finished:
                self.post(receiver, Kind.FIN, self.plan.total_rounds, None, time.time(), 0.0)

    def finish(self, take_asks: Callable[[], list[tuple[int, int]]]) -> None:
        """The loop ended: answer every resync request still open (`take_asks`: those that came), and tell every live
        peer that nothing more comes. A request that comes later is answered at once (`finished`)."""
        with self.lock:
            self.finished = True  # (first: a request put after take_asks below sees it, and is answered at once)
            self.answer(take_asks(), now=True)
            for receiver in self.peers.live(self.peers.others):
                self.post(receiver, Kind.FIN, self.plan.total_rounds, None, time.time(), 0.0)
