"""The agent actor: a thin Ray shell that hosts k gossip nodes and moves their letters and state."""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raygossip.algorithms.topology import build_topology
from raygossip.config import Config
from raygossip.config_io import from_dict
from raygossip.core.agent import AgentCore
from raygossip.core.batched import BatchedSteps
from raygossip.core.faults import MessageFate, death_round, death_rounds
from raygossip.core.round_loop import run_rounds
from raygossip.core.node import GossipNode, NodeOptions
from raygossip.core.plan import RunPlan
from raygossip.core.timing import StepClock
from raygossip.core.wire import Letter
from raygossip.engines.channels import ENVELOPE_BYTES
from raygossip.engines.ray_links import CoordinatorClient, RayTransport, to_numpy
from raygossip.engines.ray_setup import dataset_from_numpy, pick_device, pin_threads, process_start_time


def tracks_links(config: Config) -> bool:
    """Whether agents keep a copy of each neighbour's public copy (one vector per neighbour): whenever a link may
    have to be resynchronised or dropped, after a restart or drop (on_failure not abort, on_divergence drop) or after
    a resume (checkpoints on)."""
    runtime = config.runtime
    return runtime.on_failure != "abort" or runtime.checkpoint_every > 0 or config.train.on_divergence == "drop"


def node_options(config: Config) -> NodeOptions:
    runtime = config.runtime
    return NodeOptions(mode=runtime.mode, staleness=runtime.staleness, wait_timeout_s=runtime.wait_timeout_s,
                       timing=runtime.timing, checkpoint_every=runtime.checkpoint_every,
                       snapshot_every=runtime.snapshot_every if runtime.on_failure == "restart" else 0,
                       wait_past_timeout=True)


class AgentActor:
    """Hosts the gossip nodes of some agents (runtime.agents_per_actor), each running its own loop in a thread of
    the `train` group (one thread per hosted agent: see actor_class); neighbours' letters arrive through `deliver` (the `mail` group) or shared-memory channels;
    the coordinator calls the `control` group. Every method only finds the node and calls it."""

    def __init__(self, agents: list[int], config_dict: dict, data: list, shards: dict[int, np.ndarray],
                 steps_per_epoch: int, factors: list[float], threads: int, incarnations: dict[int, int]) -> None:
        init_began = time.time()
        pin_threads(threads)
        self.config: Config = from_dict(Config, config_dict)
        config, runtime = self.config, self.config.runtime
        arrays = ray.get(data[0])
        dataset, test_x, test_y = dataset_from_numpy(arrays)
        data_fetched = time.time()
        topology = build_topology(config.topology.name, config.agents.count, config.topology.weights,
                                  config.topology.params)
        plan = RunPlan(config, topology, steps_per_epoch)
        self.device = pick_device(runtime.device, runtime.num_gpus_per_agent)
        planned = time.time()
        deaths = death_rounds(config.faults, config.agents.count, plan.total_rounds, config.seed)  # one per life
        self.nodes: dict[int, GossipNode] = {}
        self.transports: dict[int, RayTransport] = {}
        self.supervisor: CoordinatorClient | None = None
        options = node_options(config)
        for i in agents:
            life = incarnations.get(i, 0)
            core = AgentCore(i, config, dataset, shards[i], plan.total_steps, self.device,
                             track_links=tracks_links(config), task=arrays["task"])
            transport = self.transports[i] = RayTransport(i, self.nodes, runtime.inline_bytes,
                                                          runtime.wait_timeout_s, self.device)
            self.nodes[i] = GossipNode(
                core, plan, transport, options, clock=StepClock(runtime.timing, factors[i], config.seed, i),
                fate=MessageFate(config.faults, config.seed, i, life),
                kill_round=death_round(deaths, plan.timeline.kills(), i, life),
                incarnation=life, evaluation_set=(test_x, test_y))
        self.results: dict[int, dict] = {}  # hosted agent -> its loop's stats, once it ended (loop_result)
        self.ended = threading.Condition()
        self.startup = {"process_started": process_start_time(), "init_began": init_began,
                        "data_fetched": data_fetched, "planned": planned, "init_done": time.time()}

    # ------------------------------------------------------------ wiring and mail

    @ray.method(concurrency_group="control")
    def connect(self, peers: dict[int, Any], coordinator: Any, snapshot_dir: tuple[str, str] | None = None,
                incarnations: dict[int, int] | None = None, dropped: list[int] = (), down: list[int] = ()) -> list[dict]:
        """Wire the hosted agents to their peers' actors and the coordinator (restarted ones also learn who is
        dropped or down). snapshot_dir: (node, directory) where agents on that node write their snapshots."""
        node = ray.get_runtime_context().get_node_id()
        here = snapshot_dir[1] if snapshot_dir is not None and snapshot_dir[0] == node else None
        self.supervisor = CoordinatorClient(coordinator, here, self.config.runtime.wait_timeout_s)
        infos = []
        for i, gossip_node in self.nodes.items():
            self.transports[i].handles = dict(peers)
            gossip_node.supervisor = self.supervisor
            gossip_node.news.learn_peers(incarnations or {}, list(dropped), list(down))
            infos.append({"agent": i, "node": node, "pid": os.getpid(), "device": str(self.device),
                          "threads": torch.get_num_threads(), "message_bytes": self.message_bytes(i),
                          "startup": self.startup, "incarnation": gossip_node.incarnation,
                          "public_copies": gossip_node.core.rule.public_copies,
                          "actor_agents": sorted(self.nodes)})
        return infos

    @ray.method(concurrency_group="mail", num_returns=0, enable_task_events=False)
    def deliver(self, receiver: int, wire: tuple) -> None:
        """Called by a neighbour's actor: queue one letter (Letter.to_wire) for a hosted agent. One argument
        tuple and no return value: the cheapest Ray call."""
        self.nodes[receiver].accept(Letter.from_wire(wire, wire[5]))

    @ray.method(concurrency_group="control")
    def message_bytes(self, agent: int) -> int:
        """Bytes of a dense message (the whole parameter vector): what a channel is made to hold."""
        x = self.nodes[agent].core.flat.data
        return x.numel() * x.element_size()

    @ray.method(concurrency_group="control")
    def open_links(self, agent: int, readers: dict[int, tuple[Any, str]]) -> dict[int, Any]:
        """Create `agent`'s channel to each out-neighbour on another actor of this node (handle, node id)."""
        size = self.message_bytes(agent) + ENVELOPE_BYTES  # a larger letter resizes the channel
        return self.transports[agent].links.open(ray.get_runtime_context().current_actor, readers, size)

    @ray.method(concurrency_group="control")
    def attach_links(self, agent: int, inbound: dict[int, Any]) -> None:
        self.transports[agent].links.attach(inbound)

    @ray.method(concurrency_group="control")
    def seal_links(self) -> None:
        for transport in self.transports.values():
            transport.links.seal()

    # ------------------------------------------------------------ the loop and control

    @ray.method(concurrency_group="train")
    def run(self, agent: int, checkpoints: bool = False, resync: bool = False) -> dict:
        (stats,) = run_rounds([self.nodes[agent]], checkpoints=checkpoints, resync=resync)
        return self.ended_loops({agent: {**stats, "sent_by_reference": self.transports[agent].by_reference}})[0]

    @ray.method(concurrency_group="train")
    def run_together(self, agents: list[int], checkpoints: bool = False, resync: bool = False) -> dict | list[dict]:
        """Sync mode: the loops of these hosted agents in lockstep on one thread (core.round_loop); one
        return value per agent (call it with num_returns=len(agents))."""
        nodes = [self.nodes[i] for i in agents]
        batched = BatchedSteps([node.core for node in nodes]) if self.config.runtime.batched_steps else None
        if batched is not None and batched.reason is not None and 0 in agents:  # one model for all: said once
            self.nodes[0].report.event("batched_steps_off", reason=batched.reason)
        stats = run_rounds(nodes, checkpoints=checkpoints, resync=resync,
                           batches=[(nodes, batched)] if batched is not None else [])
        out = self.ended_loops({i: {**s, "sent_by_reference": self.transports[i].by_reference}
                                for i, s in zip(agents, stats)})
        return out if len(out) > 1 else out[0]

    def ended_loops(self, stats: dict[int, dict]) -> list[dict]:
        """Keep the ended loops' stats for loop_result (a restarted coordinator lost the run call's reference)."""
        with self.ended:
            self.results.update(stats)
            self.ended.notify_all()
        return list(stats.values())

    @ray.method(concurrency_group="watch")
    def loop_result(self, agent: int, timeout_s: float) -> dict | None:
        """The agent's loop stats once it ended, waiting up to timeout_s (None: still running)."""
        with self.ended:
            self.ended.wait_for(lambda: agent in self.results, timeout=timeout_s)
            return self.results.get(agent)

    @ray.method(concurrency_group="control")
    def coordinator_back(self) -> None:
        """The coordinator restarted: send it again what it may have lost (CoordinatorClient.resend)."""
        if self.supervisor is not None:
            self.supervisor.resend()

    @ray.method(concurrency_group="control")
    def stop(self, agent: int) -> int:
        return self.nodes[agent].stop()

    @ray.method(concurrency_group="control")
    def schedule_event(self, index: int, round_index: int) -> None:
        """A wall-clock timeline event is in force from this round on (the hosted agents share one plan)."""
        plan = next(iter(self.nodes.values())).plan
        plan.schedule(index, round_index)
        event = plan.config.timeline[index]
        if event.action == "kill":  # (first life only, as faults.kill)
            for i in event.agents:
                if i in self.nodes and self.nodes[i].incarnation == 0 and self.nodes[i].kill_round is None:
                    self.nodes[i].kill_round = round_index

    @ray.method(concurrency_group="control")
    def set_gammas(self, gammas: dict[int, float]) -> None:
        """The adaptive averaging rate the coordinator set: epoch -> gamma from that epoch on (a shared plan)."""
        plan = next(iter(self.nodes.values())).plan
        for epoch, gamma in gammas.items():
            plan.set_gamma(int(epoch), gamma)

    @ray.method(concurrency_group="control")
    def position(self, agent: int) -> int:
        return self.nodes[agent].core.step

    @ray.method(concurrency_group="control")
    def peers_down(self, agents: list[int]) -> None:
        for node in self.nodes.values():
            node.news.peers_down(agents)

    @ray.method(concurrency_group="control")
    def peer_restarted(self, agent: int, handle: Any, incarnation: int) -> None:
        for i, node in self.nodes.items():
            self.transports[i].handles[agent] = handle
            node.news.peer_restarted(agent, incarnation)

    @ray.method(concurrency_group="control")
    def peer_dropped(self, agent: int) -> None:
        for node in self.nodes.values():
            node.news.peer_dropped(agent)

    @ray.method(concurrency_group="control")
    def restore_snapshot(self, agent: int, snapshot: tuple[dict[str, np.ndarray], dict]) -> int:
        tensors, meta = snapshot
        return self.nodes[agent].points.restore({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, meta)

    @ray.method(concurrency_group="control")
    def release(self, step: int) -> None:
        for node in self.nodes.values():
            node.points.release(step)

    @ray.method(concurrency_group="control")
    def drain(self, agent: int, timeout_s: float) -> int:
        return self.nodes[agent].inbox.drain(timeout_s)

    # ------------------------------------------------------------ state

    @ray.method(concurrency_group="control")
    def get_state(self, agent: int) -> dict[str, np.ndarray]:
        return to_numpy(self.nodes[agent].report.state_tensors())

    @ray.method(concurrency_group="control")
    def rule_state(self, agent: int) -> dict[str, np.ndarray]:
        return to_numpy(self.nodes[agent].report.rule_tensors())

    @ray.method(concurrency_group="control")
    def load_state(self, state: list) -> None:
        """The merged model into every hosted agent."""
        arrays = ray.get(state[0])
        buffers = {k[len("buffer."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("buffer.")}
        for node in self.nodes.values():
            node.core.load_parameters_vector(torch.from_numpy(arrays["params"]))
            node.core.load_buffers(buffers)

    @ray.method(concurrency_group="control")
    def reestimate_batchnorm(self, agent: int, batches: int) -> dict[str, np.ndarray]:
        core = self.nodes[agent].core
        core.reestimate_batchnorm(batches)
        return {f"buffer.{k}": v.cpu().numpy() for k, v in core.buffers().items()}

    @ray.method(concurrency_group="control")
    def evaluate(self, agent: int) -> float:
        return self.nodes[agent].report.evaluate()

    @ray.method(concurrency_group="control")
    def late_report(self, agent: int) -> tuple:
        """A stopped agent's evaluation, to complete records of steps it never reached."""
        accuracy, state, loss, traffic = self.nodes[agent].report.evaluation()
        return accuracy, [ray.put(to_numpy(state))], loss, traffic, self.nodes[agent].incarnation


@functools.cache
def actor_class(agents: int) -> Any:
    """The Ray actor class of AgentActor for actors that host this many agents (a train thread each); Ray takes
    concurrency groups only where the class is made, not in .options()."""
    return ray.remote(concurrency_groups={"train": agents, "mail": 1, "control": 1, "watch": agents})(AgentActor)


def spawn_host(recipe: dict, group: int, incarnations: dict[int, int] | None = None,
               agents: list[int] | None = None, name: str | None = None) -> Any:
    """Create the actor of agent group `group` (or of those of its agents listed) in the group's placement-group
    bundle: how a run starts, and how a dead actor is replaced. A replacement is named and detached (`name`): it
    outlives the coordinator that made it, which finds it again by name if it restarts (the driver kills it)."""
    agents = list(recipe["groups"][group] if agents is None else agents)
    options: dict[str, Any] = {"num_cpus": recipe["cpus"] * len(agents), "num_gpus": recipe["gpus"] * len(agents),
                               "runtime_env": recipe["env"], "max_restarts": 0}
    if name is not None:
        options.update(name=name, lifetime="detached")
    if recipe["group"] is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            recipe["group"], placement_group_bundle_index=group)
    return actor_class(len(agents)).options(**options).remote(
        agents, recipe["config"], recipe["data"], {i: recipe["shards"][i] for i in agents}, recipe["steps_per_epoch"],
        recipe["factors"], recipe["threads"], incarnations or {})
