"""The in-process reference engine: N gossip nodes stepped one after another, synchronous and deterministic."""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from raygossip.core.agent import AgentCore
from raygossip.core.batched import BatchedSteps
from raygossip.core.faults import MessageFate
from raygossip.core.node import GossipNode, NodeOptions
from raygossip.core.placement import agent_groups
from raygossip.core.round_loop import gossip_round, run_rounds
from raygossip.core.timeline import timeline_record
from raygossip.core.transports import InProcessTransport
from raygossip.engines.common import (
    AdaptiveRate, MergedModel, Observer, RunSetup, agent_threads, average_buffers, merge_all, network_record, prepare,
    metric_key, public_copy_error,
)
from raygossip.algorithms.merge import global_average
from raygossip.config import Config


LOSS_COUNTERS = ("lost_messages", "resyncs", "resyncs_asked", "resyncs_sent", "resync_bytes")  # (node stats, summed)


class ReferenceEngine:
    """The oracle: the Ray engine's round loop (core.round_loop) over all the run's nodes, in an in-process transport,
    stepped in a fixed order (every agent's local step, then every agent's send, then every agent's receive and mix),
    so the Ray engine in sync mode reproduces these numbers exactly. Between the loop's phases the engine is the
    loop's Steward: it drops or aborts on a divergence, records, checkpoints."""

    name = "reference"

    def __init__(self, config: Config, setup: RunSetup | None = None) -> None:
        self.config = config
        torch.set_num_threads(agent_threads(config.runtime))  # what a Ray agent gets: the same numbers
        self.setup = setup or prepare(config)
        device = "cpu" if config.runtime.device == "auto" else config.runtime.device
        self.device = torch.device(device)
        plan = self.setup.plan
        self.agents = [
            AgentCore(i, config, self.setup.dataset, self.setup.shards[i], plan.total_steps, self.device,
                      track_links=config.train.on_divergence == "drop",  # (a dropped agent's copy leaves s)
                      task=self.setup.task)
            for i in range(config.agents.count)
        ]
        nodes: dict[int, GossipNode] = {}
        options = NodeOptions(mode="sync", wait_timeout_s=config.runtime.wait_timeout_s)
        transport = InProcessTransport(nodes)
        nodes.update({agent.agent_id: GossipNode(agent, plan, transport, options,  # (seeded losses: faults.drop_messages)
                                                 fate=MessageFate(config.faults, config.seed, agent.agent_id, 0))
                      for agent in self.agents})
        self.nodes = [nodes[i] for i in range(config.agents.count)]
        self.live = list(range(config.agents.count))  # agents not dropped (train.on_divergence: drop)
        self.aborted: dict | None = None
        self.batched: list[tuple[list[GossipNode], BatchedSteps]] = []
        if config.runtime.batched_steps:  # the Ray engine's actors, stepped as they step their agents
            groups = agent_groups(self.setup.plan.support(), config.runtime.agents_per_actor)
            self.batched = [([self.nodes[i] for i in g], BatchedSteps([self.agents[i] for i in g])) for g in groups]
        self.merged = MergedModel(self.setup, self.device)
        self.adaptive = AdaptiveRate(plan)  # (schedule.averaging_rate.kind adaptive: gamma from each epoch's record)
        self.events: list[dict] = []
        self.rounds_done = 0
        self.communication_rounds = 0
        self.started = 0.0
        self.running: dict = {}  # what one run's step_done needs: records, observer, progress bar, checkpoint folder

    # ------------------------------------------------------------ the round loop's steward

    @property
    def ended(self) -> bool:
        return self.aborted is not None

    def step_began(self, step: int) -> None:
        self.note_timeline(step)
        round_index = self.setup.plan.round_after_step(step)
        if round_index is not None:
            self.count_round(round_index)

    def count_round(self, round_index: int) -> None:
        self.rounds_done = round_index + 1
        if self.setup.plan.round_plan(round_index) is not None:
            self.communication_rounds += 1

    def settle(self) -> None:
        """After the local steps and after the sends: a diverged agent is dropped, or the run aborts; then every node
        stops at once (none waits for a letter that will never come)."""
        self.check_divergence()
        if self.aborted is not None:
            for node in self.nodes:
                node.stop()

    def gossip_round(self, round_index: int) -> None:
        """One round of the live agents after their local steps (what the round loop does; for tests that step the
        engine by hand)."""
        self.count_round(round_index)
        gossip_round(self.live_nodes(), round_index, self)

    def step_done(self, step: int, round_index: int | None) -> None:
        """A record at an evaluation step, a checkpoint when one is due."""
        run = self.running
        if self.setup.plan.is_eval_step(step):
            record = self.evaluate(step)
            run["records"].append(record)
            gamma_set = self.adaptive.observe(step, record["consensus_distance"])
            if gamma_set is not None:
                self.events.append({"time_s": self.elapsed(), **gamma_set})
            if run["observer"] is not None:
                run["observer"](record)
            run["bar"].set_postfix(round=record["round"], merged=f"{record[metric_key('merged_test_accuracy', self.config)]:.3f}",
                                   MB=f"{record['bytes_sent'] / 1e6:.1f}")
        every = self.config.runtime.checkpoint_every
        if run["checkpoint_dir"] is not None and every and round_index is not None and (round_index + 1) % every == 0:
            self.checkpoint(run["checkpoint_dir"], step, len(run["records"]))
        run["bar"].update(1)

    def note_timeline(self, step: int) -> None:
        """At a round's first step: record the timeline events that take effect now (every one, on this engine)."""
        plan = self.setup.plan
        if step % plan.local_steps == 0:
            for index, event in plan.timeline.events_at(step // plan.local_steps):
                self.events.append({"time_s": self.elapsed(), **timeline_record(index, event, step // plan.local_steps, step)})

    def live_nodes(self) -> list[GossipNode]:
        return [self.nodes[i] for i in self.live]

    def live_agents(self) -> list[AgentCore]:
        return [self.nodes[i].core for i in self.live]

    def check_divergence(self) -> None:
        """Agents whose loss or parameters went non-finite: abort the run or drop them (train.on_divergence)."""
        for node in [node for node in self.live_nodes() if node.divergence is not None]:
            i, step, what = node.agent_id, node.divergence["step"], node.divergence["what"]
            self.events.append({"time_s": self.elapsed(), "kind": "diverged", "agent": i, "step": step, "what": what,
                                "unix_s": time.time()})
            reason = f"agent {i}'s {what} became non-finite at step {step}"
            self.live.remove(i)
            if self.config.train.on_divergence == "abort" or not self.live:
                self.aborted = {"agents": [i], "field": "train.on_divergence", "status": "diverged",
                                "reason": f"{reason} (train.on_divergence is abort)" if self.live else
                                          f"{reason}, the last agent left"}
                return
            for other in self.live_nodes():
                other.news.peer_dropped(i)
            self.events.append({"time_s": self.elapsed(), "kind": "agent_dropped", "agent": i,
                                "reason": f"diverged ({reason})", "agents_left": len(self.live)})

    # ------------------------------------------------------------ evaluation and merge

    def evaluate(self, step: int) -> dict:
        losses = {i: self.agents[i].take_mean_loss() for i in self.live}
        present = self.present(step)
        agents = [self.agents[i] for i in present]
        losses = [losses[i] for i in present]
        vectors = [agent.parameters_vector() for agent in agents]
        batch = self.config.eval.batch_size
        local = None
        if self.config.eval.local:
            local = [agent.evaluate(self.setup.test_x, self.setup.test_y, batch) for agent in agents]
        buffers = [a.buffers() for a in agents]
        local_validation = self.merged.local_validation_accuracies(list(zip(vectors, buffers)))
        self.merged.load(global_average(vectors), average_buffers(buffers))
        record = network_record(
            step=step, plan=self.setup.plan, vectors=vectors, local_accuracies=local,
            merged_accuracy=self.merged.evaluate(), traffic=[self.agents[i].traffic for i in self.live],
            merged_validation_accuracy=self.merged.validation_accuracy(),
            local_validation_accuracies=local_validation,
            train_loss=float(np.mean(losses)),  # as the coordinator: from 8 agents on numpy sums pairwise, not as sum()
            rounds_done=self.rounds_done,
            communication_rounds=self.communication_rounds, wall_time_s=self.elapsed(),
        )
        if len(present) < len(self.agents):
            record["agents"] = present
        return record

    def present(self, step: int) -> list[int]:
        """The agents that are there at local step `step`: not dropped, and not away after a timeline's leave."""
        return [i for i in self.live if not self.setup.plan.absent(i, step)]

    def final_merge(self) -> float:
        """Exact global average to every agent, batch-norm re-estimation, merged accuracy."""
        spec = self.config.schedule.final_merge
        agents = self.live_agents()

        def broadcast(params: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
            for agent in agents:
                agent.load_parameters_vector(params)
                agent.load_buffers(buffers)

        there = [self.agents[i] for i in self.present(self.setup.plan.total_steps - 1)]  # the agents there at the end

        def reestimate_local(batches: int) -> list[dict[str, torch.Tensor]]:
            for agent in there:
                agent.reestimate_batchnorm(batches)
            return [agent.buffers() for agent in there]

        states = [(agent.parameters_vector(), agent.buffers()) for agent in there]
        accuracy = merge_all(self.merged, states, broadcast, reestimate_local)
        self.events.append({"time_s": self.elapsed(), "kind": "merge_done",
                            "merged_test_accuracy": accuracy, "bn": spec.bn})
        return accuracy

    # ------------------------------------------------------------ the loop

    def restore(self, run_state: dict, agents: list[tuple[dict, dict]]) -> int:
        """Continue from a checkpoint; returns the first step still to run."""
        for node, (tensors, meta) in zip(self.nodes, agents):
            node.points.restore(tensors, meta)
        self.rounds_done = run_state["rounds_done"]
        self.communication_rounds = run_state["communication_rounds"]
        self.events = self.adaptive.restore(list(run_state["events"]), run_state["step"])
        self.elapsed_before = run_state["wall_time_s"]
        self.events.append({"time_s": self.elapsed_before, "kind": "resumed", "step": run_state["step"]})
        return run_state["step"]

    def checkpoint(self, directory, step: int, records: int) -> None:
        from raygossip.checkpoint import save_checkpoint

        run_state = {"step": step + 1, "rounds_done": self.rounds_done, "communication_rounds": self.communication_rounds,
                     "records": records, "events": self.events, "wall_time_s": self.elapsed()}
        save_checkpoint(directory, self.config, run_state, [agent.snapshot() for agent in self.agents])

    def elapsed(self) -> float:
        return getattr(self, "elapsed_before", 0.0) + time.perf_counter() - self.started

    def run(self, observer: Observer | None = None, progress: bool | None = None, checkpoint_dir=None,
            start_step: int = 0, previous_records: list[dict] | None = None) -> dict:
        """Train to the end; returns {'records', 'merged_accuracy', 'last', 'events'}."""
        plan = self.setup.plan
        show = self.config.runtime.progress if progress is None else progress
        self.started = time.perf_counter()
        if start_step == 0:
            self.events.append({"time_s": 0.0, "kind": "run_started", "engine": self.name})
            if self.batched and self.batched[0][1].reason is not None:
                self.events.append({"time_s": 0.0, "kind": "batched_steps_off", "reason": self.batched[0][1].reason})
            self.events.extend({"time_s": 0.0, "kind": "timeline_ignored", "index": index, "scheduled_time_s": due,
                                "reason": "a wall-clock event (only the Ray engine has a wall clock)"}
                               for due, index in plan.timeline.timed)
        records = list(previous_records or [])
        bar = tqdm(total=plan.total_steps, initial=start_step, desc="raygossip", unit="step",
                   disable=True if not show else None, leave=False)
        self.running = {"records": records, "observer": observer, "bar": bar, "checkpoint_dir": checkpoint_dir}
        assert all(node.core.step == start_step for node in self.nodes)
        run_rounds(self.nodes, batches=self.batched, steward=self)
        bar.close()
        if self.aborted is not None:
            last = records[-1] if records else None
            return {"records": records, "merged_accuracy": None, "last": last, "events": self.events,
                    "aborted": self.aborted}
        last = records[-1]
        extra = {"public_copy_error": self.public_copy_error()} if self.nodes[0].core.rule.public_copies else {}
        extra.update({key: sum(node.stats()[key] for node in self.nodes) for key in LOSS_COUNTERS})  # (drained too)
        merged = self.final_merge() if self.config.schedule.final_merge.enabled else last[metric_key("merged_test_accuracy", self.config)]
        return {"records": records, "merged_accuracy": merged, "last": last, "events": self.events, "extra": extra}

    def public_copy_error(self) -> float:
        """CHOCO/AdaGossip: max |s_i - sum_j W_ij x_hat_j| over the agents there at the end, after every inbox is
        drained (as the Ray engine does: a resync asked for in the last round comes with the senders' final letters)."""
        for node in self.live_nodes():
            node.inbox.drain(0.0)
        there = self.present(self.setup.plan.total_steps - 1)
        states = {i: {k: v.numpy() for k, v in self.nodes[i].report.rule_tensors().items()} for i in there}
        return public_copy_error(self.setup.plan, states, there)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        return self.merged.state_dict()

    def traffic(self) -> list:
        return [agent.traffic for agent in self.live_agents()]

    def agent_vectors(self) -> list[torch.Tensor]:
        return [agent.parameters_vector() for agent in self.live_agents()]
