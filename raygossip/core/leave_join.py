"""A node under a timeline's leave and join: the steps it is away, the model it hands to an agent that joins from it,
the joiner's wait for that model and fresh start; and the timeline events this agent reports as they take effect."""

from __future__ import annotations

import threading
import time

import torch

from .agent import AgentCore
from .inbox import Inbox
from .outbox import Outbox
from .phases import PhaseClock
from .plan import RunPlan
from .timeline import timeline_record
from .wire import Kind


class LeaveJoin:
    """One agent's part in the timeline's leaves and joins. `events(kind, **fields)` reports to the supervisor."""

    def __init__(self, core: AgentCore, plan: RunPlan, outbox: Outbox, inbox: Inbox, phases: PhaseClock,
                 stopped: threading.Event, events, wait_timeout_s: float) -> None:
        self.core = core
        self.agent_id = core.agent_id
        self.plan = plan
        self.outbox = outbox
        self.inbox = inbox
        self.phases = phases
        self.stopped = stopped
        self.event = events
        self.wait_timeout_s = wait_timeout_s

    def timeline_step(self, step: int) -> bool:
        """At a round's first step: record the timeline events that take effect now (those this agent reports), and
        come back if this agent joins now. True when this agent is away during this step (a timeline's leave): it
        only counts the step."""
        timeline, local = self.plan.timeline, self.plan.local_steps
        if step % local == 0:
            round_index = step // local
            joining = self.plan.joins(round_index).get(self.agent_id) if timeline.has_leaves else None
            if joining is not None:  # first, so that the join's time_s is when it came back, not when it got here
                self.join(round_index, *joining)
            for index, event in timeline.events_at(round_index):
                if timeline.reporter(event) == self.agent_id:
                    self.event(**timeline_record(index, event, round_index, step))
        if timeline.has_leaves and self.plan.absent(self.agent_id, step):
            self.core.step += 1
            return True
        return False

    def step_factor(self, step: int) -> float | None:
        """The timeline's slowdown factor of this local step (None: the timeline never changes this agent's)."""
        if not self.plan.timeline.slows(self.agent_id):
            return None
        return self.plan.timeline.factor(self.agent_id, step, self.plan.local_steps)

    def join(self, round_index: int, start: str, sponsor: int | None) -> None:
        """Come back at this round: from the model `sponsor` sent after the previous round (start: neighbour), or
        from the initial model (scratch); either way with fresh optimizer and rule state, as a new device. A scratch
        joiner too waits for its sponsor's letter of the previous round (empty), so that it comes back when the
        others get there, not as soon as it went through its absent rounds (in no time)."""
        arrays = self.await_state(sponsor, round_index) if sponsor is not None else None
        if start == "scratch":
            arrays = self.core.initial_state()
        with self.outbox.lock:
            if arrays is not None:
                self.core.load_parameters_vector(arrays["params"])
                self.core.load_buffers({k[len("buffer."):]: v for k, v in arrays.items() if k.startswith("buffer.")})
            self.core.start_afresh()
            self.inbox.clear()

    def await_state(self, sponsor: int, round_index: int) -> dict[str, torch.Tensor] | None:
        """The model `sponsor` sent this joining agent after round round_index - 1 (None: it never came). The wait
        grows with the rounds this agent was away (it went through them without training, ahead of the others)."""
        mailbox = self.inbox.mailbox
        away = sum(self.plan.absent(self.agent_id, s) for s in range(self.core.step))
        deadline = time.time() + self.wait_timeout_s * (1 + away // self.plan.local_steps)

        def arrived(now: float) -> bool:
            return any(l.kind is Kind.STATE and l.available_at <= now for l in mailbox.queues.get(sponsor, ()))

        transport = self.inbox.transport
        with self.phases("wait"):
            if transport.pulls:
                for letter in transport.pull(sponsor, lambda: arrived(float("inf")), deadline, self.stopped.is_set):
                    self.inbox.accept(letter)
            mailbox.wait_until(lambda now: self.stopped.is_set() or arrived(now) or mailbox.peers.absent(sponsor),
                               deadline)
        states = [l for l in mailbox.take_ready(sponsor, round_index - 1) if l.kind is Kind.STATE][-1:]
        message = transport.open(states)[0] if states else None
        if message is None:
            self.event("join_timeout", round=round_index, sponsor=sponsor)
            return None
        return message.arrays

    def send_states(self, round_index: int) -> None:
        """After this round: this agent's model to each agent that joins at the next round from it."""
        if not self.plan.timeline.has_leaves:
            return
        for agent, (start, sponsor) in self.plan.joins(round_index + 1).items():
            if sponsor != self.agent_id:
                continue
            arrays = {} if start == "scratch" else {  # (scratch: only the word that this round is done)
                "params": self.core.parameters_vector(), **{f"buffer.{k}": v for k, v in self.core.buffers().items()}}
            with self.outbox.lock:
                self.outbox.post_whole(agent, Kind.STATE, round_index, arrays)
