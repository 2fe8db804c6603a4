"""The typed config tree that YAML mirrors field for field, with a strict loader and range checks."""

from __future__ import annotations

import dataclasses
import copy
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from raygossip.algorithms.schedules import AVERAGING_RATE_KINDS, COMMUNICATION_KINDS, PULLS
from raygossip.errors import UserError

# ---------------------------------------------------------------- the tree


@dataclass(kw_only=True)
class PartitionConfig:
    kind: str = "dirichlet"
    alpha: float = 1.0
    shards_per_agent: int = 2
    samples_per_agent: int | None = None
    min_samples: int | None = None
    balance: bool = False
    resample: bool = False


@dataclass(kw_only=True)
class DataConfig:
    name: str = "digits"
    root: str = "data"
    download: bool = False
    image_size: int | None = None
    augment: bool | None = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "mlp"
    norm: str | None = None
    width: float | None = None
    hidden: list[int] | None = None
    groups: int | None = None


@dataclass(kw_only=True)
class AgentsConfig:
    count: int = 8


@dataclass(kw_only=True)
class TopologyConfig:
    name: str = "ring"
    weights: str = "uniform"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class LrScheduleConfig:
    kind: str = "constant"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    factor: float = 0.1
    warmup_epochs: float = 0.0


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    local_steps: int = 1
    steps_per_epoch: int | None = None
    label_smoothing: float = 0.0
    grad_clip_value: float | None = None
    on_divergence: str = "abort"
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)


@dataclass(kw_only=True)
class CompressorConfig:
    name: str = "identity"
    ratio: float | None = None
    bits: int | None = None
    scope: str = "tensor"
    scaled: bool = False
    index_coding: str = "plain"
    count: str = "ceil"


@dataclass(kw_only=True)
class GossipConfig:
    rule: str = "dpsgd"
    gamma: float = 1.0
    beta: float = 0.999
    compressor: CompressorConfig = field(default_factory=CompressorConfig)


@dataclass(kw_only=True)
class AveragingRateConfig:
    kind: str = "constant"
    gamma0: float | None = None
    growth: float = 1.01
    ramp_epochs: int | None = None
    milestones: list[int] = field(default_factory=list)
    factor: float = 2.0
    exponent: float = 1.0  # adaptive: gamma = gamma0 * (first distance / distance) ** exponent, in [gamma0, 1]


@dataclass(kw_only=True)
class CommunicationKindConfig:
    """One communication kind and its keys (the whole run's, or one phase's)."""

    kind: str = "every"
    p: float = 1.0
    pull: str = "neighbours"
    start: float = 0.5
    width: float = 0.25
    sparse_every: int = 0


@dataclass(kw_only=True)
class PhaseConfig(CommunicationKindConfig):
    until: float


@dataclass(kw_only=True)
class CommunicationConfig(CommunicationKindConfig):
    phases: list[PhaseConfig] = field(default_factory=list)


@dataclass(kw_only=True)
class FinalMergeConfig:
    enabled: bool = True
    bn: str = "local"
    bn_batches: int = 20


@dataclass(kw_only=True)
class ScheduleConfig:
    averaging_rate: AveragingRateConfig = field(default_factory=AveragingRateConfig)
    communication: CommunicationConfig = field(default_factory=CommunicationConfig)
    final_merge: FinalMergeConfig = field(default_factory=FinalMergeConfig)


@dataclass(kw_only=True)
class TimingConfig:
    slowdown: list[float] | None = None
    slow_fraction: float = 0.0
    slow_factor: float = 1.0
    jitter: float = 0.0
    step_time_s: float = 0.0
    latency_s: float = 0.0
    bandwidth_mbps: float | None = None


@dataclass(kw_only=True)
class RuntimeConfig:
    engine: str = "ray"
    mode: str = "sync"
    staleness: int = 1
    address: str | None = None
    num_cpus: int | None = None
    num_cpus_per_agent: float | None = None
    num_gpus_per_agent: float = 0.0
    placement: str = "PACK"
    device: str = "auto"
    torch_threads: int | None = None
    wait_timeout_s: float = 120.0
    inline_bytes: int = 1048576
    transport: str = "auto"
    agents_per_actor: int = 1
    batched_steps: bool = False
    finish_quorum: float = 0.5
    checkpoint_every: int = 0
    on_failure: str = "restart"
    snapshot_every: int = 10
    max_restarts: int = 3
    progress: bool = True
    timing: TimingConfig = field(default_factory=TimingConfig)


@dataclass(kw_only=True)
class KillConfig:
    agent: int
    round: int


@dataclass(kw_only=True)
class CorruptConfig:
    agent: int
    round: int


@dataclass(kw_only=True)
class FaultsConfig:
    kill: list[KillConfig] = field(default_factory=list)
    corrupt: list[CorruptConfig] = field(default_factory=list)
    kill_fraction: float = 0.0
    kill_round: int | None = None
    drop_messages: float = 0.0
    delay_messages: float = 0.0
    delay_s: float = 0.0


@dataclass(kw_only=True)
class TimelineEventConfig:
    """One timeline event: at a round, an action and the keys it takes (core.timeline.ACTIONS says which)."""

    round: int | None = None
    time_s: float | None = None
    action: str
    agents: list[int] | None = None
    factor: float | None = None
    groups: list[list[int]] | None = None
    start: str | None = None
    latency_s: float | None = None
    bandwidth_mbps: float | None = None
    loss: float | None = None
    edges: list[list[int]] | None = None
    topology: TopologyConfig | None = None
    value: float | None = None
    communication: CommunicationKindConfig | None = None


@dataclass(kw_only=True)
class EvalConfig:
    every: int = 1
    test_samples: int | None = None
    local: bool = True
    batch_size: int = 1000
    validation_fraction: float = 0.0
    tensorboard: bool = False


@dataclass(kw_only=True)
class Config:
    name: str = "run"
    label: str | None = None
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    timeline: list[TimelineEventConfig] = field(default_factory=list)


# ---------------------------------------------------------------- strict loading


class _YamlLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads exponent floats without a dot (1e-3), as YAML 1.2 does."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """yaml.safe_load semantics (no arbitrary objects), with 1e-3 read as a number."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against annotation `tp`; ints are accepted where floats are, nothing else converts."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [arg for arg in args if arg is not type(None)]
        for arg in candidates:
            try:
                return _coerce(value, arg, path)
            except UserError as error:
                if len(candidates) == 1:
                    raise error from None
                continue
        raise _type_error(value, tp, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _type_error(value, tp, path)
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(value, tp, path)
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, f"{path}[{k}]") for k, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, tp, path)
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(value, tp, path)
        if not math.isfinite(value):
            raise UserError(path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(value, tp, path)
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            raise _type_error(value, tp, path)
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def _type_error(value: Any, tp: Any, path: str) -> UserError:
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return UserError(path, f"expected {_type_name(tp)}, got {type(value).__name__} {shown}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are UserErrors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            shown = str(key).encode("unicode_escape").decode()
            where = f"{path}.{shown}" if path else shown
            raise UserError(where, f"unknown key (allowed in {path or 'the top level'}: {', '.join(names)})")
    kwargs = {key: _coerce(value, hints[key], f"{path}.{key}" if path else key) for key, value in data.items()}
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"{path}.{f.name}" if path else f.name, "is required")
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b.c=VALUE` overrides (VALUE parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise UserError("--set", f"expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as error:
            raise UserError(f"--set {key}", f"value is not valid YAML: {str(error).splitlines()[0]}") from None
        parts = key.strip().split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(".".join(parts[: depth + 1]), "is not a section; cannot set a key inside it")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a mapping, with one-line errors for missing files and bad YAML."""
    file = Path(path)
    if not file.is_file():
        raise UserError("config", f"no such file: {str(file)!r}")
    try:
        data = parse_yaml(file.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError("config", f"{file} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("config", f"{file} must hold a mapping at the top level, got {type(data).__name__}")
    return data


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
    import networkx as nx

    if not isinstance(data.get("topology"), nx.Graph):
        return data
    from raygossip.algorithms.topology import edges_from_graph

    count, data["topology"] = edges_from_graph(data["topology"])
    agents = data.setdefault("agents", {})
    if isinstance(agents, dict):
        _check(agents.setdefault("count", count) == count, "agents.count",
               f"must equal the topology graph's {count} nodes, got {agents['count']!r} (or leave it out)")
    return data


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------- range and cross-field checks

CHOICES: dict[str, tuple[str, ...]] = {
    "gossip.rule": ("dpsgd", "choco", "adagossip"),
    "gossip.compressor.name": ("identity", "top_k", "random_k", "qsgd", "sign"),
    "gossip.compressor.scope": ("tensor", "global"),
    "gossip.compressor.index_coding": ("plain", "entropy"),
    "gossip.compressor.count": ("ceil", "authors"),
    "schedule.averaging_rate.kind": AVERAGING_RATE_KINDS,
    "schedule.communication.kind": COMMUNICATION_KINDS,
    "schedule.communication.pull": PULLS,
    "schedule.final_merge.bn": ("local", "global", "none"),
    "runtime.engine": ("reference", "ray"),
    "runtime.mode": ("sync", "bounded", "async"),
    "runtime.on_failure": ("restart", "drop", "abort"),
    "runtime.placement": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "runtime.transport": ("auto", "calls"),
    "train.optimizer": ("sgd", "adamw"),
    "train.on_divergence": ("abort", "drop"),
    "train.lr_schedule.kind": ("constant", "step", "cosine"),
    "topology.weights": ("uniform", "metropolis"),
}


def _get(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise UserError(field_name, message)


def _validate_compressor_count(config: Config) -> None:
    """gossip.compressor.count counts top_k's k; another compressor has no k to count that way."""
    c = config.gossip.compressor
    _check(c.count == "ceil" or c.name == "top_k", "gossip.compressor.count",
           f"{c.count} counts top_k's k per tensor; compressor {c.name!r} has no such k (leave count at ceil)")


def validate(config: Config) -> None:
    """Range and cross-field checks; raises the first UserError found. Runs before anything starts."""
    for dotted, allowed in CHOICES.items():
        value = _get(config, dotted)
        _check(value in allowed, dotted, f"must be one of {', '.join(allowed)}; got {value!r}")
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
    _check(r.agents_per_actor >= 1, "runtime.agents_per_actor",
           f"must be >= 1 (agents one actor process hosts), got {r.agents_per_actor}")
    _check(not r.batched_steps or r.agents_per_actor > 1, "runtime.batched_steps",
           f"steps the agents of one actor together: needs runtime.agents_per_actor > 1, got {r.agents_per_actor}")
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
    """Ranges of one communication kind's keys (the run's or a phase's, at `where`)."""
    for key, allowed in (("kind", COMMUNICATION_KINDS), ("pull", PULLS)):
        value = getattr(m, key)
        _check(value in allowed, f"{where}.{key}", f"must be one of {', '.join(allowed)}; got {value!r}")
    _check(0 < m.p <= 1, f"{where}.p", f"must be in (0, 1], got {m.p}")
    _check(0 <= m.start <= 1, f"{where}.start", f"must be in [0, 1], got {m.start}")
    _check(0 < m.width <= 1, f"{where}.width", f"must be in (0, 1], got {m.width}")
    _check(m.sparse_every >= 0, f"{where}.sparse_every", "must be >= 0 (0: no rounds outside)")


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
        _check(spec.kind != "allreduce" or rule == "dpsgd", f"{at}.kind",
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
    agents = [kill.agent for kill in f.kill]
    _check(len(set(agents)) == len(agents), "faults.kill", f"lists an agent twice: {agents}")
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
    injected = f.kill or f.kill_fraction > 0 or f.drop_messages > 0 or f.delay_messages > 0
    _check(not injected or config.runtime.engine == "ray", "faults",
           "fault injection needs runtime.engine: ray (the reference engine has no processes to kill)")


def _validate_timeline(config: Config) -> None:
    """The timeline's events (core.timeline compiles them), and what only the Ray engine can run."""
    from raygossip.core.timeline import compile_timeline

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


MAX_AGENTS = 4096


def _validate_registries(config: Config) -> None:
    """Names that live in registries, and the graph itself (built here, so errors come before any run)."""
    count = config.agents.count
    _check(1 <= count <= MAX_AGENTS, "agents.count", f"must be in 1..{MAX_AGENTS}, got {count}")
    from raygossip.algorithms.topology import build_topology
    from raygossip.data.datasets import DATASETS
    from raygossip.data.partition import PARTITIONERS
    from raygossip.models import MODELS

    _check(config.data.name in DATASETS, "data.name",
           f"must be one of {', '.join(DATASETS)}; got {config.data.name!r}")
    _check(config.data.partition.kind in PARTITIONERS, "data.partition.kind",
           f"must be one of {', '.join(PARTITIONERS)}; got {config.data.partition.kind!r}")
    _check(config.model.name in MODELS, "model.name", f"must be one of {', '.join(MODELS)}; got {config.model.name!r}")
    topology = build_topology(config.topology.name, config.agents.count, config.topology.weights, config.topology.params)
    _check(not (topology.time_varying and config.gossip.rule != "dpsgd"), "topology.name",
           f"{config.topology.name!r} changes every round; {config.gossip.rule} needs a static graph (x_hat bookkeeping)")
