"""What a gossip node does for the run's timeline: record events as they take effect, leave and join, link faults,
and, for CHOCO/AdaGossip, keep s = sum_j W_ij x_hat_j when the graph changes.

GossipNode inherits these; they read the node's plan, mailbox, transport and core, and change nothing else.
"""

from __future__ import annotations

import time

import torch

from ..algorithms.compressors import Compressed
from .timeline import lost_on_link, timeline_record
from .wire import Kind


class TimelineSteps:
    """The timeline's part of a GossipNode's round loop (a mixin: `self` is the node)."""

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
        with self.link_lock:
            if arrays is not None:
                self.core.load_parameters_vector(arrays["params"])
                self.core.load_buffers({k[len("buffer."):]: v for k, v in arrays.items() if k.startswith("buffer.")})
            self.core.optimizer.state.clear()
            self.core.state = self.rule.init(self.core.flat.data)
            if self.core.link_copies is not None:  # (s is zero again: it knows no neighbour's public copy)
                self.core.link_copies = {}
            self.last_models.clear()

    def await_state(self, sponsor: int, round_index: int) -> dict[str, torch.Tensor] | None:
        """The model `sponsor` sent this joining agent after round round_index - 1 (None: it never came). The wait
        grows with the rounds this agent was away (it went through them without training, ahead of the others)."""
        mailbox = self.mailbox
        away = sum(self.plan.absent(self.agent_id, s) for s in range(self.core.step))
        deadline = time.time() + self.options.wait_timeout_s * (1 + away // self.plan.local_steps)

        def arrived(now: float) -> bool:
            return any(l.kind is Kind.STATE and l.available_at <= now for l in mailbox.queues.get(sponsor, ()))

        with self.phases("wait"):
            if self.transport.pulls:
                for letter in self.transport.pull(sponsor, lambda: arrived(float("inf")), deadline,
                                                  self.stop_requested.is_set):
                    self.accept(letter)
            mailbox.wait_until(lambda now: self.stop_requested.is_set() or arrived(now) or sponsor in mailbox.down,
                               deadline)
        states = [l for l in mailbox.take_ready(sponsor, round_index - 1) if l.kind is Kind.STATE][-1:]
        message = self.transport.open(states)[0] if states else None
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
            nbytes = sum(t.numel() * t.element_size() for t in arrays.values())
            now = time.time()
            with self.link_lock:
                self.core.traffic.record([agent], nbytes)
                self.post(agent, Kind.STATE, round_index, Compressed(arrays, self.core.flat.data.numel()), now,
                          now + self.delay(nbytes, agent))

    def link_delay_to(self, receiver: int, nbytes: int) -> float | None:
        """Seconds on the link to `receiver` as the timeline's link conditions say (None: no link event)."""
        if not self.plan.timeline.has_links:
            return None
        return self.plan.conditions(max(0, self.round_reached)).link_of(self.agent_id, receiver).delay(nbytes)

    def lost_on_link(self, receiver: int, round_index: int) -> bool:
        """Whether a timeline `link` loss drops this round's message to `receiver` (seeded)."""
        if not self.plan.timeline.has_links:
            return False
        loss = self.plan.conditions(round_index).link_of(self.agent_id, receiver).loss
        return lost_on_link(loss, self.core.config.seed, self.agent_id, receiver, round_index, self.incarnation)

    # ------------------------------------------------------------ a changing graph with public copies

    def graph_step(self, round_index: int) -> None:
        """Once per round, before this round's message (CHOCO/AdaGossip under a timeline that changes the graph):
        the in-links whose weight W_ij changes now are re-weighted in s (s += (new - old) x_hat_j as known) or
        dropped, and this agent's whole public copy goes, as a link letter, to every agent whose link from it opens
        now (the rule's resync adds it there), so that s_i = sum_j W_ij x_hat_j holds for the new W."""
        if self.links is None or not self.links.changed(round_index):
            return
        with self.link_lock:
            for j in self.peers.others:
                self.move_link(j, round_index)
            for k in self.peers.live(self.links.opened(round_index, outgoing=True)):
                x_hat = self.core.public_copy()
                nbytes = x_hat.numel() * x_hat.element_size()
                sent_at = time.time()
                self.core.traffic.record([k], nbytes)
                self.post(k, Kind.LINK, round_index, Compressed({"x_hat": x_hat}, x_hat.numel()), sent_at,
                          sent_at + self.delay(nbytes, k))

    def move_link(self, sender: int, round_index: int) -> None:
        """The in-link from `sender` takes its weight of this round, if that round is later than its weight's (call
        with link_lock held)."""
        change = self.links.move(sender, round_index)
        if change is not None:
            self.core.reweight_link(sender, *change)

    def opened_links(self, round_index: int) -> list[int]:
        """The agents whose link to this one opens at this round (their link letters come this round)."""
        if self.links is None:
            return []
        return self.peers.live(self.links.opened(round_index, outgoing=False))
