"""Every configs/papers file loads and validates, and holds the authors' protocol knob for knob (nothing is run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from raygossip.algorithms.spectral import spectral_report
from raygossip.algorithms.topology import build_topology
from raygossip.config import Config
from raygossip.validation import load_config
from raygossip.core.plan import RunPlan

PAPERS = Path(__file__).resolve().parents[1] / "configs" / "papers"
FILES = sorted(PAPERS.glob("*.yaml"))

ARS = {  # github.com/aparna-aketi/ARS test.sh + trainer.py
    "agents.count": 16, "topology.name": "ring", "data.partition.kind": "dirichlet_lin", "data.partition.alpha": 0.01,
    "train.epochs": 300, "train.batch_size": 32, "train.lr": 0.1, "train.momentum": 0.9, "train.nesterov": True,
    "train.weight_decay": 1e-4, "train.lr_schedule.kind": "step", "train.lr_schedule.milestones": [0.5, 0.6],
    "train.lr_schedule.factor": 0.1, "gossip.rule": "dpsgd", "schedule.averaging_rate.kind": "ars",
    "schedule.averaging_rate.gamma0": 0.09, "schedule.averaging_rate.growth": 1.01, "model.norm": "evonorm",
    "schedule.final_merge.enabled": True, "train.label_smoothing": 0.0, "train.grad_clip_value": None,
}
ADAGOSSIP = {  # github.com/aparna-aketi/AdaG_SGD trainer.py + gossip_choco/
    "model.name": "resnet20", "model.norm": "evonorm", "data.partition.kind": "iid", "train.epochs": 200,
    "train.lr": 0.1, "train.momentum": 0.9, "train.nesterov": True, "train.weight_decay": 1e-4,
    "train.lr_schedule.milestones": [0.5, 0.75], "train.lr_schedule.factor": 0.1, "gossip.rule": "adagossip",
    "gossip.beta": 0.999, "gossip.compressor.name": "top_k", "gossip.compressor.ratio": 0.01,
    "gossip.compressor.scope": "tensor", "schedule.communication.kind": "every", "schedule.final_merge.enabled": True,
}
SINGLE_MERGE = {  # github.com/Raiden-Zhu/ICLR-2026-Grokking-in-Decentralized-Learning configs/examples/figure*.yaml
    "agents.count": 32, "model.name": "resnet18", "model.norm": "batch", "train.optimizer": "sgd", "train.lr": 0.01,
    "train.momentum": 0.9, "train.weight_decay": 5e-4, "train.batch_size": 128, "train.local_steps": 100,
    "train.label_smoothing": 0.1, "train.grad_clip_value": 1.0, "train.lr_schedule.kind": "constant",
    "data.partition.kind": "preference", "data.partition.alpha": 0.1, "data.partition.resample": True,
    "topology.name": "complete", "gossip.rule": "dpsgd", "gossip.gamma": 1.0,
    "schedule.averaging_rate.kind": "constant", "schedule.final_merge.enabled": True,
    "schedule.final_merge.bn": "global", "schedule.final_merge.bn_batches": 32, "data.augment": False,
}
EXPECTED: dict[str, dict[str, Any]] = {
    "ars_cifar10_resnet20.yaml": {**ARS, "model.name": "resnet20"},
    "ars_cifar10_vgg11.yaml": {**ARS, "model.name": "vgg11", "model.width": 0.25},
    "adagossip_cifar10_resnet20_ring.yaml": {**ADAGOSSIP, "agents.count": 16, "topology.name": "ring",
                                             "train.batch_size": 32},
    "adagossip_cifar10_resnet20_torus.yaml": {**ADAGOSSIP, "agents.count": 16, "topology.name": "circulant",
                                              "topology.params": {"offsets": [1, 4]}, "train.batch_size": 32},
    "adagossip_cifar10_resnet20_dyck.yaml": {**ADAGOSSIP, "agents.count": 32, "topology.name": "adagossip_dyck",
                                             "train.batch_size": 16},
    "single_merge_cifar100_resnet18.yaml": {**SINGLE_MERGE, "schedule.communication.kind": "probability",
                                            "schedule.communication.p": 0.2,
                                            "schedule.communication.pull": "random_peer",
                                            "data.partition.samples_per_agent": 4096},
    "single_merge_cifar100_resnet18_window.yaml": {**SINGLE_MERGE, "data.partition.samples_per_agent": 512},
    "ars_fashionmnist_lenet5.yaml": {"model.name": "lenet5", "agents.count": 16, "schedule.averaging_rate.kind": "ars"},
}


def get(config: Config, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def test_every_paper_config_has_a_row():
    assert {path.name for path in FILES} == set(EXPECTED)


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_paper_config_loads_validates_and_matches_the_authors_knobs(path: Path):
    config = load_config(path)  # validates (and builds the graph)
    expected = EXPECTED[path.name]
    got = {key: get(config, key) for key in expected}
    assert got == expected
    assert config.data.download and config.runtime.engine == "ray"


def plan_of(name: str, steps_per_epoch: int) -> RunPlan:
    config = load_config(PAPERS / name)
    t = config.topology
    return RunPlan(config, build_topology(t.name, config.agents.count, t.weights, t.params), steps_per_epoch)


def test_ars_rate_reaches_one_at_80_percent_of_training():
    plan = plan_of("ars_cifar10_resnet20.yaml", 98)  # 50000 CIFAR-10 images / (16 agents x 32)
    first_round_of = {plan.epoch_of_step(plan.last_step_of_round(r)): r for r in reversed(range(plan.total_rounds))}
    assert plan.gamma(first_round_of[0]) == pytest.approx(0.0909)
    assert plan.gamma(first_round_of[240]) < 1.0 and plan.gamma(first_round_of[241]) == 1.0  # 241 / 300 = 80%


def test_single_merge_protocol_rounds():
    plan = plan_of("single_merge_cifar100_resnet18.yaml", 1000)
    assert (plan.total_steps, plan.total_rounds) == (30000, 300)
    window = plan_of("single_merge_cifar100_resnet18_window.yaml", 1000)
    allreduce = [r for r in range(300) if window.communication(r).kind == "allreduce"]
    assert allreduce == list(range(269, 284))  # rounds ending at steps 27000..28400: progress [0.90, 0.95)
    assert all(len(window.round_plan(r).edges) == 32 * 31 for r in allreduce)


def test_adagossip_dyck_is_the_codes_graph():
    config = load_config(PAPERS / "adagossip_cifar10_resnet20_dyck.yaml")
    report = spectral_report(build_topology(config.topology.name, 32))
    assert report["lambda2"] == pytest.approx(0.854, abs=1e-3) and report["min_degree"] == report["max_degree"] == 3
