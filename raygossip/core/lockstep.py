"""Several gossip nodes of one process stepped on one thread: lockstep sync loops and batched local steps."""

from __future__ import annotations

import math
import time

from .batched import BatchedSteps
from .node import GossipNode


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


def run_together(nodes: list[GossipNode], checkpoints: bool = False, resync: bool = False,
                 batched: BatchedSteps | None = None) -> list[dict]:
    """The loops of several nodes of one process in sync mode, in lockstep on one thread: every node's local step
    and send (those with a neighbour in another process first), then every node's receive and mix, so no node waits
    on a thread switch to another; a node's letter depends on its own state only, so this is the reference
    engine's arithmetic. Every node must be at the same step. Returns each node's stats. batched: the
    nodes' BatchedSteps (runtime.batched_steps), to take their local steps as one call."""
    plan = nodes[0].plan
    cpu_began, process_began = time.thread_time(), time.process_time()
    every = nodes[0].options.checkpoint_every if checkpoints else 0
    for node in nodes:
        if node.incarnation > 0 or resync:
            node.announce()
    here = {node.agent_id for node in nodes}  # nodes with a neighbour in another process first: their letters
    ordered = sorted(nodes, key=lambda node: all(j in here for j in node.peers.out_neighbours))  # then travel
    for step in range(nodes[0].core.step, plan.total_steps):  # while the others step (the numbers do not change)
        live = [node for node in ordered if not node.stop_requested.is_set()]
        if not live:
            break
        round_index = plan.round_after_step(step)
        if batched is not None:
            step_together(live, batched)
        for node in live:
            if batched is None:
                node.local_step()
            if round_index is not None and node.divergence is None:
                node.send_round(round_index)
        live = [node for node in live if node.divergence is None]
        if round_index is not None:
            for node in live:
                node.finish_round(round_index)
        if plan.is_eval_step(step):
            for node in live:
                with node.phases("report"):
                    node.report_evaluation(step)
        if every and round_index is not None and (round_index + 1) % every == 0 and step + 1 < plan.total_steps:
            for node in live:
                node.offer_checkpoint(step)
            for node in live:
                with node.phases("wait"):
                    node.await_release(step)
    for node in nodes:
        node.finish()
    if nodes[0].supervisor is not None:
        nodes[0].supervisor.flush()
    share = 1.0 / len(nodes)  # of the one thread's CPU
    for node in nodes:
        node.phases.loop_cpu += (time.thread_time() - cpu_began) * share
        node.phases.process_cpu += (time.process_time() - process_began) * share
    return [node.stats() for node in nodes]
