"""RunPlan with communication phases, the all-reduce kind and the random topology: which rounds do what."""

from __future__ import annotations

import numpy as np
import pytest

from raygossip.algorithms.topology import build_topology
from raygossip.validation import load_config
from raygossip.core.plan import RunPlan

BUDGET_WINDOW = [  # the single-merge paper's Fig. 2 protocol: r = 0.2 everywhere, all-reduce inside [0.75, 0.80)
    {"until": 0.75, "kind": "probability", "p": 0.2, "pull": "random_peer"},
    {"until": 0.8, "kind": "allreduce"},
    {"until": 1.0, "kind": "probability", "p": 0.2, "pull": "random_peer"},
]


def plan_for(overrides: dict, agents: int = 8, steps_per_epoch: int = 10, epochs: int = 10) -> RunPlan:
    base = {"seed": 5, "agents": {"count": agents}, "train": {"epochs": epochs}, **overrides}
    config = load_config(base=base)
    t = config.topology
    return RunPlan(config, build_topology(t.name, agents, t.weights, t.params), steps_per_epoch)


def test_budget_window_rounds_are_exact_allreduce_and_the_rest_pull_one_peer_with_probability_p():
    plan = plan_for({"topology": {"name": "complete"}, "schedule": {"communication": {"phases": BUDGET_WINDOW}}})
    assert plan.total_rounds == 100
    kinds = [plan.communication(r).kind for r in range(100)]
    assert [r for r, kind in enumerate(kinds) if kind == "allreduce"] == [74, 75, 76, 77, 78]  # progress 0.75..0.79
    pulls = 0
    for r in range(100):
        round_plan = plan.round_plan(r)
        if kinds[r] == "allreduce":
            assert len(round_plan.edges) == 8 * 7 and round_plan.weights[0][0] == 1 / 8
            continue
        if round_plan is None:
            continue
        for i in round_plan.mixers:
            assert len(round_plan.senders_to(i)) == 1 and round_plan.weights[i][0] == 0.5
        pulls += len(round_plan.edges)
    assert 0.12 < pulls / (95 * 8) < 0.28  # about p = 0.2 pulls per agent and round


def test_random_topology_plans_follow_the_run_seed_and_weigh_pulls_equally():
    overrides = {"topology": {"name": "random", "params": {"r": 1.5}}}
    plan = plan_for(overrides)
    again = plan_for(overrides)
    other = plan_for({**overrides, "seed": 6})
    assert [plan.round_plan(r) for r in range(20)] == [again.round_plan(r) for r in range(20)]
    assert [plan.round_plan(r).edges for r in range(20)] != [other.round_plan(r).edges for r in range(20)]
    for r in range(20):
        w = plan.topology.mixing(r, seed=5)
        round_plan = plan.round_plan(r)
        for i in range(8):
            senders = round_plan.senders_to(i)
            assert senders == plan.topology.in_neighbors(i, r, seed=5) and len(senders) in (1, 2)
            assert round_plan.weights[i][0] == pytest.approx(w[i, i]) == pytest.approx(1 / (len(senders) + 1))


def test_allreduce_every_round_is_parallel_sgd():
    plan = plan_for({"schedule": {"communication": {"kind": "allreduce"}}})
    assert all(len(plan.round_plan(r).edges) == 56 for r in range(plan.total_rounds))


def test_phases_with_none_and_late_inside():
    phases = [{"until": 0.5, "kind": "none"}, {"until": 1.0, "kind": "late", "start": 0.9}]
    plan = plan_for({"schedule": {"communication": {"phases": phases}}})
    talking = [r for r in range(100) if plan.round_plan(r) is not None]
    assert talking == list(range(89, 100))  # rounds ending at progress >= 0.9
    assert np.all([plan.communication(r).kind == "none" for r in range(49)])
