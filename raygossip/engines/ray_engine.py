"""The Ray engine: agent actors in a placement group gossiping through the object store, and a coordinator."""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from raygossip.config import Config
from raygossip.config_io import to_dict
from raygossip.core.timing import slowdown_factors
from raygossip.engines.channels import BUFFERS as CHANNEL_BUFFERS, ENVELOPE_BYTES as CHANNEL_ENVELOPE, available as channels_available
from raygossip.engines.cluster import ensure_ray, on_started_node
from raygossip.engines.common import Observer, RunSetup, agent_threads, metric_key, public_copy_error
from raygossip.core.agent import Traffic
from raygossip.core.placement import agent_groups, auto_agents_per_actor, edges_inside
from raygossip.engines.agent_actor import spawn_host
from raygossip.engines.ray_setup import (
    actor_env, check_user_modules, dataset_to_numpy, upload_user_code, user_modules,
)
from raygossip.usercode import actor_runtime_env as user_runtime_env
from raygossip.engines.agent_states import split_state, traffic_of
from raygossip.engines.chaos import ChaosDriver
from raygossip.engines.coordinator import Coordinator
from raygossip.engines.snapshots import make_snapshot_dir
from raygossip.engines.supervision import kill_named
from raygossip.errors import UserError


def pick_transport(config: Config, placement: list[dict], links: int, object_store_bytes: float) -> tuple[str, str]:
    """(transport, why). runtime.transport "auto" picks shared-memory channels when the run is sync, every agent
    is on one node (a channel's reader must be on its writer's node), the platform has named pipes and the
    channels (BUFFERS letters of the largest dense message per directed link) take at most half of that node's
    object store; else actor calls."""
    runtime = config.runtime
    if runtime.transport == "calls":
        return "calls", "runtime.transport is calls"
    if runtime.mode != "sync":
        return "calls", f"runtime.mode is {runtime.mode} (channels serve sync runs)"
    if len({p["node"] for p in placement}) > 1:
        return "calls", "the agents are on more than one node"
    if not channels_available():
        return "calls", "this Ray has no shared-memory channels or this platform no named pipes"
    need = links * CHANNEL_BUFFERS * (max(p["message_bytes"] for p in placement) + CHANNEL_ENVELOPE)
    if need > object_store_bytes / 2:
        return "calls", (f"the channels would take {need / 2**20:.0f} MiB, more than half of the node's "
                         f"{object_store_bytes / 2**20:.0f} MiB object store")
    return "channels", f"a sync run on one node ({links} links, {need / 2**20:.1f} MiB of object store)"


def node_object_store_bytes(node_id: str) -> float:
    """The object-store memory of one node of the cluster (0 when the node is not listed)."""
    return next((n["Resources"].get("object_store_memory", 0.0) for n in ray.nodes() if n["NodeID"] == node_id), 0.0)


def cross_actor_links(support: np.ndarray, group_of: dict[int, int]) -> list[tuple[int, int]]:
    """The directed links i -> j (j may receive from i at some round of the run) between agents of different actors
    (the others stay in memory)."""
    n = len(support)
    return [(i, j) for i in range(n) for j in range(n) if j != i and support[j, i] and group_of[i] != group_of[j]]


def open_channels(agents: list, nodes: list[str], links: list[tuple[int, int]]) -> None:
    """Give every directed link between actors its channel: writers create, readers attach, writers seal. The
    writers create one after another, so that each knows which named semaphores are its own."""
    n = len(agents)
    readers = [{j: (agents[j], nodes[j]) for i2, j in links if i2 == i} for i in range(n)]
    made = [ray.get(agents[i].open_links.remote(i, readers[i])) if readers[i] else {} for i in range(n)]
    inbound = [{i: made[i][j] for i in range(n) if j in made[i]} for j in range(n)]
    ray.get([agents[j].attach_links.remote(j, inbound[j]) for j in range(n) if inbound[j]])
    hosts = list({id(agent): agent for agent in agents}.values())
    ray.get([host.seal_links.remote() for host in hosts])


def actor_runtime_env(threads: int, user: dict | None = None) -> dict | None:
    """None on the local Ray that ensure_ray started: its workers already inline messages up to INLINE_LIMIT
    and Ray pins OMP to the CPU share, and without a runtime_env the actors reuse the workers Ray
    started ahead (a runtime_env costs ~4 s of start-up for 8 agents on 2 cores). Elsewhere, the
    same settings as environment variables of the actors' worker processes. `user`: the py_modules and
    working_dir that bring user code (usercode.actor_runtime_env), added in either case."""
    env = None if on_started_node() else {"env_vars": actor_env(threads)}
    return {**(env or {}), **user} if user else env


def cpus_per_agent(config: Config, total: float | None = None) -> float:
    """runtime.num_cpus_per_agent, or an even share of the cluster's `total` CPUs (at most 1) when unset, rounded
    down to Ray's resource precision (1e-4), so that 256 agents fit on 2 CPUs."""
    if config.runtime.num_cpus_per_agent is not None:
        return config.runtime.num_cpus_per_agent
    total = ray.cluster_resources().get("CPU", 1.0) if total is None else total
    return max(1e-4, math.floor(min(1.0, total / config.agents.count) * 1e4) / 1e4)


def check_resources(config: Config, cpus: float) -> None:
    resources = ray.cluster_resources()
    need_cpu = cpus * config.agents.count
    if need_cpu > resources.get("CPU", 0) + 1e-9:
        raise UserError("runtime.num_cpus_per_agent",
                        f"{config.agents.count} agents x {cpus} CPU = {need_cpu:g} CPUs, but the cluster has "
                        f"{resources.get('CPU', 0):g}; lower it")
    need_gpu = config.runtime.num_gpus_per_agent * config.agents.count
    if need_gpu > resources.get("GPU", 0) + 1e-9:
        raise UserError("runtime.num_gpus_per_agent",
                        f"{config.agents.count} agents x {config.runtime.num_gpus_per_agent} GPU = {need_gpu:g} GPUs, "
                        f"but the cluster has {resources.get('GPU', 0):g}")


def with_packing(config: Config, cluster_cpus: float) -> Config:
    """`config` with runtime.agents_per_actor a count: auto resolved from the agents, the cluster's CPUs and the GPU
    share (core.placement.auto_agents_per_actor); a count stays as it is. Sync numbers do not depend on it."""
    runtime = config.runtime
    if runtime.agents_per_actor != "auto":
        return config
    k = auto_agents_per_actor(config.agents.count, cluster_cpus, runtime.num_gpus_per_agent)
    return dataclasses.replace(config, runtime=dataclasses.replace(runtime, agents_per_actor=k))


def group_sizes(config: Config) -> list[int]:
    """How many agents each actor hosts: runtime.agents_per_actor each, the last actor the rest (core.placement)."""
    n, k = config.agents.count, max(1, int(config.runtime.agents_per_actor))
    return [k] * (n // k) + ([n % k] if n % k else [])


def agent_bundles(config: Config, cpus: float) -> list[dict[str, float]]:
    """One placement-group bundle per actor: its agents' CPUs (and GPUs)."""
    gpus = config.runtime.num_gpus_per_agent
    return [{"CPU": cpus * size, **({"GPU": gpus * size} if gpus > 0 else {})} for size in group_sizes(config)]


def reserved_group(bundles: list[dict[str, float]]) -> Any:
    """The placement group this process runs in (a Ray Tune trial's, from sweep.trial_resources) when its bundles
    are exactly `bundles`, so the run's actors use what Tune reserved; None otherwise (the run makes its own)."""
    current = get_current_placement_group()
    if current is None:
        return None
    specs = [{key: value for key, value in spec.items() if key in ("CPU", "GPU") and value} for spec in current.bundle_specs]
    want = [{key: value for key, value in bundle.items() if value} for bundle in bundles]
    same = len(specs) == len(want) and all(
        spec.keys() == bundle.keys() and all(math.isclose(spec[k], bundle[k], rel_tol=1e-9, abs_tol=1e-9) for k in spec)
        for spec, bundle in zip(specs, want))
    return current if same else None


def wait_released(group, free_cpus: float, deadline_s: float) -> bool:
    """After removing `group`: wait (up to deadline_s) until the cluster lists none of its bundles and has
    `free_cpus` CPUs free again, as before the run, so that the next placement group (a SPREAD one above all)
    is placed knowing this run's CPUs are free. The GCS view lags the removal by ~0.1 s."""
    tag = group.id.hex()
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        available = ray.available_resources()
        if not any(tag in name for name in available) and available.get("CPU", 0.0) >= free_cpus - 1e-6:
            return True
        time.sleep(0.02)
    return False


def agent_startup_medians(placement: list[dict], submitted: float) -> dict[str, float]:
    """Median seconds, over agents, from actor submission to each start-up stamp the agents recorded."""
    stamps = [p["startup"] for p in placement]
    out = {}
    for key in stamps[0]:
        values = [s[key] - submitted for s in stamps if s.get(key) is not None]
        if values:
            out[f"agent_{key}_s"] = float(np.median(values))
    return out


class RayEngine:
    """Drives a run on Ray; in sync mode it reproduces the reference engine's numbers."""

    name = "ray"

    def __init__(self, config: Config, setup: RunSetup) -> None:
        self.packing_chosen = "auto" if config.runtime.agents_per_actor == "auto" else "config"
        show = config.runtime.progress
        # what start-up is doing, on the line the training progress takes over (Ray, data, agents k of n)
        self.startup_bar = tqdm(total=config.agents.count, desc="raygossip[ray] starting Ray", unit="agent",
                                disable=True if not show else None, leave=False)
        self.started_ray = ensure_ray(config)
        config = with_packing(config, ray.cluster_resources().get("CPU", 1.0))
        self.config = config
        self.setup = setup
        self.startup_s = 0.0
        self.startup_phases: dict[str, float] = {}
        began = time.perf_counter()
        runtime = config.runtime
        cpus = cpus_per_agent(config)
        check_resources(config, cpus)
        threads = agent_threads(runtime)
        support = setup.plan.support()  # every edge of the run, not round 0's alone
        self.groups = agent_groups(support, runtime.agents_per_actor)
        self.group_of = {i: g for g, members in enumerate(self.groups) for i in members}
        bundles = agent_bundles(config, cpus)
        assert [len(members) for members in self.groups] == group_sizes(config)
        self.free_cpus_before = ray.available_resources().get("CPU", 0.0)
        self.group, self.owns_group = reserved_group(bundles), False  # a Tune trial's placement group, if it fits
        if self.group is None:
            self.group, self.owns_group = placement_group(bundles, strategy=runtime.placement), True
            ready, _ = ray.wait([self.group.ready()], timeout=runtime.wait_timeout_s)
            if not ready:
                remove_placement_group(self.group)
                raise UserError("runtime.placement", f"{runtime.placement} placement of {len(bundles)} actors x "
                                                     f"{bundles[0]} could not be satisfied within {runtime.wait_timeout_s:g} s")
        self.startup_phases["placement_group_s"] = time.perf_counter() - began
        user_env = upload_user_code(user_runtime_env(config))
        check_user_modules(user_modules(setup), actor_runtime_env(threads, user_env))
        self.startup_bar.set_description("raygossip[ray] shipping data")
        data = ray.put(dataset_to_numpy(setup.dataset, setup.test_x, setup.test_y, setup.task))
        self.startup_bar.set_description(f"raygossip[ray] starting {len(self.groups)} actors x "
                                         f"{runtime.agents_per_actor} agents ({self.packing_chosen})")
        config_dict = to_dict(config)
        # the run's state folder on this node: agents' snapshot files and the coordinator's ledger; named after this
        # process, so that it outlives the coordinator's deaths (snapshots.sweep_stale removes it once we are gone)
        self.state_place = (ray.get_runtime_context().get_node_id(), make_snapshot_dir())
        factors = slowdown_factors(runtime.timing, config.agents.count, config.seed)
        spe = setup.plan.steps_per_epoch
        self.recipe = {
            "config": config_dict, "data": [data], "shards": list(setup.shards), "steps_per_epoch": spe,
            "factors": factors, "threads": threads, "cpus": cpus, "gpus": runtime.num_gpus_per_agent,
            "env": actor_runtime_env(threads, user_env), "group": self.group, "groups": self.groups,
            "name": f"raygossip-{Path(self.state_place[1]).name}",  # (replacement actors are named after it)
        }
        self.hosts = [spawn_host(self.recipe, g) for g in range(len(self.groups))]
        self.agents = [self.hosts[self.group_of[i]] for i in range(config.agents.count)]
        # created after the agents: it is off the data path and needed only when the run starts. It lives on the
        # driver's node, so the snapshots it keeps survive the loss of any other node, and Ray restarts it there
        # (with its ledger in the state folder) if it dies; calls made meanwhile wait for it (max_task_retries).
        here = NodeAffinitySchedulingStrategy(self.state_place[0], soft=False)
        # its arguments by a reference this driver holds for the whole run (Coordinator.__init__ says why)
        self.coordinator_args = ray.put((config_dict, [data], spe, self.state_place, self.agents, self.recipe))
        self.coordinator = Coordinator.options(
            num_cpus=0, runtime_env=actor_runtime_env(1, user_env), scheduling_strategy=here, max_restarts=-1,
            max_task_retries=-1).remote([self.coordinator_args])
        self.startup_phases["submit_s"] = time.perf_counter() - began
        submitted = time.time()
        peers = dict(enumerate(self.agents))
        self.snapshot_dir = ray.get(self.coordinator.snapshot_place.remote())
        self.placement = self.connect_hosts(peers)
        self.startup_phases["agents_ready_s"] = time.perf_counter() - began
        links = cross_actor_links(support, self.group_of)
        self.transport, self.transport_reason = pick_transport(
            config, self.placement, len(links), node_object_store_bytes(self.placement[0]["node"]))
        if self.transport == "channels" and links:
            self.startup_bar.set_description("raygossip[ray] opening channels")
            open_channels(self.agents, [p["node"] for p in self.placement], links)
        inside, total = edges_inside(self.groups, support)
        self.packing = {"agents_per_actor": runtime.agents_per_actor, "chosen": self.packing_chosen,
                        "actors": len(self.groups), "gpus_per_actor": [bundle.get("GPU", 0.0) for bundle in bundles],
                        "groups": self.groups, "links_inside_actors": inside, "links": total,
                        "share_inside_actors": inside / total if total else 1.0,
                        "placement_group": "run" if self.owns_group else "tune trial"}
        self.startup_phases.update(agent_startup_medians(self.placement, submitted))
        ray.get(self.coordinator.ready.remote())
        self.startup_bar.close()
        self.factors = factors
        self.startup_s = time.perf_counter() - began
        self.startup_phases["coordinator_ready_s"] = self.startup_s
        self.merged_state: dict[str, torch.Tensor] = {}
        self.finished: list[dict] = []
        self.resumed: dict | None = None

    def connect_hosts(self, peers: dict[int, Any]) -> list[dict]:
        """Wire every actor to the others and the coordinator as each finishes starting, showing how many agents
        are ready; returns the agents' placement facts, in agent order."""
        pending = {host.connect.remote(peers, self.coordinator, self.snapshot_dir): host for host in self.hosts}
        bar = self.startup_bar
        infos: list[dict] = []
        while pending:  # no deadline (as many actors as agents may take minutes); a failed start raises in ray.get
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            if not ready:
                bar.refresh()  # the elapsed time goes on while the actors start
                continue
            for ref in ready:
                pending.pop(ref)
                got = ray.get(ref)
                infos.extend(got)
                bar.update(len(got))
        return sorted(infos, key=lambda info: info["agent"])

    def restore(self, run_state: dict, agents: list[tuple[dict, dict]]) -> int:
        """Load every agent's state from a checkpoint (before run); returns the first step still to run."""
        dropped = set(run_state.get("dropped", []))
        arrays = {i: {k: v.numpy() for k, v in tensors.items()} for i, (tensors, _) in enumerate(agents) if i not in dropped}
        ray.get([self.agents[i].restore_snapshot.remote(i, (arrays[i], agents[i][1])) for i in arrays])
        if self.config.runtime.on_failure == "restart":  # an agent that dies before its next snapshot restarts here
            ray.get([self.coordinator.keep_snapshot.remote(i, 0, arrays[i], agents[i][1]) for i in arrays])
        self.resumed = run_state
        return int(run_state["step"])

    def run(self, observer: Observer | None = None, progress: bool | None = None, checkpoint_dir=None,
            start_step: int = 0, previous_records: list[dict] | None = None) -> dict:
        """Train to the end (from start_step after restore()); the coordinator writes whole-run checkpoints into
        checkpoint_dir every runtime.checkpoint_every rounds."""
        show = self.config.runtime.progress if progress is None else progress
        began = time.perf_counter()
        events = []
        for info, factor in zip(self.placement, self.factors):
            shown = {key: value for key, value in info.items() if key != "startup"}
            events.append({"kind": "agent_started", "time": time.time(), **shown, "slowdown": factor})
            if factor > 1.0:
                events.append({"kind": "slow_agent", "agent": info["agent"], "factor": factor, "time": time.time()})
        events.append({"kind": "transport", "time": time.time(), "transport": self.transport,
                       "reason": self.transport_reason})
        ray.get(self.coordinator.record_events.remote(events))
        ray.get(self.coordinator.start.remote(None if checkpoint_dir is None else str(checkpoint_dir), self.resumed))
        chaos = ChaosDriver(self.config, self.coordinator, self.placement)
        expected = sum(self.setup.plan.is_eval_step(s) for s in range(start_step, self.setup.plan.total_steps))
        records: list[dict] = list(previous_records or [])
        bar = tqdm(total=expected, desc=f"raygossip[ray {len(self.groups)}x{self.config.runtime.agents_per_actor}]", unit="eval", disable=True if not show else None, leave=False)
        done = self.coordinator.wait_finished.remote(self.config.runtime.wait_timeout_s)
        ended = False
        chaos.start()
        while True:
            # poll returns on a new record, when the agents finished, or after 0.5 s (then we check `done`,
            # which also carries a failure of wait_finished)
            new, finished_now = ray.get(self.coordinator.poll.remote(len(records) - len(previous_records or []), 0.5))
            for record in new:
                records.append(record)
                if observer is not None:
                    observer(record)
                bar.set_postfix(round=record["round"], merged=f"{record[metric_key('merged_test_accuracy', self.config)]:.3f}",
                                MB=f"{record['bytes_sent'] / 1e6:.1f}")
                bar.update(1)
            if finished_now or ended:
                break
            if ray.wait([done], timeout=0)[0]:
                ray.get(done)  # raises if wait_finished failed; else the next poll reports finished at once
                ended = True  # (one more poll: a coordinator restarted after wait_finished does not say finished;
                # every record was complete when wait_finished returned)
        chaos_kills = chaos.stop()
        ending = ray.get(done)
        bar.close()
        records.sort(key=lambda r: r["step"])  # (made in completion order; a drop can complete an earlier step late)
        finished = self.finished = ending["stats"]
        if ending["aborted"] is None:  # (a chaos death after an agent's loop ended took its model)
            ray.get(self.coordinator.drop_lost_after_finish.remote())
        self.live = ray.get(self.coordinator.live_agents.remote())
        self.train_s = time.perf_counter() - began
        failures = ray.get(self.coordinator.failure_report.remote())
        last = records[-1] if records else None
        merged = last[metric_key("merged_test_accuracy", self.config)] if last else None
        if ending["aborted"] is not None:
            self.merged_state = {}
        elif self.config.schedule.final_merge.enabled:
            outcome = ray.get(self.coordinator.final_merge.remote())
            merged = outcome["merged_accuracy"]
            self.merged_state = {k: torch.from_numpy(v.copy()) for k, v in outcome["state_dict"].items()}
        else:
            self.merged_state = {k: torch.from_numpy(v.copy())
                                 for k, v in ray.get(self.coordinator.merged_state.remote()).items()}
        consistency = {}
        if ending["aborted"] is None and self.placement[0]["public_copies"]:
            # every message applied once, every resync and drop applied (restarts, resumes, bounded/async runs)
            consistency["public_copy_error"] = self.choco_consistency_error()
        events = ray.get(self.coordinator.get_events.remote())
        events.extend({"kind": "link_delays", "agent": s["agent"], "links": s["link_delays"]} for s in finished)
        extra = {
            "startup_s": self.startup_s, "train_s": self.train_s,
            "waited_s_per_agent": [s["waited_s"] for s in finished],
            "stale_messages": sum(s["stale_messages"] for s in finished),
            "reused_models": sum(s["reused_models"] for s in finished),
            "wait_timeouts": sum(s["timeouts"] for s in finished),
            "nodes": sorted({p["node"] for p in self.placement}),
            "steps_per_agent": [s["steps"] for s in finished],
            "phase_s_per_agent": [s["phase_s"] for s in finished],
            "cpu_s_per_agent": [s["cpu_s"] for s in finished],
            "sent_by_reference": sum(s["sent_by_reference"] for s in finished),
            "transport": self.transport,
            "placement": self.packing,
            "startup_phases": dict(self.startup_phases),
            "lost_messages": sum(s["lost_messages"] for s in finished),
            "resyncs": sum(s["resyncs"] for s in finished),
            **{key: sum(s[key] for s in finished) for key in ("resyncs_asked", "resyncs_sent", "resync_bytes")},
            **failures,
            **({"chaos_kills": chaos_kills} if chaos_kills else {}),
            **consistency,
        }
        outcome = {"records": records, "merged_accuracy": merged, "last": last, "events": events, "extra": extra}
        if ending["aborted"] is not None:
            outcome["aborted"] = ending["aborted"]
        return outcome

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        return self.merged_state

    def traffic(self) -> list[Traffic]:
        return [traffic_of(s) for s in self.finished]

    def agent_vectors(self) -> list[torch.Tensor]:
        """The live agents' parameter vectors, in agent order."""
        return [split_state(s)[0] for s in ray.get([a.get_state.remote(i) for i, a in self.live.items()])]

    def choco_consistency_error(self) -> float:
        """Drain every live inbox, then max |s_i - sum_j W_ij x_hat_j| over live agents and live neighbours j
        (0 when every message was applied exactly once, and every resync and drop was applied)."""
        live = self.live
        ray.get([agent.drain.remote(i, self.config.runtime.wait_timeout_s) for i, agent in live.items()])
        states = dict(zip(live, ray.get([agent.rule_state.remote(i) for i, agent in live.items()])))
        plan = self.setup.plan
        for index, round_index in sorted(ray.get(self.coordinator.timeline_scheduled.remote()).items()):
            if index not in plan.timeline.scheduled:  # the graph in force at the end, wall-clock events included
                plan.schedule(index, round_index)
        there = [i for i in live if not plan.absent(i, plan.total_steps - 1)]  # (not away after a timeline's leave)
        return public_copy_error(plan, states, there)

    def close(self) -> None:
        """Kill the actors and free the placement group (and stop Ray if this engine started it)."""
        if getattr(self, "startup_bar", None) is not None:
            self.startup_bar.close()
        actors = [*getattr(self, "hosts", []), *getattr(self, "live", {}).values()]
        for actor in {id(a): a for a in actors}.values():
            ray.kill(actor)
        coordinator = getattr(self, "coordinator", None)
        if coordinator is not None:
            ray.kill(coordinator, no_restart=True)
        recipe = getattr(self, "recipe", None)
        if recipe is not None:  # replacement actors are detached: they do not die with the coordinator
            for name in ray.util.list_named_actors():
                if name.startswith(recipe["name"] + "-"):
                    kill_named(name)
        if getattr(self, "state_place", None) is not None:  # the snapshot files and the coordinator's ledger
            shutil.rmtree(self.state_place[1], ignore_errors=True)
        if getattr(self, "group", None) is not None and self.owns_group:
            remove_placement_group(self.group)
            wait_released(self.group, self.free_cpus_before, deadline_s=5.0)
            self.group = None
        if self.started_ray:
            ray.shutdown()
