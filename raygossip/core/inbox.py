"""A node's incoming letters: the wait its mode asks for, then absorbing what arrived, in order per sender, with the
round's weights (and the drain after the run), counting what it saw."""

from __future__ import annotations

import math
import threading
import time

import torch

from ..algorithms.compressors import Compressed
from ..algorithms.schedules import RoundPlan
from .agent import AgentCore
from .graph_links import GraphChanges
from .mailbox import Mailbox
from .outbox import Outbox
from .phases import PhaseClock
from .plan import RunPlan
from .transports import Transport
from .wire import Kind, Letter

COUNTERS = ("timeouts", "stale_messages", "lost_messages", "resyncs", "resyncs_asked", "reused_models",
            "nonfinite_messages")
WHOLE = (Kind.FULL, Kind.LINK, Kind.RESYNC)  # a sender's whole public copy
ABSORBED = (Kind.GOSSIP, *WHOLE)  # the kinds that change the rule state


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """No element of these float tensors is NaN or +-inf. One sum per tensor: a sum is non-finite when an element
    is (or when it overflows float32, which only a diverged vector reaches); `isfinite(t).all()` costs ten times
    as much, and it ran on every message and every send."""
    return all(math.isfinite(float(t.sum())) for t in tensors)


class Inbox:
    """Waits for and absorbs one agent's letters. `mode`, `staleness`, `wait_timeout_s`, `wait_past_timeout` as in
    NodeOptions; `events(kind, **fields)` reports to the supervisor; `stopped` ends every wait at once.

    A rule with public copies must apply every message of a sender once: when one is lost (a LOST letter, or a message
    whose object-store copy died) and the recovery in force says resync, this agent asks the sender, through its
    `outbox`, for its whole public copy, once until a whole copy from that sender arrives (`asked`)."""

    def __init__(self, core: AgentCore, plan: RunPlan, transport: Transport, mailbox: Mailbox, graph: GraphChanges,
                 outbox: Outbox, lock: threading.Lock, phases: PhaseClock, stopped: threading.Event, events, *,
                 mode: str, staleness: int, wait_timeout_s: float, wait_past_timeout: bool, timed: bool) -> None:
        self.core = core
        self.agent_id = core.agent_id
        self.plan = plan
        self.transport = transport
        self.mailbox = mailbox
        self.peers = mailbox.peers
        self.graph = graph
        self.outbox = outbox
        self.lock = lock
        self.phases = phases
        self.stopped = stopped
        self.event = events
        self.mode, self.staleness, self.wait_timeout_s = mode, staleness, wait_timeout_s
        self.wait_past_timeout = wait_past_timeout
        self.timed = timed  # simulated timing: record each link's delay
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.waited_s = 0.0
        self.link_delays: dict[int, list[float]] = {}
        # a whole-model rule in bounded/async mode: a sender with nothing new in a round counts with its last model
        self.reuse_last_models = core.rule.whole_models and mode != "sync"
        self.last_models: dict[int, Compressed] = {}
        self.heals = core.tracks_links  # (a resync replaces what this agent knew of the sender: it must know it)
        self.asked: dict[int, int] = {}  # sender -> round of the lost message a resync was asked for (not yet come)

    def accept(self, letter: Letter) -> None:
        """A letter from a transport (any thread). A resync request that comes after this agent's loop ended is
        answered at once (during the loop, at a round's send: GossipNode.send_round)."""
        self.mailbox.put(letter)
        if letter.kind is Kind.ASK and self.outbox.finished:  # (the lock only then: no training thread holds it)
            with self.lock:
                self.outbox.answer(self.mailbox.take_asks(), now=True)

    def wait_round(self, round_index: int) -> int | None:
        """The round whose messages this mode must wait for (None: do not wait)."""
        if self.mode == "sync":
            return round_index
        if self.mode == "bounded":
            return round_index - self.staleness
        return None

    def receive(self, round_index: int, senders: list[int], round_plan: RoundPlan) -> None:
        """Wait as the mode says (with a deadline), then absorb what arrived, in order per sender."""
        wait_for = self.wait_round(round_index)
        if wait_for is not None and wait_for >= 0:
            if wait_for == round_index:
                expected = senders
            else:
                earlier = self.plan.round_plan(wait_for)
                expected = earlier.senders_to(self.agent_id) if earlier is not None else []
            links = self.graph.opened(round_index) if self.mode == "sync" else []
            if expected or links:
                self.wait_for(expected, wait_for, round_index, links)
        with self.phases("absorb"):
            self.absorb_ready(round_index, senders, round_plan)

    def wait_for(self, expected: list[int], wait_for: int, round_index: int, links: list[int] = ()) -> None:
        """Wait until every expected sender's letter of round `wait_for` (and each link letter of this round from
        `links`, sync mode) is here, or the sender is absent (dead, dropped, away). Sync and bounded runs never go on
        without it, so that a slow machine cannot change a sync run's numbers: past runtime.wait_timeout_s a
        `wait_timeout` event names the missing senders and the wait goes on; a peer that died is reported absent by
        the supervisor, and a run in which no agent steps any more is stopped by the coordinator (`run_stalled`)."""
        started = time.time()
        mailbox = self.mailbox
        timed_out = False
        while True:
            deadline = time.time() + self.wait_timeout_s
            with self.phases("wait"):
                if self.transport.pulls:  # letters by call or in memory are already in the mailbox
                    for j in expected:
                        for letter in self.transport.pull(j, lambda: mailbox.has_round(j, wait_for, float("inf")),
                                                          deadline, self.stopped.is_set):
                            self.accept(letter)
                ok = mailbox.wait_until(
                    lambda now: self.stopped.is_set() or (
                        all(mailbox.has_round(j, wait_for, now) for j in expected)
                        and all(mailbox.has_link(j, round_index, now) for j in links)),
                    deadline,
                )
            if ok or self.stopped.is_set():
                break
            if not timed_out:
                timed_out = True
                self.counters["timeouts"] += 1
                now = time.time()
                self.event("wait_timeout", round=round_index,
                           missing=[j for j in expected if not mailbox.has_round(j, wait_for, now)]
                           + [j for j in links if not mailbox.has_link(j, round_index, now)])
            if not self.wait_past_timeout:  # one process (the reference engine): nothing more can come
                break
        self.waited_s += time.time() - started

    def absorb_ready(self, round_index: int, senders: list[int], round_plan: RoundPlan) -> None:
        """Absorb every readable letter (rounds <= round_index in sync mode), in order per sender.

        A whole-model rule in bounded and async mode: a sender of this round with nothing new (it is slower, or
        its loop has ended) counts with the last model it sent, so that the agent keeps mixing instead of taking
        local steps alone (which pulls it towards its own shard: the last rounds of a run whose neighbours
        finished)."""
        up_to = round_index if self.mode == "sync" else None
        whole_models = self.core.rule.whole_models
        weights = round_plan.weights.get(self.agent_id, (1.0, {}))[1]  # (a graph a timeline changes: apply_letters)
        taken: list[Letter] = []
        quiet: list[int] = []
        for sender in sorted(set(senders) | set(self.mailbox.queues)):
            letters = self.mailbox.take_ready(sender, up_to)
            self.counters["lost_messages"] += sum(letter.kind is Kind.LOST for letter in letters)
            if whole_models:
                letters = [letter for letter in letters if letter.kind is Kind.GOSSIP][-1:]  # the newest counts
                if not letters and self.reuse_last_models and sender in senders:
                    quiet.append(sender)
            taken.extend(letter for letter in letters if letter.kind in ABSORBED or letter.kind is Kind.LOST)
        with self.lock:
            self.apply_letters(taken, weights, round_index)
            for sender in quiet:
                last = self.last_models.get(sender)
                weight = weights.get(sender, 0.0)
                if last is not None and weight > 0.0 and sender not in self.peers.down:
                    self.core.absorb(last, weight, sender)
                    self.counters["reused_models"] += 1

    def apply_letters(self, letters: list[Letter], weights: dict[int, float], round_index: int | None) -> None:
        """Absorb gossip messages and apply full public copies, in order per sender; ask for a resync after a lost
        message (call with the lock held)."""
        dropped = self.peers.dropped
        opened = iter(self.transport.open([letter for letter in letters if letter.kind is not Kind.LOST]))
        for letter in letters:
            if letter.kind is Kind.LOST:  # (counted when taken)
                self.lost(letter.sender, letter.round)
                continue
            message = next(opened)
            weights = self.graph.weights_for(letter.sender, letter.round, weights)
            weight = 0.0 if letter.sender in dropped else weights.get(letter.sender, 0.0)
            if message is None:  # its object-store copy died with its sender
                self.counters["lost_messages"] += 1
                self.lost(letter.sender, letter.round)
                continue
            if not all_finite([a for a in message.arrays.values() if a.is_floating_point()]):
                self.counters["nonfinite_messages"] += 1  # a diverged sender's: never absorbed
                continue
            if letter.kind in WHOLE:
                self.asked.pop(letter.sender, None)  # (a whole copy holds every message sent before it)
                if weight > 0.0 and self.core.resync_link(letter.sender, message.arrays["x_hat"], weight):
                    self.counters["resyncs"] += 1
                continue
            self.record_delay(letter)
            if round_index is not None and letter.round != round_index:
                self.counters["stale_messages"] += 1
            if self.reuse_last_models and letter.sender not in dropped:
                self.last_models[letter.sender] = message
            if weight > 0.0:
                self.core.absorb(message, weight, letter.sender)

    def lost(self, sender: int, round_index: int) -> None:
        """`sender`'s message of `round_index` never came: ask for its whole public copy if the recovery in force says
        so and no request to it is open (the copy that answers it will hold this message too)."""
        if not self.heals or sender in self.asked or sender in self.peers.dropped:
            return
        if self.recovery(sender, round_index) == "resync":
            self.asked[sender] = round_index
            self.outbox.ask(sender, round_index)
            self.counters["resyncs_asked"] += 1

    def recovery(self, sender: int, round_index: int) -> str:
        """What this agent does after losing `sender`'s message of `round_index` (consensus.RECOVERIES): the link's
        recovery if a timeline event put a loss on it then, else faults.recovery."""
        if self.plan.timeline.has_links:
            link = self.plan.conditions(round_index).link_of(sender, self.agent_id)
            if link.loss > 0:
                return link.recovery
        return self.core.config.faults.recovery

    def record_delay(self, letter: Letter) -> None:
        if not self.timed:
            return
        readable = max(letter.arrived_at, letter.available_at)
        self.link_delays.setdefault(letter.sender, []).append(readable - letter.sent_at)

    def drain(self, timeout_s: float) -> int:
        """After the run: once every live in-neighbour's final letter (and every resync asked for) arrived, absorb
        every message still queued; a lost one among them is asked for and waited for once more."""
        row = self.plan.mixing_at(self.plan.total_rounds - 1)[self.agent_id]  # the graph in force at the end
        senders = [j for j in self.peers.in_neighbours if j not in self.peers.dropped]
        if self.core.rule.public_copies:
            senders = [j for j in senders if row[j] > 0]
        deadline = time.time() + timeout_s
        mailbox = self.mailbox
        for j in senders:
            for letter in self.transport.pull(j, lambda: mailbox.absent(j), deadline, lambda: False):
                self.accept(letter)
        taken = 0
        for _ in range(2):
            mailbox.wait_until(  # (a resync asked for may come after the sender's final letter)
                lambda now: all(j in mailbox.finished for j in senders)
                and all(letter.available_at <= now for q in mailbox.queues.values() for letter in q)
                and all(self.peers.absent(j) or any(l.kind in WHOLE for l in mailbox.queues.get(j, ()))
                        for j in self.asked),
                deadline,
            )
            letters = [letter for sender in sorted(mailbox.queues) for letter in mailbox.take_ready(sender)
                       if letter.kind in ABSORBED or letter.kind is Kind.LOST]
            taken += sum(letter.kind is not Kind.LOST for letter in letters)
            if self.core.rule.whole_models:
                return taken
            self.counters["lost_messages"] += sum(letter.kind is Kind.LOST for letter in letters)
            with self.lock:
                self.apply_letters(letters, {j: float(row[j]) for j in senders}, None)
            if not self.asked:
                break
        return taken

    def forget(self, sender: int) -> None:
        """A sender gone for good: its last model no longer counts, nor a resync asked of it (call with the lock
        held)."""
        self.last_models.pop(sender, None)
        self.asked.pop(sender, None)

    def clear(self) -> None:
        """This agent starts afresh (a timeline's join): no sender's last model counts."""
        self.last_models.clear()
