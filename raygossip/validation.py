"""load_config (read, override, coerce, check) and the range and cross-field checks of a Config, run before
anything starts; it sits above the layers it consults (registries, the topology builder, core's timeline)."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import networkx as nx

from raygossip.algorithms.consensus import sends_whole_models
from raygossip.algorithms.topology import build_topology, edges_from_graph
from raygossip.config import CommunicationKindConfig, Config, MAX_AGENTS
from raygossip.config_io import apply_overrides, from_dict, read_yaml
from raygossip.core.timeline import compile_timeline
from raygossip.data.datasets import DATASETS
from raygossip.data.partition import PARTITIONERS
from raygossip.errors import UserError
from raygossip.usercode import validate_task_fields
from raygossip.models import MODELS


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Config from a YAML file (or `base` mapping, or defaults) plus overrides, validated."""
    data = read_yaml(path) if path is not None else copy.deepcopy(dict(base or {}))
    data = graph_topology(data)
    data = apply_overrides(data, list(overrides or []))
    config = from_dict(Config, data)
    validate(config)
    return config


def graph_topology(data: dict) -> dict:
    """A mapping whose `topology` is a networkx graph, with it as the `edges` topology and agents.count its size."""
    if not isinstance(data.get("topology"), nx.Graph):
        return data
    count, data["topology"] = edges_from_graph(data["topology"])
    agents = data.setdefault("agents", {})
    if isinstance(agents, dict):
        _check(agents.setdefault("count", count) == count, "agents.count",
               f"must equal the topology graph's {count} nodes, got {agents['count']!r} (or leave it out)")
    return data


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise UserError(field_name, message)


def validate(config: Config) -> None:
    """Range and cross-field checks; raises the first UserError found. Runs before anything starts."""
    _validate_registries(config)
    _validate_compressor_count(config)
    t, g, s, r = config.train, config.gossip, config.schedule, config.runtime
    _check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    _check(not t.nesterov or t.momentum > 0, "train.nesterov", "needs train.momentum > 0")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(t.local_steps >= 1, "train.local_steps", f"must be >= 1, got {t.local_steps}")
    _check(t.steps_per_epoch is None or t.steps_per_epoch >= 1, "train.steps_per_epoch", "must be >= 1")
    _check(all(0 < m < 1 for m in t.lr_schedule.milestones), "train.lr_schedule.milestones",
           "must be fractions of training in (0, 1)")
    _check(0 < t.lr_schedule.factor <= 1, "train.lr_schedule.factor", "must be in (0, 1]")
    _check(t.lr_schedule.warmup_epochs >= 0, "train.lr_schedule.warmup_epochs", "must be >= 0")
    _check(t.lr_schedule.milestones == sorted(t.lr_schedule.milestones), "train.lr_schedule.milestones",
           f"must be increasing, got {t.lr_schedule.milestones}")
    _check(t.lr_schedule.warmup_epochs < t.epochs, "train.lr_schedule.warmup_epochs",
           f"must be shorter than train.epochs ({t.epochs}), got {t.lr_schedule.warmup_epochs}")
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    _check(t.grad_clip_value is None or t.grad_clip_value > 0, "train.grad_clip_value",
           f"must be > 0 (each gradient element is clamped to +-value) or null, got {t.grad_clip_value}")
    _check(0 < g.gamma <= 1, "gossip.gamma", f"must be in (0, 1], got {g.gamma}")
    _check(0 <= g.beta < 1, "gossip.beta", f"must be in [0, 1), got {g.beta}")
    c = g.compressor
    if c.name in ("top_k", "random_k"):
        _check(c.ratio is not None, "gossip.compressor.ratio", f"{c.name} needs a ratio (fraction kept) in (0, 1]")
        _check(0 < c.ratio <= 1, "gossip.compressor.ratio", f"must be in (0, 1], got {c.ratio}")
    _check(c.index_coding == "plain" or c.name in ("top_k", "random_k"), "gossip.compressor.index_coding",
           f"{c.index_coding} codes index sets, which only top_k and random_k send; got compressor {c.name!r}")
    if c.name == "qsgd":
        _check(c.bits is not None, "gossip.compressor.bits", "qsgd needs bits in 1..8")
        _check(1 <= c.bits <= 8, "gossip.compressor.bits", f"must be in 1..8, got {c.bits}")
    _check(g.rule != "dpsgd" or c.name == "identity", "gossip.compressor.name",
           "dpsgd sends full models; use gossip.rule: choco or adagossip for compression")
    a = s.averaging_rate
    gamma0 = a.gamma0 if a.gamma0 is not None else g.gamma
    _check(0 < gamma0 <= 1, "schedule.averaging_rate.gamma0", f"must be in (0, 1], got {gamma0}")
    _check(a.growth >= 1, "schedule.averaging_rate.growth", f"must be >= 1, got {a.growth}")
    _check(a.ramp_epochs is None or a.ramp_epochs >= 1, "schedule.averaging_rate.ramp_epochs", "must be >= 1")
    _check(a.exponent > 0, "schedule.averaging_rate.exponent", f"must be > 0, got {a.exponent}")
    _check(a.kind != "adaptive" or config.eval.every >= 1, "eval.every",
           "the adaptive averaging rate sets gamma from the consensus distance of each record at an epoch's end; "
           f"it needs eval.every >= 1, got {config.eval.every}")
    _validate_communication(config)
    _check(s.final_merge.bn_batches >= 1, "schedule.final_merge.bn_batches", "must be >= 1")
    _check(r.staleness >= 0, "runtime.staleness", f"must be >= 0, got {r.staleness}")
    _validate_packing(config)
    _check(not r.batched_steps or r.mode == "sync", "runtime.batched_steps",
           f"steps an actor's agents in lockstep, which only sync mode does; got runtime.mode {r.mode!r}")
    _check(not r.batched_steps or not config.timeline, "runtime.batched_steps",
           "steps an actor's agents as one call, past the per-step part of a timeline (slow, leave, join): "
           "turn it off for a run with a timeline")
    _check(r.num_cpus_per_agent is None or r.num_cpus_per_agent > 0, "runtime.num_cpus_per_agent",
           "must be > 0 (or unset: an even share of the CPUs, at most 1)")
    _check(0 <= r.num_gpus_per_agent <= 1, "runtime.num_gpus_per_agent", "must be in [0, 1]")
    _check(r.num_cpus is None or r.num_cpus >= 1, "runtime.num_cpus", "must be >= 1")
    _check(r.device in ("auto", "cpu") or r.device.startswith("cuda"), "runtime.device",
           f"must be auto, cpu or cuda[:N], got {r.device!r}")
    _check(r.wait_timeout_s > 0, "runtime.wait_timeout_s", "must be > 0")
    _check(0 <= r.inline_bytes <= 1048576, "runtime.inline_bytes",
           f"must be in 0..1048576 (messages larger than this go through the object store), got {r.inline_bytes}")
    _check(r.checkpoint_every >= 0, "runtime.checkpoint_every", f"must be >= 0 rounds (0: off), got {r.checkpoint_every}")
    _check(r.snapshot_every >= 0, "runtime.snapshot_every",
           f"must be >= 0 rounds between the snapshots a restarted agent resumes from (0: restart from scratch), "
           f"got {r.snapshot_every}")
    _check(r.max_restarts >= 0, "runtime.max_restarts", f"must be >= 0, got {r.max_restarts}")
    _validate_faults(config)
    _validate_timeline(config)
    _check(0 < r.finish_quorum <= 1, "runtime.finish_quorum",
           f"must be in (0, 1] (fraction of agents whose finishing ends a bounded/async run), got {r.finish_quorum}")
    tm = r.timing
    _check(tm.slowdown is None or len(tm.slowdown) == config.agents.count, "runtime.timing.slowdown",
           f"needs one factor per agent ({config.agents.count})")
    _check(tm.slowdown is None or all(f >= 1 for f in tm.slowdown), "runtime.timing.slowdown", "factors must be >= 1")
    _check(0 <= tm.slow_fraction <= 1, "runtime.timing.slow_fraction", "must be in [0, 1]")
    _check(tm.slow_factor >= 1, "runtime.timing.slow_factor", "must be >= 1")
    _check(tm.jitter >= 0, "runtime.timing.jitter", "must be >= 0")
    _check(tm.step_time_s >= 0, "runtime.timing.step_time_s", "must be >= 0")
    _check(tm.latency_s >= 0, "runtime.timing.latency_s", "must be >= 0")
    _check(tm.bandwidth_mbps is None or tm.bandwidth_mbps > 0, "runtime.timing.bandwidth_mbps", "must be > 0")
    _check(config.label is None or config.label.strip() != "", "label",
           "must be a non-empty text naming the run in plots and tables, or null (then the differing keys name it)")
    e = config.eval
    _check(e.every >= 0, "eval.every", f"must be >= 0 (epochs between evaluations; 0: only at the end), got {e.every}")
    _check(e.test_samples is None or e.test_samples >= 1, "eval.test_samples", "must be >= 1")
    _check(e.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _check(0 <= e.validation_fraction < 1, "eval.validation_fraction",
           f"must be in [0, 1) (the held-out fraction of the training set; 0: none), got {e.validation_fraction}")
    _check(config.data.partition.alpha > 0, "data.partition.alpha", f"must be > 0, got {config.data.partition.alpha}")
    _check(config.data.partition.shards_per_agent >= 1, "data.partition.shards_per_agent", "must be >= 1")
    _validate_partition(config)
    _check(r.engine == "ray" or r.mode == "sync", "runtime.mode",
           f"the reference engine runs only sync; got {r.mode!r} (use runtime.engine: ray)")


def _validate_kind_keys(m: CommunicationKindConfig, where: str) -> None:
    """Ranges of one communication kind's keys (the run's, a phase's or a timeline event's, at `where`)."""
    _check(0 < m.p <= 1, f"{where}.p", f"must be in (0, 1], got {m.p}")
    _check(0 <= m.start <= 1, f"{where}.start", f"must be in [0, 1], got {m.start}")
    _check(0 < m.width <= 1, f"{where}.width", f"must be in (0, 1], got {m.width}")
    _check(m.sparse_every >= 0, f"{where}.sparse_every", "must be >= 0 (0: no rounds outside)")


def _validate_compressor_count(config: Config) -> None:
    """gossip.compressor.count counts top_k's k; another compressor has no k to count that way."""
    c = config.gossip.compressor
    _check(c.count == "ceil" or c.name == "top_k", "gossip.compressor.count",
           f"{c.count} counts top_k's k per tensor; compressor {c.name!r} has no such k (leave count at ceil)")


def _validate_packing(config: Config) -> None:
    """runtime.agents_per_actor: auto or a count; with batched steps a count above 1; GPU shares of one device."""
    r = config.runtime
    k = r.agents_per_actor
    _check(k == "auto" or (isinstance(k, int) and k >= 1), "runtime.agents_per_actor",
           f"must be auto (the engine picks from the agents, CPUs and GPUs) or a count >= 1, got {k!r}")
    if k == "auto":
        _check(not r.batched_steps, "runtime.batched_steps",
               "steps the agents of one actor together, so its groups set the numbers: give "
               "runtime.agents_per_actor a count > 1 (auto depends on the machine)")
        return
    _check(not r.batched_steps or k > 1, "runtime.batched_steps",
           f"steps the agents of one actor together: needs runtime.agents_per_actor > 1, got {k}")
    if r.num_gpus_per_agent > 0 and k * r.num_gpus_per_agent > 1 + 1e-9:
        most = int(1 / r.num_gpus_per_agent + 1e-9)
        raise UserError("runtime.agents_per_actor",
                        f"{k} agents x runtime.num_gpus_per_agent {r.num_gpus_per_agent:g} = "
                        f"{k * r.num_gpus_per_agent:g} GPUs in one actor, which uses one device: at most {most} "
                        "agents per actor (or auto)")


def _validate_communication(config: Config) -> None:
    """The run's communication kind, or its phases: covering training up to 1.0 in increasing `until`."""
    m, where = config.schedule.communication, "schedule.communication"
    _validate_kind_keys(m, where)
    specs = [(m, where)]
    if m.phases:
        defaults = CommunicationKindConfig()
        for f in dataclasses.fields(CommunicationKindConfig):
            _check(getattr(m, f.name) == getattr(defaults, f.name), f"{where}.{f.name}",
                   f"is set per phase when {where}.phases is given; move it into the phases")
        untils = [phase.until for phase in m.phases]
        for k, phase in enumerate(m.phases):
            at = f"{where}.phases[{k}]"
            _check(0 < phase.until <= 1, f"{at}.until", f"must be a fraction of training in (0, 1], got {phase.until}")
            _check(k == 0 or phase.until > untils[k - 1], f"{at}.until",
                   f"must be larger than the previous phase's until ({untils[k - 1] if k else 0}), got {phase.until}")
            _validate_kind_keys(phase, at)
        _check(untils[-1] == 1.0, f"{where}.phases[{len(untils) - 1}].until",
               f"the last phase must reach the end of training (until: 1.0), got {untils[-1]}")
        specs = [(phase, f"{where}.phases[{k}]") for k, phase in enumerate(m.phases)]
    rule, topology = config.gossip.rule, config.topology.name
    for spec, at in specs:
        _check(spec.kind != "allreduce" or sends_whole_models(rule), f"{at}.kind",
               f"allreduce is an exact average of full models; {rule} sends compressed differences over a fixed graph "
               "(use gossip.rule: dpsgd)")
        _check(spec.pull != "random_peer" or topology != "random", f"{at}.pull",
               "topology random already pulls random peers each round; use pull: neighbours")


def _validate_partition(config: Config) -> None:
    """Partition keys that only some kinds take."""
    p = config.data.partition
    _check(p.min_samples is None or p.min_samples >= 1, "data.partition.min_samples",
           f"must be >= 1 (or null: one minibatch, train.batch_size), got {p.min_samples}")
    _check(p.min_samples is None or p.kind == "dirichlet", "data.partition.min_samples",
           f"applies to kind dirichlet only, got kind {p.kind!r}")
    _check(not p.balance or p.kind == "dirichlet", "data.partition.balance",
           f"applies to kind dirichlet only, got kind {p.kind!r}")
    _check(not p.resample or p.kind == "preference", "data.partition.resample",
           f"redraws preference samples every batch; applies to kind preference only, got kind {p.kind!r}")


def _validate_faults(config: Config) -> None:
    f, n = config.faults, config.agents.count
    for k, kill in enumerate(f.kill):
        _check(0 <= kill.agent < n, f"faults.kill[{k}].agent", f"must be an agent index in 0..{n - 1}, got {kill.agent}")
        _check(kill.round >= 0, f"faults.kill[{k}].round", f"must be >= 0, got {kill.round}")
    kills = [(kill.agent, kill.round) for kill in f.kill]
    twice = sorted({pair for pair in kills if kills.count(pair) > 1})
    _check(not twice, "faults.kill", f"lists agent {twice[0][0] if twice else ''} twice at round "
                                     f"{twice[0][1] if twice else ''} (an agent listed again dies again in its next life)")
    for k, corrupt in enumerate(f.corrupt):
        _check(0 <= corrupt.agent < n, f"faults.corrupt[{k}].agent",
               f"must be an agent index in 0..{n - 1}, got {corrupt.agent}")
        _check(corrupt.round >= 0, f"faults.corrupt[{k}].round", f"must be >= 0, got {corrupt.round}")
    _check(0 <= f.kill_fraction < 1, "faults.kill_fraction", f"must be in [0, 1), got {f.kill_fraction}")
    _check(f.kill_fraction == 0 or round(f.kill_fraction * n) >= 1, "faults.kill_fraction",
           f"{f.kill_fraction} of {n} agents rounds to no agent at all; raise it to at least {0.5 / n:.3g}")
    _check(f.kill_round is None or f.kill_round >= 0, "faults.kill_round", f"must be >= 0, got {f.kill_round}")
    _check(0 <= f.drop_messages < 1, "faults.drop_messages", f"must be in [0, 1), got {f.drop_messages}")
    _check(0 <= f.delay_messages <= 1, "faults.delay_messages", f"must be in [0, 1], got {f.delay_messages}")
    _check(f.delay_s >= 0, "faults.delay_s", f"must be >= 0, got {f.delay_s}")
    _validate_chaos(config)
    injected = f.kill or f.kill_fraction > 0 or f.delay_messages > 0  # (drop_messages: seeded, both engines)
    _check(not injected or config.runtime.engine == "ray", "faults",
           "fault injection needs runtime.engine: ray (the reference engine has no processes to kill)")


def _validate_chaos(config: Config) -> None:
    """faults.chaos: rates finite and > 0, bounds in order, and only where something can die and come back."""
    c, where = config.faults.chaos, "faults.chaos"
    for name in ("every_rounds", "every_s", "coordinator_every_s"):
        value = getattr(c, name)
        _check(value is None or (math.isfinite(value) and value > 0), f"{where}.{name}",
               f"must be a finite mean interval > 0 (or null: off), got {value}")
    _check(c.every_rounds is None or c.every_s is None, f"{where}.every_s",
           "set one rate of agent deaths: every_rounds (a pure schedule) or every_s (the driver's clock), not both")
    for k, at in enumerate(c.coordinator_at_s):
        _check(math.isfinite(at) and at >= 0, f"{where}.coordinator_at_s[{k}]", f"must be a time >= 0 s, got {at}")
    _check(math.isfinite(c.start) and c.start >= 0, f"{where}.start", f"must be >= 0, got {c.start}")
    _check(c.stop is None or (math.isfinite(c.stop) and c.stop > c.start), f"{where}.stop",
           f"must be past start ({c.start}) or null (the run's end), got {c.stop}")
    _check(c.max_deaths is None or c.max_deaths >= 1, f"{where}.max_deaths", f"must be >= 1 or null, got {c.max_deaths}")
    _check(c.every_rounds is None or c.target != "node", f"{where}.target",
           "node kills come from the driver's clock: use every_s with target node (every_rounds kills agents)")
    agents = c.every_rounds is not None or c.every_s is not None
    coordinator = c.coordinator_every_s is not None or bool(c.coordinator_at_s)
    if not (agents or coordinator):
        return
    _check(config.runtime.engine == "ray", where + (".coordinator_every_s" if coordinator else ""),
           "chaos kills processes, which needs runtime.engine: ray (the reference engine has no actors nor coordinator)")
    _check(not agents or config.runtime.on_failure != "abort", "runtime.on_failure",
           "is abort, so chaos's first agent death would end the run: use restart (or drop) with faults.chaos")


def _validate_timeline(config: Config) -> None:
    """The timeline's events (core.timeline compiles them), and what only the Ray engine can run."""
    for k, event in enumerate(config.timeline):
        if event.communication is not None:
            _validate_kind_keys(event.communication, f"timeline[{k}].communication")
    timeline = compile_timeline(config)
    killed = {kill.agent for kill in config.faults.kill}
    for k, event in enumerate(timeline.events):
        where = f"timeline[{k}]"
        ray_only = event.action == "kill" or (event.loss or 0.0) > 0
        _check(not ray_only or config.runtime.engine == "ray", f"{where}.action",
               f"{event.action} injects faults, which need runtime.engine: ray (the reference engine has no processes "
               "to kill nor lossy links)")
        if event.action == "kill":
            twice = sorted(set(event.agents) & killed)
            _check(not twice, f"{where}.agents", f"agent {twice[0] if twice else ''} is killed twice (faults.kill or "
                                                 "an earlier kill event)")
            killed |= set(event.agents)



def _validate_registries(config: Config) -> None:
    """Names that live in registries, and the graph itself (built here, so errors come before any run)."""
    count = config.agents.count
    _check(1 <= count <= MAX_AGENTS, "agents.count", f"must be in 1..{MAX_AGENTS}, got {count}")
    _check(DATASETS.knows(config.data.name), "data.name",
           f"must be one of {', '.join(DATASETS)} or an import path package.module:loader; got {config.data.name!r}")
    _check(config.data.partition.kind in PARTITIONERS, "data.partition.kind",
           f"must be one of {', '.join(PARTITIONERS)}; got {config.data.partition.kind!r}")
    _check(MODELS.knows(config.model.name), "model.name", f"must be one of {', '.join(MODELS)} or an import path "
                                                          f"package.module:factory; got {config.model.name!r}")
    validate_task_fields(config)
    topology = build_topology(config.topology.name, config.agents.count, config.topology.weights, config.topology.params)
    _check(not (topology.time_varying and not sends_whole_models(config.gossip.rule)), "topology.name",
           f"{config.topology.name!r} changes every round; {config.gossip.rule} needs a static graph (x_hat bookkeeping)")
