"""One agent's gossip node: its round steps (local step, send, wait, absorb, mix), peer table and counters, over a
Transport.

The node knows neither Ray nor processes. Both engines drive it with the one round loop (core.round_loop): the
reference engine all its nodes over an in-process transport; the Ray engine each actor's nodes in an actor thread
over Ray calls or shared-memory channels. So the two share every line that decides which letters count.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..algorithms.compressors import Compressed
from ..algorithms.schedules import RoundPlan
from .agent import AgentCore
from .faults import MessageFate
from .mailbox import Mailbox
from .graph_links import GraphLinks
from .peers import PeerTable
from .phases import PhaseClock
from .plan import RunPlan
from .timing import StepClock, link_delay
from .node_checkpoints import Checkpointing
from .node_peers import PeerEvents
from .node_timeline import TimelineSteps
from ..config import TimingConfig
from .transports import Supervisor, Transport
from .wire import Kind, Letter


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """No element of these float tensors is NaN or +-inf. One sum per tensor: a sum is non-finite when an element
    is (or when it overflows float32, which only a diverged vector reaches); `isfinite(t).all()` costs ten times
    as much, and it ran on every message and every send."""
    return all(math.isfinite(float(t.sum())) for t in tensors)


@dataclass(frozen=True, kw_only=True)
class NodeOptions:
    """How a node runs: what the reference engine turns off (timing, faults) and what the Ray engine sets."""

    mode: str = "sync"
    staleness: int = 1
    wait_timeout_s: float = 120.0
    timing: TimingConfig | None = None  # None: no simulated step times or link delays
    snapshot_every: int = 0  # keep a snapshot with the supervisor every this many rounds (0: never)
    checkpoint_every: int = 0
    wait_past_timeout: bool = False  # sync/bounded: wait on past wait_timeout_s (a supervisor reports dead peers)


class GossipNode(TimelineSteps, PeerEvents, Checkpointing):
    """One agent's round steps and link state. The training thread drives it (core.round_loop); a control thread may
    call the peer_* methods, release and stop meanwhile: they share `link_lock`, so the rule state and each
    outgoing stream change atomically."""

    def __init__(self, core: AgentCore, plan: RunPlan, transport: Transport, options: NodeOptions, *,
                 supervisor: Supervisor | None = None, clock: StepClock | None = None,
                 fate: MessageFate | None = None, kill_round: int | None = None, incarnation: int = 0,
                 evaluation_set: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.core = core
        self.agent_id = core.agent_id
        self.plan = plan
        self.transport = transport
        self.options = options
        self.supervisor = supervisor
        self.clock = clock
        self.fate = fate
        self.kill_round = kill_round
        self.incarnation = incarnation
        self.evaluation_set = evaluation_set
        self.rule = core.rule
        first_row = plan.mixing_at(0)[core.agent_id]
        self.peers = PeerTable(core.agent_id, plan.support(),
                               {j: float(w) for j, w in enumerate(first_row) if j != core.agent_id and w > 0})
        self.mailbox = Mailbox(list(range(plan.topology.n)))
        self.link_lock = threading.Lock()
        self.round_reached = core.step // plan.local_steps - 1
        # a whole-model rule in bounded/async mode: a sender with nothing new in a round counts with its last model
        self.reuse_last_models = self.rule.whole_models and options.mode != "sync"
        self.last_models: dict[int, Compressed] = {}
        self.finished_loop = False
        self.barrier = threading.Event()
        self.barrier_step = -1
        self.stop_requested = threading.Event()
        self.phases = PhaseClock()
        self.link_delays: dict[int, list[float]] = {}
        self.counters = dict.fromkeys(("timeouts", "stale_messages", "lost_messages", "resyncs", "reused_models",
                                       "nonfinite_messages"), 0)
        self.waited_s = 0.0
        self.corrupt_rounds = {c.round for c in core.config.faults.corrupt if c.agent == core.agent_id}
        self.divergence: dict | None = None  # {"step", "what"} once this agent's loss or parameters went non-finite
        self._round_plan: tuple[int, RoundPlan | None] = (-1, None)
        # CHOCO/AdaGossip under a timeline that changes the graph: each in-link's weight in s (core.graph_links)
        self.links = GraphLinks(plan, self.agent_id) if self.rule.public_copies and plan.timeline.changes_graph else None

    # ------------------------------------------------------------ the loop

    def link_weight(self, sender: int) -> float:
        """The weight with which `sender`'s known public copy is counted in s now (CHOCO/AdaGossip)."""
        if self.links is not None:
            return self.links.weight.get(sender, 0.0)
        return float(self.plan.mixing_at(self.round_reached)[self.agent_id, sender])

    def local_step(self) -> None:
        """One local optimizer step, stretched to its simulated duration when timing is simulated."""
        step = self.core.step
        if self.timeline_step(step):
            return
        started = time.perf_counter()
        with self.phases("train"):
            loss = self.core.train_step()
        if not math.isfinite(loss):
            self.diverge("loss")
            return
        factor = self.step_factor(step)  # a timeline's, if it changes this agent's step time
        if self.clock is not None and (self.clock.active or factor is not None):
            with self.phases("sleep"):
                time.sleep(self.clock.extra_delay(time.perf_counter() - started, factor))

    def round_plan(self, round_index: int) -> RoundPlan | None:
        if self._round_plan[0] != round_index:
            self._round_plan = (round_index, self.plan.round_plan(round_index))
        return self._round_plan[1]

    def send_round(self, round_index: int) -> None:
        """The first half of a round: this agent's message to its receivers (fault injection may end it here)."""
        self.round_reached = round_index
        self.graph_step(round_index)
        if round_index == self.kill_round and self.supervisor is not None:
            self.supervisor.crash(self.agent_id, round_index, self.core.step)
        if round_index in self.corrupt_rounds:  # fault injection: this agent's parameters become NaN
            self.core.flat.data[0] = float("nan")
        round_plan = self.round_plan(round_index)
        if round_plan is not None:
            receivers = round_plan.receivers_of(self.agent_id)
            if receivers and not all_finite([self.core.flat.data]):
                self.diverge("parameters")
                return
            if receivers:  # filtered for dead peers inside send(), under link_lock (a peer may come back meanwhile)
                with self.phases("send"):
                    self.send(round_index, receivers)

    def finish_round(self, round_index: int) -> None:
        """The second half: wait as the mode says, absorb, mix; then a snapshot when one is due."""
        self.graph_step(round_index)  # (a silent round: it was not sent)
        round_plan = self.round_plan(round_index)
        me = self.agent_id
        if round_plan is not None:
            senders = round_plan.senders_to(me)
            if senders or me in round_plan.mixers:
                self.receive(round_index, senders, round_plan)
            if me in round_plan.mixers:
                gamma = self.gamma(round_index)
                self_weight, row = round_plan.weights[me]
                with self.phases("mix"), self.link_lock:  # a dropped sender's weight of this round goes to the self
                    self.core.mix(self_weight + self.peers.moved_weight(row), gamma)
        self.send_states(round_index)  # (to an agent that joins from this one at the next round)
        every = self.options.snapshot_every
        if every and (round_index + 1) % every == 0 and self.supervisor is not None:
            self.keep_snapshot()

    def gamma(self, round_index: int) -> float:
        """This round's averaging rate. An adaptive one comes from the coordinator after each epoch's record: in
        sync mode the node waits for it (so both engines mix with the same gamma), otherwise it takes the latest
        it has."""
        if self.options.mode == "sync" and not self.plan.has_gamma(round_index):
            deadline = time.time() + self.options.wait_timeout_s
            with self.phases("wait"):
                while not self.plan.has_gamma(round_index) and not self.stop_requested.is_set():
                    if time.time() > deadline:
                        self.event("gamma_timeout", round=round_index)
                        break
                    time.sleep(0.001)
        return self.plan.gamma(round_index)

    def finish(self) -> None:
        """The loop ended: tell every live peer that nothing more comes."""
        with self.link_lock:
            self.finished_loop = True
            for receiver in self.peers.live(self.peers.others):
                self.post(receiver, Kind.FIN, self.plan.total_rounds, None, time.time(), 0.0)

    def diverge(self, what: str) -> None:
        """This agent's loss or parameters are no longer finite: it stops at once, sends nothing more, and tells
        the supervisor (which aborts the run or drops the agent, as train.on_divergence says)."""
        self.divergence = {"step": self.core.step, "what": what}
        self.stop_requested.set()
        if self.supervisor is not None:
            self.supervisor.diverged(self.agent_id, self.incarnation, self.core.step, what)

    def stop(self) -> int:
        """Ask the training loop to stop after its current step (a bounded/async run's quorum finished)."""
        self.stop_requested.set()
        with self.mailbox.condition:
            self.mailbox.condition.notify_all()
        return self.core.step

    # ------------------------------------------------------------ sending

    def post(self, receiver: int, kind: Kind, round_index: int, payload: Any, sent_at: float,
             available_at: float) -> None:
        """Push one letter to `receiver`, next in this agent's stream to it (call with link_lock held)."""
        letter = Letter(self.agent_id, round_index, kind, payload, sent_at, available_at,
                        seq=self.peers.next_seq(receiver), incarnation=self.incarnation)
        self.transport.post(receiver, letter)

    def delay(self, nbytes: int, receiver: int | None = None) -> float:
        """Seconds on the link to `receiver` (simulated timing only): the timeline's link in force, or the config's."""
        if self.options.timing is None:
            return 0.0
        timed = self.link_delay_to(receiver, nbytes) if receiver is not None else None
        return link_delay(nbytes, self.options.timing) if timed is None else timed

    def send(self, round_index: int, receivers: list[int]) -> None:
        """Emit this round's message once and post it to every live receiver."""
        with self.link_lock:
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
        with self.link_lock:
            for receiver in self.peers.live(self.resync_receivers()):
                self.post_resync(receiver)

    def resync_receivers(self) -> list[int]:
        """Who gets this agent's resync letters: its out-neighbours for a rule with public copies (a static
        graph), else everyone (round marks are tiny, and the graph may change every round)."""
        if self.rule.public_copies:  # the graph in force now
            column = self.plan.mixing_at(self.round_reached)[:, self.agent_id]
            return [k for k in self.peers.others if column[k] > 0]
        return self.peers.others

    def post_resync(self, receiver: int) -> None:
        now = time.time()
        if not self.rule.public_copies:
            self.post(receiver, Kind.MARK, self.round_reached, None, now, now)
            return
        x_hat = self.core.public_copy()
        nbytes = x_hat.numel() * x_hat.element_size()
        self.core.traffic.record([receiver], nbytes)
        self.post(receiver, Kind.FULL, self.round_reached, Compressed({"x_hat": x_hat}, x_hat.numel()), now,
                  now + self.delay(nbytes, receiver))

    # ------------------------------------------------------------ receiving

    def accept(self, letter: Letter) -> None:
        """A letter from a transport (any thread)."""
        self.mailbox.put(letter)

    def wait_round(self, round_index: int) -> int | None:
        """The round whose messages this mode must wait for (None: do not wait)."""
        if self.options.mode == "sync":
            return round_index
        if self.options.mode == "bounded":
            return round_index - self.options.staleness
        return None

    def expected_senders(self, round_index: int, known: list[int] | None) -> list[int]:
        if known is not None:
            return known
        earlier = self.plan.round_plan(round_index)
        return earlier.senders_to(self.agent_id) if earlier is not None else []

    def receive(self, round_index: int, senders: list[int], round_plan: RoundPlan) -> None:
        """Wait as the mode says (with a deadline), then absorb what arrived, in order per sender."""
        wait_for = self.wait_round(round_index)
        if wait_for is not None and wait_for >= 0:
            expected = self.expected_senders(wait_for, senders if wait_for == round_index else None)
            links = self.opened_links(round_index) if self.options.mode == "sync" else []
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
            deadline = time.time() + self.options.wait_timeout_s
            with self.phases("wait"):
                if self.transport.pulls:  # letters by call or in memory are already in the mailbox
                    for j in expected:
                        for letter in self.transport.pull(j, lambda: mailbox.has_round(j, wait_for, float("inf")),
                                                          deadline, self.stop_requested.is_set):
                            self.accept(letter)
                ok = mailbox.wait_until(
                    lambda now: self.stop_requested.is_set() or (
                        all(mailbox.has_round(j, wait_for, now) for j in expected)
                        and all(mailbox.has_link(j, round_index, now) for j in links)),
                    deadline,
                )
            if ok or self.stop_requested.is_set():
                break
            if not timed_out:
                timed_out = True
                self.counters["timeouts"] += 1
                now = time.time()
                self.event("wait_timeout", round=round_index,
                           missing=[j for j in expected if not mailbox.has_round(j, wait_for, now)]
                           + [j for j in links if not mailbox.has_link(j, round_index, now)])
            if not self.options.wait_past_timeout:  # one process (the reference engine): nothing more can come
                break
        self.waited_s += time.time() - started

    def absorb_ready(self, round_index: int, senders: list[int], round_plan: RoundPlan) -> None:
        """Absorb every readable letter (rounds <= round_index in sync mode), in order per sender.

        A whole-model rule in bounded and async mode: a sender of this round with nothing new (it is slower, or
        its loop has ended) counts with the last model it sent, so that the agent keeps mixing instead of taking
        local steps alone (which pulls it towards its own shard: the last rounds of a run whose neighbours
        finished)."""
        up_to = round_index if self.options.mode == "sync" else None
        whole_models = self.rule.whole_models
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
            taken.extend(letter for letter in letters if letter.kind in (Kind.GOSSIP, Kind.FULL, Kind.LINK))
        with self.link_lock:
            self.apply_letters(taken, weights, round_index)
            for sender in quiet:
                last = self.last_models.get(sender)
                weight = weights.get(sender, 0.0)
                if last is not None and weight > 0.0 and sender not in self.peers.down:
                    self.core.absorb(last, weight, sender)
                    self.counters["reused_models"] += 1

    def apply_letters(self, letters: list[Letter], weights: dict[int, float], round_index: int | None) -> None:
        """Absorb gossip messages and apply full public copies (call with link_lock held)."""
        for letter, message in zip(letters, self.transport.open(letters)):
            if self.links is not None:  # the weight in force at the letter's round (or a later one)
                self.move_link(letter.sender, letter.round)
                weights = self.links.weight
            weight = 0.0 if letter.sender in self.peers.dropped else weights.get(letter.sender, 0.0)
            if message is None:  # its object-store copy died with its sender
                self.counters["lost_messages"] += 1
                continue
            if not all_finite([a for a in message.arrays.values() if a.is_floating_point()]):
                self.counters["nonfinite_messages"] += 1  # a diverged sender's: never absorbed
                continue
            if letter.kind in (Kind.FULL, Kind.LINK):
                if self.core.link_copies is not None and weight > 0.0:
                    self.core.resync_link(letter.sender, message.arrays["x_hat"], weight)
                    self.counters["resyncs"] += 1
                continue
            self.record_delay(letter)
            if round_index is not None and letter.round != round_index:
                self.counters["stale_messages"] += 1
            if self.reuse_last_models and letter.sender not in self.peers.dropped:
                self.last_models[letter.sender] = message
            if weight > 0.0:
                self.core.absorb(message, weight, letter.sender)

    def record_delay(self, letter: Letter) -> None:
        if self.options.timing is None:
            return
        readable = max(letter.arrived_at, letter.available_at)
        self.link_delays.setdefault(letter.sender, []).append(readable - letter.sent_at)

    def drain(self, timeout_s: float) -> int:
        """After the run: once every live in-neighbour's final letter arrived, absorb every message still queued."""
        row = self.plan.mixing_at(self.plan.total_rounds - 1)[self.agent_id]  # the graph in force at the end
        senders = [j for j in self.peers.in_neighbours if j not in self.peers.dropped]
        if self.rule.public_copies:
            senders = [j for j in senders if row[j] > 0]
        deadline = time.time() + timeout_s
        mailbox = self.mailbox
        for j in senders:
            for letter in self.transport.pull(j, lambda: mailbox.absent(j), deadline, lambda: False):
                self.accept(letter)
        mailbox.wait_until(
            lambda now: all(j in mailbox.finished for j in senders)
            and all(letter.available_at <= now for q in mailbox.queues.values() for letter in q),
            deadline,
        )
        taken = [letter for sender in sorted(mailbox.queues) for letter in mailbox.take_ready(sender)
                 if letter.kind in (Kind.GOSSIP, Kind.FULL, Kind.LINK)]
        if self.rule.whole_models:
            return len(taken)
        with self.link_lock:
            self.apply_letters(taken, {j: float(row[j]) for j in senders}, None)
        return len(taken)

    # ------------------------------------------------------------ reporting

    def event(self, kind: str, **fields) -> None:
        if self.supervisor is not None:
            self.supervisor.event({"kind": kind, "agent": self.agent_id, "time": time.time(), **fields})

    def evaluate(self) -> float:
        x, y = self.evaluation_set
        return self.core.evaluate(x, y, self.core.config.eval.batch_size)

    def evaluation(self) -> tuple[float | None, dict[str, torch.Tensor], float, dict]:
        """(local test accuracy or None, state tensors, mean loss since the last one, traffic counters)."""
        accuracy = self.evaluate() if self.core.config.eval.local else None
        return accuracy, self.state_tensors(), self.core.take_mean_loss(), self.traffic_counts()

    def report_evaluation(self, step: int) -> None:
        if self.supervisor is not None:
            self.supervisor.report(self.agent_id, step, *self.evaluation(), self.incarnation)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers (what records and the merge need)."""
        tensors = {"params": self.core.parameters_vector()}
        tensors.update({f"buffer.{k}": v for k, v in self.core.buffers().items()})
        return tensors

    def rule_tensors(self) -> dict[str, torch.Tensor]:
        """The rule's state, the copies of the neighbours' public copies, and the parameters (for checks)."""
        with self.link_lock:
            out = {name: t.detach().clone() for name, t in self.core.state.tensors().items()}
            out.update({f"link.{j}": t.clone() for j, t in (self.core.link_copies or {}).items()})
            out["params"] = self.core.parameters_vector()
        return out

    def traffic_counts(self) -> dict:
        traffic = self.core.traffic
        return {"bytes_sent": traffic.bytes_sent, "messages_sent": traffic.messages_sent,
                "per_link": dict(traffic.per_link), "per_link_messages": dict(traffic.per_link_messages)}

    def stats(self) -> dict:
        delays = {j: {"count": len(v), "min_s": min(v), "mean_s": float(np.mean(v)), "max_s": max(v)}
                  for j, v in self.link_delays.items() if v}
        return {"agent": self.agent_id, "incarnation": self.incarnation, "steps": self.core.step,
                "waited_s": self.waited_s, **self.counters, "link_delays": delays,
                "phase_s": dict(self.phases.wall),
                "cpu_s": {**self.phases.cpu, "loop": self.phases.loop_cpu, "process": self.phases.process_cpu},
                **self.traffic_counts()}
