"""A node's outgoing streams: each round's message to its receivers, whole public copies (resyncs, opened links),
round marks and final letters, numbered per receiver, with simulated link delays and losses."""

from __future__ import annotations

import threading
import time
from typing import Any

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

    def post(self, receiver: int, kind: Kind, round_index: int, payload: Any, sent_at: float,
             available_at: float) -> None:
        """Push one letter to `receiver`, next in this agent's stream to it (call with the lock held)."""
        letter = Letter(self.agent_id, round_index, kind, payload, sent_at, available_at,
                        seq=self.peers.next_seq(receiver), incarnation=self.incarnation)
        self.transport.post(receiver, letter)

    def post_whole(self, receiver: int, kind: Kind, round_index: int, arrays: dict[str, torch.Tensor]) -> None:
        """A letter with whole tensors (a public copy, a model), counted in the traffic (call with the lock held)."""
        nbytes = sum(t.numel() * t.element_size() for t in arrays.values())
        now = time.time()
        self.core.traffic.record([receiver], nbytes)
        self.post(receiver, kind, round_index, Compressed(arrays, self.core.flat.data.numel()), now,
                  now + self.delay(nbytes, receiver))

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

    def post_resync(self, receiver: int) -> None:
        """This agent's whole public copy (a round mark for a rule without) to `receiver` (call with the lock held)."""
        if not self.core.rule.public_copies:
            now = time.time()
            self.post(receiver, Kind.MARK, self.round_reached, None, now, now)
            return
        self.post_whole(receiver, Kind.FULL, self.round_reached, {"x_hat": self.core.public_copy()})

    def restarted(self, receiver: int) -> None:
        """A peer came back (its new stream from this agent begins): the resync letter it needs, and the final
        letter too when this agent's loop already ended (call with the lock held)."""
        if receiver in self.resync_receivers():
            self.post_resync(receiver)
            if self.finished:
                self.post(receiver, Kind.FIN, self.plan.total_rounds, None, time.time(), 0.0)

    def finish(self) -> None:
        """The loop ended: tell every live peer that nothing more comes."""
        with self.lock:
            self.finished = True
            for receiver in self.peers.live(self.peers.others):
                self.post(receiver, Kind.FIN, self.plan.total_rounds, None, time.time(), 0.0)
