"""Accuracy against spectral gap: the same run on ring, torus, Dyck, exponential and complete graphs.

All graphs have 32 agents (the Dyck graph has exactly 32 nodes): ring (gap 0.013), 2-D torus 4x8 (0.117),
Dyck (0.191), static exponential (0.400) and complete (1.0, which is parallel SGD), with uniform weights,
D-PSGD with gamma 1 and the same non-IID data. The table adds each graph's lambda_2 (the second largest
eigenvalue magnitude of W), spectral gap and degree (raygossip.algorithms.spectral.spectral_report) and is
sorted by spectral gap.

    python -m scenarios topologies --scale cpu --seeds 0 1 2
"""

from __future__ import annotations

from typing import Sequence

from raygossip.algorithms.spectral import spectral_report
from raygossip.algorithms.topology import build_topology
from scenarios import common
from scenarios.common import Outcome, Variant, Whole

SCENARIO = "topologies"
CPU_CONFIG, PAPER_CONFIG = "topologies_mnist_mlp.yaml", "adagossip_cifar10_resnet20_dyck.yaml"
AGENTS = 32
GRAPHS: dict[str, dict] = {  # label -> topology section
    "ring": {"name": "ring"},
    "torus 4x8": {"name": "torus", "params": {"rows": 4, "cols": 8}},
    "dyck": {"name": "dyck"},
    "exponential": {"name": "exponential"},
    "complete": {"name": "complete"},
}
SMOKE = {"agents": {"count": AGENTS}, "train": {"batch_size": 8}}


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    base = common.base_mapping(scale, CPU_CONFIG, PAPER_CONFIG, overrides, smoke=SMOKE)
    base = common.deep_merge(base, {
        "agents": {"count": AGENTS},
        # the paper file is AdaGossip's: the topology comparison runs it with exact D-PSGD gossip
        "gossip": {"rule": "dpsgd", "gamma": 1.0, "compressor": Whole(name="identity")},
        "schedule": {"averaging_rate": Whole(kind="constant", gamma0=1.0), "communication": common.EVERY_ROUND},
    })
    return [common.variant(SCENARIO, base, label, {"topology": Whole({"weights": "uniform", "params": {}, **spec})})
            for label, spec in GRAPHS.items()]


def spectral(config) -> dict:
    t = config.topology
    return spectral_report(build_topology(t.name, config.agents.count, t.weights, t.params))


def report(outcomes: Sequence[Outcome]) -> str:
    reports = {label: spectral(runs[0].config) for label, runs in common.by_label(outcomes).items()}
    ordered = sorted(outcomes, key=lambda run: reports[run.label]["spectral_gap"])
    extra = [
        ("lambda_2", lambda runs: f"{reports[runs[0].label]['lambda2']:.3f}"),
        ("spectral gap", lambda runs: f"{reports[runs[0].label]['spectral_gap']:.3f}"),
        ("degree", lambda runs: str(reports[runs[0].label]["max_degree"])),
        common.summary_column("consensus dist", "consensus_distance"),
    ]
    return common.summary_table(ordered, extra)


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report)
