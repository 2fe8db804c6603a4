"""A node's restore points: the snapshots it keeps with the supervisor (for restarts), its state in the run's
checkpoint and the barrier after it, and continuing from either."""

from __future__ import annotations

import threading
import time

import torch

from .agent import AgentCore
from .graph_links import GraphChanges
from .outbox import Outbox
from .transports import Supervisor


class RestorePoints:
    """Snapshots, restore and the checkpoint barrier of one agent. `events(kind, **fields)` reports to the
    supervisor; `stopped` ends the barrier's wait."""

    def __init__(self, core: AgentCore, outbox: Outbox, graph: GraphChanges, stopped: threading.Event, events,
                 *, snapshot_every: int, wait_timeout_s: float) -> None:
        self.core = core
        self.outbox = outbox
        self.graph = graph
        self.stopped = stopped
        self.event = events
        self.snapshot_every = snapshot_every
        self.wait_timeout_s = wait_timeout_s
        self.barrier = threading.Event()
        self.barrier_step = -1

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """AgentCore.snapshot(), taken while no resync or drop changes the rule state."""
        with self.outbox.lock:
            return self.core.snapshot()

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> int:
        """Continue from a snapshot (a restarted agent, before it runs); returns the step it continues at."""
        with self.outbox.lock:
            self.core.restore(tensors, meta)
            self.outbox.round_reached = self.core.step // self.outbox.plan.local_steps - 1
            self.graph.restored(self.outbox.round_reached)
        return self.core.step

    def after_round(self, round_index: int, supervisor: Supervisor | None) -> None:
        """A snapshot kept with the supervisor when one is due after this round (runtime.snapshot_every)."""
        every = self.snapshot_every
        if every and (round_index + 1) % every == 0 and supervisor is not None:
            tensors, meta = self.snapshot()
            supervisor.keep_snapshot(self.core.agent_id, self.outbox.incarnation, tensors, meta)

    def offer_checkpoint(self, step: int, supervisor: Supervisor) -> None:
        """Give the supervisor this agent's state after `step` (then await_release: nobody sends the next round's
        messages before every agent's state is in, a consistent cut)."""
        tensors, meta = self.snapshot()
        self.barrier.clear()
        self.barrier_step = step
        supervisor.keep_checkpoint(self.core.agent_id, self.outbox.incarnation, step, tensors, meta)

    def await_release(self, step: int) -> None:
        deadline = time.time() + self.wait_timeout_s
        while not self.barrier.wait(0.2):
            if self.stopped.is_set():
                return
            if time.time() > deadline:
                self.event("checkpoint_timeout", step=step + 1)
                return

    def release(self, step: int) -> None:
        """The checkpoint of `step` is written: the loop goes on (a late release of an earlier one is ignored)."""
        if step == self.barrier_step:
            self.barrier.set()
