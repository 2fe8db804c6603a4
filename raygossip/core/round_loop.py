"""The one round loop: the local steps, sends, receives and mixes of one or more nodes of one process, in lockstep.

Every engine and every k drives its nodes with `run_rounds`: a Ray actor its one agent (a thread each, any mode) or
its k agents (sync mode, one thread), the reference engine all of them, with itself as the Steward between phases.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

from .batched import BatchedSteps
from .node import GossipNode


class Steward(Protocol):
    """An engine that owns every node of the run (the reference engine) and acts between the loop's phases."""

    ended: bool  # the run is over (aborted): the loop stops before anything more is sent or waited for

    def step_began(self, step: int) -> None: ...

    def settle(self) -> None: ...  # after the local steps and after the sends: divergences become drops or an abort

    def step_done(self, step: int, round_index: int | None) -> None: ...  # records, checkpoints, progress


def step_together(nodes: list[GossipNode], batched: BatchedSteps) -> None:
    """Every node's local step as one batched call (core.batched), its wall and CPU time shared evenly among them."""
    started, cpu_began = time.perf_counter(), time.thread_time()
    losses = batched.step([node.core for node in nodes])
    wall, cpu = (time.perf_counter() - started) / len(nodes), (time.thread_time() - cpu_began) / len(nodes)
    for node, loss in zip(nodes, losses):
        node.phases.wall["train"] += wall
        node.phases.cpu["train"] += cpu
        if not math.isfinite(loss):
            node.diverge("loss")
            continue
        if node.clock is not None and node.clock.active:
            with node.phases("sleep"):
                time.sleep(node.clock.extra_delay(wall))


def run_rounds(nodes: list[GossipNode], *, checkpoints: bool = False, resync: bool = False,
               batches: list[tuple[list[GossipNode], BatchedSteps]] = (), steward: Steward | None = None) -> list[dict]:
    """The nodes' loops to the end (or until stopped), on this thread: every node's local step and send (those with a
    neighbour in another process first: their letters travel while the others step), then every node's receive and
    mix. With a steward, every local step comes before every send, and the steward acts after each of the two. A
    node's letter depends on its own state only, so with one node or many, on either engine, the arithmetic is the
    same. Every node must be at the same step. Returns each node's stats.

    checkpoints: stop at every checkpoint_every-th round until the supervisor wrote the run's checkpoint; resync:
    first resend the whole public copy to every neighbour (a restarted agent, or a run resumed from an asynchronous
    checkpoint); batches: groups of nodes whose local steps are one call (runtime.batched_steps)."""
    plan = nodes[0].plan
    cpu_began, process_began = time.thread_time(), time.process_time()
    every = nodes[0].options.checkpoint_every if checkpoints else 0
    in_batches = {id(node) for members, _ in batches for node in members}
    for node in nodes:
        if node.incarnation > 0 or resync:
            node.announce()
    here = {node.agent_id for node in nodes}
    ordered = sorted(nodes, key=lambda node: all(j in here for j in node.peers.out_neighbours))
    for step in range(nodes[0].core.step, plan.total_steps):
        live = [node for node in ordered if not node.stop_requested.is_set()]
        if not live:
            break
        if steward is not None:
            steward.step_began(step)
        live_ids = {id(node) for node in live}
        for members, group in batches:
            together = [node for node in members if id(node) in live_ids]
            if together:
                step_together(together, group)
        round_index = plan.round_after_step(step)
        early = steward is None and round_index is not None  # (nobody acts between the steps and the sends)
        for node in live:
            if id(node) not in in_batches:
                node.local_step()
            if early and node.divergence is None:  # its letters travel while the others step
                node.send_round(round_index)
        live = _settled(live, steward)
        if live and round_index is not None:
            live = gossip_round(live, round_index, steward, sent=early)
        if steward is not None and steward.ended:
            break
        if plan.is_eval_step(step):
            for node in live:
                with node.phases("report"):
                    node.report.report_evaluation(step)
        if steward is not None:
            steward.step_done(step, round_index)
        if every and round_index is not None and (round_index + 1) % every == 0 and step + 1 < plan.total_steps:
            for node in live:
                node.points.offer_checkpoint(step, node.supervisor)
            for node in live:
                with node.phases("wait"):
                    node.points.await_release(step)
    for node in nodes:
        node.finish()
    if nodes[0].supervisor is not None:
        nodes[0].supervisor.flush()  # every report is in before the end
    share = 1.0 / len(nodes)  # of the one thread's CPU
    for node in nodes:
        node.phases.loop_cpu += (time.thread_time() - cpu_began) * share
        node.phases.process_cpu += (time.process_time() - process_began) * share
    return [node.stats() for node in nodes]


def gossip_round(live: list[GossipNode], round_index: int, steward: Steward | None = None,
                 sent: bool = False) -> list[GossipNode]:
    """One round of these nodes after their local steps: every send (unless `sent` already), the steward's turn,
    then every receive and mix. Returns the nodes that went on."""
    if not sent:
        for node in live:
            node.send_round(round_index)
        live = _settled(live, steward)
    for node in live:
        node.finish_round(round_index)
    return live


def _settled(live: list[GossipNode], steward: Steward | None) -> list[GossipNode]:
    """The nodes that go on: the steward acted on what happened (drops, an abort), and no node diverged."""
    if steward is not None:
        steward.settle()
        if steward.ended:
            return []
    return [node for node in live if node.divergence is None]
