"""A gossip node's snapshots (for restarts) and its part in the run's checkpoint barrier."""

from __future__ import annotations

import time

import torch

from .graph_links import GraphLinks


class Checkpointing:
    """The snapshot and checkpoint part of a GossipNode (a mixin: `self` is the node)."""

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """AgentCore.snapshot(), taken while no resync or drop changes the rule state."""
        with self.link_lock:
            return self.core.snapshot()

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> int:
        """Continue from a snapshot (a restarted agent, before it runs); returns the step it continues at."""
        with self.link_lock:
            self.core.restore(tensors, meta)
            self.round_reached = self.core.step // self.plan.local_steps - 1
            if self.links is not None:  # the snapshot's s counts its links with the weights of its round
                self.links = GraphLinks(self.plan, self.agent_id, self.round_reached)
            if self.core.link_copies is not None:  # the snapshot may predate drops this agent already knows of
                for j in self.peers.dropped:
                    self.core.drop_link(j, self.link_weight(j))
        return self.core.step

    def keep_snapshot(self) -> None:
        tensors, meta = self.snapshot()
        self.supervisor.keep_snapshot(self.agent_id, self.incarnation, tensors, meta)

    def offer_checkpoint(self, step: int) -> None:
        """Give the supervisor this agent's state after `step` (then await_release: nobody sends the next round's
        messages before every agent's state is in, a consistent cut)."""
        tensors, meta = self.snapshot()
        self.barrier.clear()
        self.barrier_step = step
        self.supervisor.keep_checkpoint(self.agent_id, self.incarnation, step, tensors, meta)

    def await_release(self, step: int) -> None:
        deadline = time.time() + self.options.wait_timeout_s
        while not self.barrier.wait(0.2):
            if self.stop_requested.is_set():
                return
            if time.time() > deadline:
                self.event("checkpoint_timeout", step=step + 1)
                return

    def release(self, step: int) -> None:
        """The checkpoint of `step` is written: the loop goes on (a late release of an earlier one is ignored)."""
        if step == self.barrier_step:
            self.barrier.set()
