"""One agent's gossip node: its round steps (local step, send, wait and absorb, mix) over a Transport, composed of the
objects that do each job.

The node knows neither Ray nor processes. Both engines drive it with the one round loop (core.round_loop): the
reference engine all its nodes over an in-process transport; the Ray engine each actor's nodes in an actor thread
over Ray calls or shared-memory channels. So the two share every line that decides which letters count.

What a node holds (each with its own state; engines call them directly):
- `peers` (core.peers.PeerTable): liveness of the others and this agent's stream to each;
- `outbox` (core.outbox.Outbox): what it sends (messages, resyncs, link letters, final letters);
- `inbox` (core.inbox.Inbox): the mailbox, the mode's waits, absorbing, the drain, the message counters;
- `graph` (core.graph_links.GraphChanges): in-link weights, and s kept right when a timeline changes the graph;
- `leave_join` (core.leave_join.LeaveJoin): a timeline's leaves and joins, the events this agent reports;
- `news` (core.peer_news.PeerNews): the supervisor's news of peers (down, restarted, dropped);
- `points` (core.restore_points.RestorePoints): snapshots, restore, the checkpoint barrier;
- `report` (core.reporting.Reporter): the line to the supervisor.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..algorithms.schedules import RoundPlan
from ..config import TimingConfig
from .agent import AgentCore
from .faults import MessageFate
from .graph_links import GraphChanges
from .inbox import Inbox, all_finite
from .leave_join import LeaveJoin
from .mailbox import Mailbox
from .outbox import Outbox
from .peer_news import PeerNews
from .peers import PeerTable
from .phases import PhaseClock
from .plan import RunPlan
from .reporting import Reporter
from .restore_points import RestorePoints
from .timing import StepClock
from .transports import Supervisor, Transport
from .wire import Letter


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


class GossipNode:
    """One agent's round steps. The training thread drives it (core.round_loop); a control thread may call `news`,
    `points.release` and `stop` meanwhile: they share `lock`, so the rule state and each outgoing stream change
    atomically."""

    def __init__(self, core: AgentCore, plan: RunPlan, transport: Transport, options: NodeOptions, *,
                 clock: StepClock | None = None, fate: MessageFate | None = None, kill_round: int | None = None,
                 incarnation: int = 0, evaluation_set: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.core = core
        self.agent_id = core.agent_id
        self.plan = plan
        self.options = options
        self.clock = clock
        self.kill_round = kill_round
        self.incarnation = incarnation
        self.lock = threading.Lock()
        self.stop_requested = threading.Event()
        self.phases = PhaseClock()
        self.divergence: dict | None = None  # {"step", "what"} once this agent's loss or parameters went non-finite
        self.corrupt_rounds = {c.round for c in core.config.faults.corrupt if c.agent == core.agent_id}
        self._round_plan: tuple[int, RoundPlan | None] = (-1, None)
        first_row = plan.mixing_at(0)[core.agent_id]
        self.peers = PeerTable(core.agent_id, plan.support(),
                               {j: float(w) for j, w in enumerate(first_row) if j != core.agent_id and w > 0})
        self.report = Reporter(core, self.lock, evaluation_set, incarnation)
        event = self.report.event
        self.outbox = Outbox(core, plan, transport, self.peers, self.lock, timing=options.timing, fate=fate,
                             incarnation=incarnation)
        self.graph = GraphChanges(core, plan, self.outbox)
        self.inbox = Inbox(core, plan, transport, Mailbox(list(range(plan.topology.n)), self.peers), self.graph,
                           self.outbox, self.lock, self.phases, self.stop_requested, event, mode=options.mode,
                           staleness=options.staleness, wait_timeout_s=options.wait_timeout_s,
                           wait_past_timeout=options.wait_past_timeout, timed=options.timing is not None)
        self.leave_join = LeaveJoin(core, plan, self.outbox, self.inbox, self.phases, self.stop_requested, event,
                                    options.wait_timeout_s)
        self.news = PeerNews(core, self.outbox, self.inbox, self.graph, event)
        self.points = RestorePoints(core, self.outbox, self.graph, self.stop_requested, event,
                                    snapshot_every=options.snapshot_every, wait_timeout_s=options.wait_timeout_s)

    @property
    def supervisor(self) -> Supervisor | None:
        return self.report.supervisor

    @supervisor.setter
    def supervisor(self, supervisor: Supervisor | None) -> None:
        self.report.supervisor = supervisor

    def accept(self, letter: Letter) -> None:
        """A letter from a transport (any thread)."""
        self.inbox.accept(letter)

    # ------------------------------------------------------------ the round

    def local_step(self) -> None:
        """One local optimizer step, stretched to its simulated duration when timing is simulated."""
        step = self.core.step
        if self.leave_join.timeline_step(step):
            return
        started = time.perf_counter()
        with self.phases("train"):
            loss = self.core.train_step()
        if not math.isfinite(loss):
            self.diverge("loss")
            return
        factor = self.leave_join.step_factor(step)  # a timeline's, if it changes this agent's step time
        if self.clock is not None and (self.clock.active or factor is not None):
            with self.phases("sleep"):
                time.sleep(self.clock.extra_delay(time.perf_counter() - started, factor))

    def round_plan(self, round_index: int) -> RoundPlan | None:
        if self._round_plan[0] != round_index:
            self._round_plan = (round_index, self.plan.round_plan(round_index))
        return self._round_plan[1]

    def send_round(self, round_index: int) -> None:
        """The first half of a round: this agent's message to its receivers (fault injection may end it here)."""
        self.outbox.round_reached = round_index
        self.graph.step(round_index)
        if round_index == self.kill_round and self.supervisor is not None:
            self.supervisor.crash(self.agent_id, round_index, self.core.step)
        if round_index in self.corrupt_rounds:  # fault injection: this agent's parameters become NaN
            self.core.flat.data[0] = float("nan")
        if self.inbox.mailbox.asks or self.outbox.asked:
            with self.lock:  # resyncs asked for, ahead of this round's message
                self.outbox.answer(self.inbox.mailbox.take_asks())
        round_plan = self.round_plan(round_index)
        if round_plan is not None:
            receivers = round_plan.receivers_of(self.agent_id)
            if receivers and not all_finite([self.core.flat.data]):
                self.diverge("parameters")
                return
            if receivers:  # filtered for dead peers inside send(), under the lock (a peer may come back meanwhile)
                with self.phases("send"):
                    self.outbox.send(round_index, receivers)

    def finish_round(self, round_index: int) -> None:
        """The second half: wait as the mode says, absorb, mix; then a snapshot when one is due."""
        self.graph.step(round_index)  # (a silent round: it was not sent)
        round_plan = self.round_plan(round_index)
        me = self.agent_id
        if round_plan is not None:
            senders = round_plan.senders_to(me)
            if senders or me in round_plan.mixers:
                self.inbox.receive(round_index, senders, round_plan)
            if me in round_plan.mixers:
                gamma = self.gamma(round_index)
                self_weight, row = round_plan.weights[me]
                with self.phases("mix"), self.lock:  # a dropped sender's weight of this round goes to the self
                    self.core.mix(self_weight + self.peers.moved_weight(row), gamma)
        self.leave_join.send_states(round_index)  # (to an agent that joins from this one at the next round)
        self.points.after_round(round_index, self.supervisor)

    def gamma(self, round_index: int) -> float:
        """This round's averaging rate. An adaptive one comes from the coordinator after each epoch's record: in
        sync mode the node waits for it (so both engines mix with the same gamma), otherwise it takes the latest
        it has."""
        if self.options.mode == "sync" and not self.plan.has_gamma(round_index):
            deadline = time.time() + self.options.wait_timeout_s
            with self.phases("wait"):
                while not self.plan.has_gamma(round_index) and not self.stop_requested.is_set():
                    if time.time() > deadline:
                        self.report.event("gamma_timeout", round=round_index)
                        break
                    time.sleep(0.001)
        return self.plan.gamma(round_index)

    # ------------------------------------------------------------ the run's ends

    def announce(self) -> None:
        """A restarted (or resumed) agent's first letters (core.outbox.Outbox.announce)."""
        self.outbox.announce()

    def finish(self) -> None:
        """The loop ended: tell every live peer that nothing more comes."""
        self.outbox.finish(self.inbox.mailbox.take_asks)

    def diverge(self, what: str) -> None:
        """This agent's loss or parameters are no longer finite: it stops at once, sends nothing more, and tells
        the supervisor (which aborts the run or drops the agent, as train.on_divergence says)."""
        self.divergence = {"step": self.core.step, "what": what}
        self.stop_requested.set()
        if self.supervisor is not None:
            self.supervisor.diverged(self.agent_id, self.incarnation, self.core.step, what)

    def stop(self) -> int:
        """Ask the training loop to stop after its current step (a bounded/async run's quorum finished, an abort)."""
        self.stop_requested.set()
        self.inbox.mailbox.wake()
        return self.core.step

    def stats(self) -> dict:
        inbox = self.inbox
        delays = {j: {"count": len(v), "min_s": min(v), "mean_s": float(np.mean(v)), "max_s": max(v)}
                  for j, v in inbox.link_delays.items() if v}
        return {"agent": self.agent_id, "incarnation": self.incarnation, "steps": self.core.step,
                "waited_s": inbox.waited_s, **inbox.counters, **self.outbox.counters, "link_delays": delays,
                "phase_s": dict(self.phases.wall),
                "cpu_s": {**self.phases.cpu, "loop": self.phases.loop_cpu, "process": self.phases.process_cpu},
                **self.report.traffic_counts()}
