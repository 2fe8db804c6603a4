"""RunPlan's memoised round plans and gamma equal the plans and rates built from scratch, in any call order."""

from __future__ import annotations

import pytest

from raygossip.algorithms.topology import build_topology
from raygossip.config import Config
from raygossip.config_io import from_dict
from raygossip.validation import validate
from raygossip.core.plan import RunPlan, _round_plan, averaging_rate

STEPS_PER_EPOCH = 6


def run_plan(topology: str, rule: str, communication: dict, rate: dict, agents: int = 8, local_steps: int = 1,
             params: dict | None = None) -> RunPlan:
    config = from_dict(Config, {
        "seed": 3,
        "data": {"name": "digits"},
        "model": {"name": "mlp"},
        "agents": {"count": agents},
        "topology": {"name": topology, "params": params or {}},
        "train": {"epochs": 5, "local_steps": local_steps},
        "gossip": {"rule": rule},
        "schedule": {"averaging_rate": rate, "communication": communication},
    })
    validate(config)
    return RunPlan(config, build_topology(topology, agents, "uniform", params), STEPS_PER_EPOCH)


def scratch_plan(plan: RunPlan, round_index: int):
    """What round_plan(r) returned before it was memoised: None for silent rounds, else a fresh plan."""
    return _round_plan(plan, round_index) if _communicates(plan, round_index) else None


def _communicates(plan: RunPlan, round_index: int) -> bool:
    from raygossip.algorithms.schedules import round_communicates

    comm = plan.communication(round_index)
    progress = (plan.last_step_of_round(round_index) + 1) / plan.total_steps
    return round_communicates(comm.kind, round_index, progress,
                              {"start": comm.start, "width": comm.width, "sparse_every": comm.sparse_every})


CASES = [
    ("ring", "dpsgd", {"kind": "every"}, {"kind": "constant", "gamma0": 0.5}, 1),
    ("ring", "dpsgd", {"kind": "every", "pull": "random_peer"}, {"kind": "ars", "gamma0": 0.2, "growth": 1.5}, 1),
    ("exponential", "choco", {"kind": "probability", "p": 0.4}, {"kind": "linear", "gamma0": 0.3, "ramp_epochs": 3}, 1),
    ("one_peer_exponential", "dpsgd", {"kind": "every"}, {"kind": "cosine", "gamma0": 0.1, "ramp_epochs": 4}, 1),
    ("exponential", "choco", {"kind": "late", "start": 0.5, "sparse_every": 3},
     {"kind": "step", "gamma0": 0.25, "milestones": [2, 4], "factor": 2.0}, 2),
    ("ring", "adagossip", {"kind": "window", "start": 0.2, "width": 0.3, "sparse_every": 2}, {"kind": "constant"}, 3),
    ("complete", "dpsgd", {"kind": "none"}, {"kind": "constant"}, 1),
    ("ring", "dpsgd", {"kind": "allreduce"}, {"kind": "constant"}, 1),
    ("random", "dpsgd", {"kind": "every"}, {"kind": "constant"}, 1),
    ("one_peer_exponential", "dpsgd", {"phases": [
        {"until": 0.5, "kind": "probability", "p": 0.2, "pull": "random_peer"}, {"until": 0.7, "kind": "allreduce"},
        {"until": 0.9, "kind": "every"}, {"until": 1.0, "kind": "window", "start": 0.95, "width": 0.02}]},
     {"kind": "constant"}, 1),
]
PARAMS = {"random": {"r": 1.2}}


@pytest.mark.parametrize("topology,rule,communication,rate,local_steps", CASES)
def test_memoised_round_plans_and_gamma_equal_fresh_ones(topology, rule, communication, rate, local_steps) -> None:
    plan = run_plan(topology, rule, communication, rate, local_steps=local_steps, params=PARAMS.get(topology))
    rounds = list(range(plan.total_rounds))
    schedule = averaging_rate(plan.config)
    for order in (rounds, rounds[::-1], rounds[::7] + rounds):
        for r in order:
            assert plan.round_plan(r) == scratch_plan(plan, r), f"round {r}"
            expected_gamma = float(schedule(plan.epoch_of_step(plan.last_step_of_round(r))))
            assert plan.gamma(r) == expected_gamma and isinstance(plan.gamma(r), float)


def test_memoised_plan_carries_its_round_and_memos_stay_out_of_equality() -> None:
    plan = run_plan("one_peer_exponential", "dpsgd", {"kind": "every"}, {"kind": "constant"})
    period = plan.topology.period()
    assert period > 1
    first, later = plan.round_plan(1), plan.round_plan(1 + period)
    assert (first.round, later.round) == (1, 1 + period)
    assert (first.edges, first.mixers, first.weights) == (later.edges, later.mixers, later.weights)
    assert plan.round_plan(1) is first  # the memo answers again without a copy
    assert plan.round_plan(2).edges != first.edges  # another W of the period
    fresh = RunPlan(plan.config, plan.topology, plan.steps_per_epoch)
    assert fresh == plan and repr(fresh) == repr(plan)
