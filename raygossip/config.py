"""The typed config tree that YAML mirrors field for field (dataclasses only: loading is config_io, checks validation)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from raygossip.algorithms.compressors import COMPRESSORS, INDEX_CODINGS, SCOPES
from raygossip.algorithms.consensus import RECOVERIES, RULES
from raygossip.algorithms.schedules import AVERAGING_RATE_KINDS, COMMUNICATION_KINDS, PULLS
from raygossip.algorithms.topology import WEIGHTS
from raygossip.optim import LR_SCHEDULES, OPTIMIZERS

# Allowed values: a Literal the loader checks (config_io), built from the registry where there is one.
Rule = Literal[tuple(RULES)]
Recovery = Literal[RECOVERIES]
CompressorName = Literal[tuple(COMPRESSORS)]
Scope = Literal[SCOPES]
IndexCoding = Literal[INDEX_CODINGS]
AveragingRateKind = Literal[AVERAGING_RATE_KINDS]
CommunicationKind = Literal[COMMUNICATION_KINDS]
Pull = Literal[PULLS]
Weights = Literal[WEIGHTS]
Optimizer = Literal[tuple(OPTIMIZERS)]
LrScheduleKind = Literal[tuple(LR_SCHEDULES)]
BatchNorm = Literal["local", "global", "none"]
Engine = Literal["reference", "ray"]
Mode = Literal["sync", "bounded", "async"]
OnFailure = Literal["restart", "drop", "abort"]
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
Transport = Literal["auto", "calls"]
OnDivergence = Literal["abort", "drop"]

ENGINES: tuple[str, ...] = typing.get_args(Engine)
MAX_AGENTS = 4096  # agents.count's upper bound

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
    key: str | None = None


@dataclass(kw_only=True)
class DataConfig:
    name: str = "digits"
    root: str = "data"
    download: bool = False
    image_size: int | None = None
    augment: bool | None = None
    params: dict[str, Any] = field(default_factory=dict)
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "mlp"
    norm: str | None = None
    width: float | None = None
    hidden: list[int] | None = None
    groups: int | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class AgentsConfig:
    count: int = 8


@dataclass(kw_only=True)
class TopologyConfig:
    name: str = "ring"
    weights: Weights = "uniform"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class LrScheduleConfig:
    kind: LrScheduleKind = "constant"
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
    optimizer: Optimizer = "sgd"
    local_steps: int = 1
    steps_per_epoch: int | None = None
    label_smoothing: float = 0.0
    loss: str = "cross_entropy"
    grad_clip_value: float | None = None
    on_divergence: OnDivergence = "abort"
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)


@dataclass(kw_only=True)
class CompressorConfig:
    name: CompressorName = "identity"
    ratio: float | None = None
    bits: int | None = None
    scope: Scope = "tensor"
    scaled: bool = False
    index_coding: IndexCoding = "plain"
    count: Literal["ceil", "authors"] = "ceil"


@dataclass(kw_only=True)
class GossipConfig:
    rule: Rule = "dpsgd"
    gamma: float = 1.0
    beta: float = 0.999
    compressor: CompressorConfig = field(default_factory=CompressorConfig)


@dataclass(kw_only=True)
class AveragingRateConfig:
    kind: AveragingRateKind = "constant"
    gamma0: float | None = None
    growth: float = 1.01
    ramp_epochs: int | None = None
    milestones: list[int] = field(default_factory=list)
    factor: float = 2.0
    exponent: float = 1.0  # adaptive: gamma = gamma0 * (first distance / distance) ** exponent, in [gamma0, 1]


@dataclass(kw_only=True)
class CommunicationKindConfig:
    """One communication kind and its keys (the whole run's, or one phase's)."""

    kind: CommunicationKind = "every"
    p: float = 1.0
    pull: Pull = "neighbours"
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
    bn: BatchNorm = "local"
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
    engine: Engine = "ray"
    mode: Mode = "sync"
    staleness: int = 1
    address: str | None = None
    num_cpus: int | None = None
    num_cpus_per_agent: float | None = None
    num_gpus_per_agent: float = 0.0
    placement: Placement = "PACK"
    device: str = "auto"
    torch_threads: int | None = None
    wait_timeout_s: float = 120.0
    inline_bytes: int = 1048576
    transport: Transport = "auto"
    agents_per_actor: int | Literal["auto"] = "auto"
    py_modules: list[str] = field(default_factory=list)
    working_dir: str | None = None
    batched_steps: bool = False
    finish_quorum: float = 0.5
    checkpoint_every: int = 0
    on_failure: OnFailure = "restart"
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


ChaosTarget = Literal["agent", "actor", "node"]


@dataclass(kw_only=True)
class ChaosConfig:
    every_rounds: float | None = None
    every_s: float | None = None
    target: ChaosTarget = "agent"
    start: float = 0.0
    stop: float | None = None
    max_deaths: int | None = None
    coordinator_every_s: float | None = None
    coordinator_at_s: list[float] = field(default_factory=list)


@dataclass(kw_only=True)
class FaultsConfig:
    kill: list[KillConfig] = field(default_factory=list)
    corrupt: list[CorruptConfig] = field(default_factory=list)
    kill_fraction: float = 0.0
    kill_round: int | None = None
    drop_messages: float = 0.0
    recovery: Recovery = "resync"  # after a dropped message (CHOCO/AdaGossip): resync | none
    delay_messages: float = 0.0
    delay_s: float = 0.0
    chaos: ChaosConfig = field(default_factory=ChaosConfig)


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
    recovery: Recovery | None = None  # link: after a message the loss drops (CHOCO/AdaGossip); None keeps the link's
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
    metric: str = "accuracy"
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
