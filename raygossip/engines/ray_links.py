"""A node's transport and supervisor on Ray: letters by actor call, shared-memory channel or in memory (agents of
one actor), and the line to the coordinator (reports, events, snapshots, checkpoints)."""

from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import ray
import torch

from raygossip.algorithms.compressors import Compressed
from raygossip.core.wire import Kind, Letter
from raygossip.engines.channels import ChannelLinks
from raygossip.engines.snapshots import write_snapshot

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Letters that go by actor call even where a channel exists: a resync request and the copy that answers it may come
# after the receiver's loop ended, when nobody reads its channels (a channel holds one unread letter: the final one);
# a call reaches it in its mail thread. Each stream's order is kept by seq in the mailbox whatever the way.
BY_CALL = frozenset({Kind.ASK, Kind.RESYNC})


class RayTransport:
    """One hosted agent's links. A receiver hosted by the same actor gets the letter in memory (the message is
    read-only for its receivers); one with a shared-memory channel from this agent gets it there; any other by
    an actor call (`deliver`), the message inside the call when it is at most inline_bytes, else put into the
    object store once for all receivers (its reference wrapped in a list so that Ray does not fetch it early).

    On the wire a letter is Letter.to_wire() with payload ("value", numel, arrays), ("ref", [ObjectRef]) or None."""

    def __init__(self, agent: int, hosted: dict[int, Any], inline_bytes: int, wait_timeout_s: float,
                 device: torch.device) -> None:
        self.agent = agent
        self.hosted = hosted  # agent -> GossipNode of this actor (shared by its agents' transports)
        self.handles: dict[int, Any] = {}  # agent -> the actor that hosts it
        self.links = ChannelLinks()
        self.inline_bytes = inline_bytes
        self.wait_timeout_s = wait_timeout_s
        self.device = device
        self.by_reference = 0
        self.packed: tuple[Compressed | None, Any] = (None, None)  # the last message, converted once for all

    @property
    def pulls(self) -> bool:
        return bool(self.links.inbound)

    def post(self, receiver: int, letter: Letter) -> None:
        node = self.hosted.get(receiver)
        if node is not None:
            node.accept(letter)
            return
        wire = letter.to_wire(self.wire(letter.payload))
        if letter.kind in BY_CALL or not self.links.write(receiver, wire, time.time() + self.wait_timeout_s):
            self.handles[receiver].deliver.remote(receiver, wire)

    def wire(self, message: Compressed | None) -> Any:
        if message is None:
            return None
        if self.packed[0] is message:
            return self.packed[1]
        numel, arrays = message.to_wire()
        if message.nbytes <= self.inline_bytes or self.links.out:  # a channel takes any size
            packed = ("value", numel, arrays)
        else:
            self.by_reference += 1
            packed = ("ref", [ray.put((numel, arrays))])
        self.packed = (message, packed)
        return packed

    def pull(self, sender: int, satisfied: Callable[[], bool], deadline: float,
             stopped: Callable[[], bool]) -> Iterator[Letter]:
        for wire in self.links.pull(sender, satisfied, deadline, stopped):
            yield Letter.from_wire(wire, wire[5])

    def open(self, letters: list[Letter]) -> list[Compressed | None]:
        """Each letter's message (None when it is lost); the ones sent by reference are fetched in one ray.get, or
        one by one if that fails (a reference whose sender died is lost)."""
        refs = [letter.payload[1][0] for letter in letters if _by_reference(letter.payload)]
        try:
            fetched = ray.get(refs, timeout=self.wait_timeout_s) if refs else []
        except ray.exceptions.RayError:
            fetched = []
            for ref in refs:
                try:
                    fetched.append(ray.get(ref, timeout=10))
                except (ray.exceptions.RayError, TimeoutError):
                    fetched.append(None)
        fetched_iter = iter(fetched)
        out: list[Compressed | None] = []
        for letter in letters:
            payload = letter.payload
            if payload is None or isinstance(payload, Compressed):
                out.append(payload)
                continue
            pair = next(fetched_iter) if _by_reference(payload) else payload[1:]
            out.append(None if pair is None else Compressed.from_wire(pair[0], pair[1], self.device))
        return out

    def close(self, peer: int) -> None:
        self.links.close(peer)


def _by_reference(payload: Any) -> bool:
    return isinstance(payload, tuple) and payload[0] == "ref"


def to_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


class CoordinatorClient:
    """The coordinator, as the nodes of one actor see it: calls in flight are kept until flush(). What a restarted
    coordinator may have lost is kept here until it is safe (resend): reports of steps not yet recorded, the last
    snapshot sent by value and the last checkpoint offer of each hosted agent. The coordinator is created with
    max_task_retries, so calls made while it is down wait for its restart."""

    def __init__(self, coordinator: Any, snapshot_dir: str | None, wait_timeout_s: float) -> None:
        self.coordinator = coordinator
        self.wait_timeout_s = wait_timeout_s
        self.snapshot_dir = snapshot_dir  # set on the coordinator's node: snapshots go there as files
        self.outstanding: list[Any] = []
        self.lock = threading.Lock()
        self.unconfirmed: dict[tuple[int, int], tuple] = {}  # (agent, step) -> the report's arguments
        self.report_calls: list[Any] = []  # each returns the step below which every report is recorded
        self.sent: dict[int, tuple] = {}  # agent -> (incarnation, its last snapshot in the object store, meta)
        self.offers: dict[int, tuple] = {}  # agent -> (incarnation, step, its last checkpoint state, meta)

    def _keep(self, ref: Any) -> None:
        with self.lock:
            self.outstanding.append(ref)

    def event(self, event: dict) -> None:
        self._keep(self.coordinator.record_event.remote(event))

    def report(self, agent: int, step: int, accuracy: float | None, state: dict[str, torch.Tensor], loss: float,
               traffic: dict, incarnation: int) -> None:
        args = (agent, step, accuracy, [ray.put(to_numpy(state))], loss, traffic, incarnation)
        with self.lock:
            self._confirmed()
            self.unconfirmed[(agent, step)] = args
        self._send_report(args)

    def _send_report(self, args: tuple) -> None:
        ref = self.coordinator.report.remote(*args)
        with self.lock:
            self.outstanding.append(ref)
            self.report_calls.append(ref)

    def _confirmed(self) -> None:
        """Forget the reports of steps the coordinator has recorded (the answers of report calls that returned)."""
        if not self.report_calls:
            return
        ready, self.report_calls = ray.wait(self.report_calls, num_returns=len(self.report_calls), timeout=0)
        below = []
        for ref in ready:
            try:
                below.append(ray.get(ref))
            except ray.exceptions.RayError:
                pass
        if below:
            recorded = max(below)
            for key in [key for key in self.unconfirmed if key[1] < recorded]:
                del self.unconfirmed[key]

    def resend(self) -> None:
        """The coordinator restarted: the reports it may not have recorded, the snapshots and checkpoint offers it
        may have lost (it ignores what it has); returns once it has them all."""
        with self.lock:
            reports, sent, offers = list(self.unconfirmed.values()), dict(self.sent), dict(self.offers)
        calls = [self.coordinator.report.remote(*args) for args in sorted(reports, key=lambda a: (a[1], a[0]))]
        calls += [self.coordinator.keep_snapshot.remote(agent, incarnation, ref, meta)
                  for agent, (incarnation, ref, meta) in sent.items()]
        calls += [self.coordinator.keep_checkpoint.remote(agent, incarnation, step, ref, meta)
                  for agent, (incarnation, step, ref, meta) in offers.items()]
        ray.get(calls, timeout=self.wait_timeout_s)  # in before the coordinator goes on (its wait_finished waits)

    def keep_snapshot(self, agent: int, incarnation: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Keep an agent's whole state where its death does not lose it. On the coordinator's node: a file in
        shared memory, which the coordinator reads only if it restarts the agent (no call, one copy). From another
        node: sent to the coordinator, which copies it (it survives the loss of this node)."""
        if self.snapshot_dir is not None:
            try:
                write_snapshot(self.snapshot_dir, agent, tensors, meta)
                return
            except OSError as error:  # shared memory full, say: from now on by value
                self.event({"kind": "snapshot_file_failed", "agent": agent, "time": time.time(), "error": str(error)})
                self.snapshot_dir = None
        ref = ray.put(to_numpy(tensors))  # (a reference at the top level: Ray hands the coordinator its value)
        with self.lock:
            self.sent[agent] = (incarnation, ref, meta)
        self._keep(self.coordinator.keep_snapshot.remote(agent, incarnation, ref, meta))

    def keep_checkpoint(self, agent: int, incarnation: int, step: int, tensors: dict[str, torch.Tensor],
                        meta: dict) -> None:
        ref = ray.put(to_numpy(tensors))
        with self.lock:
            self.offers[agent] = (incarnation, step, ref, meta)
        self._keep(self.coordinator.keep_checkpoint.remote(agent, incarnation, step, ref, meta))

    def crash(self, agent: int, round_index: int, step: int) -> None:
        """Fault injection: this process (and every agent it hosts) dies now, after telling the coordinator."""
        try:
            ray.get(self.coordinator.record_event.remote(
                {"kind": "fault_injected", "agent": agent, "round": round_index, "step": step, "time": time.time()}),
                timeout=10)
        finally:
            os._exit(1)

    def diverged(self, agent: int, incarnation: int, step: int, what: str) -> None:
        """Tell the coordinator and wait until it acted (dropped the agent everywhere, or began the abort), so that
        every neighbour knows before this agent's final letter reaches it."""
        ray.get(self.coordinator.agent_diverged.remote(agent, incarnation, step, what), timeout=self.wait_timeout_s)

    def flush(self) -> None:
        with self.lock:
            pending, self.outstanding = self.outstanding, []
        ray.get(pending, timeout=self.wait_timeout_s)
