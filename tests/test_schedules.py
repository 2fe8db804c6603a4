"""Averaging-rate and communication schedules: table tests of values and message plans."""

import numpy as np
import pytest
import torch

from raygossip.algorithms.compressors import make_compressor
from raygossip.algorithms.consensus import dpsgd
from raygossip.algorithms.schedules import (
    active_agents,
    adaptive_gamma,
    adaptive_gammas,
    allreduce_plan,
    ars_exponential,
    as_schedule,
    cosine_ramp,
    linear_ramp,
    phase_index,
    plan_round,
    round_communicates,
    step_ramp,
)
from raygossip.algorithms.topology import build_topology


@pytest.mark.parametrize(
    "epoch, expected",
    [(0, 0.0909), (1, 0.0918), (149, 0.4004), (240, None), (241, 1.0), (299, 1.0)],
)
def test_ars_matches_the_authors_code(epoch, expected):
    rate = ars_exponential(0.09, 1.01)
    if expected is None:
        assert rate(epoch) < 1.0
    else:
        assert rate(epoch) == pytest.approx(expected, abs=1e-4)


def test_ars_epoch_zero_and_from_241_on():
    rate = ars_exponential(0.09, 1.01)
    assert round(rate(0), 3) == 0.091
    assert all(rate(e) == 1.0 for e in range(241, 400))
    assert all(rate(e) < 1.0 for e in range(0, 241))


@pytest.mark.parametrize(
    "schedule, epoch, expected",
    [
        (linear_ramp(0.2, 10), 0, 0.2),
        (linear_ramp(0.2, 10), 5, 0.6),
        (linear_ramp(0.2, 10), 10, 1.0),
        (linear_ramp(0.2, 10), 50, 1.0),
        (cosine_ramp(0.2, 10), 0, 0.2),
        (cosine_ramp(0.2, 10), 5, 0.6),
        (cosine_ramp(0.2, 10), 10, 1.0),
        (step_ramp(0.25, [3, 6], 2.0), 2, 0.25),
        (step_ramp(0.25, [3, 6], 2.0), 3, 0.5),
        (step_ramp(0.25, [3, 6], 2.0), 6, 1.0),
        (step_ramp(0.4, [1, 2, 3], 2.0), 3, 1.0),
        (as_schedule(0.3), 77, 0.3),
    ],
)
def test_ramp_values(schedule, epoch, expected):
    assert schedule(epoch) == pytest.approx(expected)


@pytest.mark.parametrize(
    "distances, exponent, expected",
    [
        ([0.5], 1.0, [0.2]),  # the first distance is its own reference
        ([0.5, 1.0, 2.0], 1.0, [0.2, 0.2, 0.2]),  # rising distances (a common start drifting apart): gamma0
        ([2.0, 1.0, 0.5], 1.0, [0.2, 0.4, 0.8]),  # halving the distance doubles gamma
        ([2.0, 1.0, 0.5], 2.0, [0.2, 0.8, 1.0]),  # ... quadruples it with exponent 2, capped at 1
        ([1.0, 2.0, 1.0], 1.0, [0.2, 0.2, 0.4]),  # the reference is the largest distance so far
        ([2.0, 0.5, 1.0], 1.0, [0.2, 0.8, 0.8]),  # a ratchet: never down when the agents drift apart again
        ([1.0, 0.0], 1.0, [0.2, 1.0]),  # agents that agree exactly: 1
        ([1.0, float("nan"), 0.5], 1.0, [0.2, 0.2, 0.4]),  # a non-finite distance changes nothing
        ([0.0, 0.0], 1.0, [0.2, 0.2]),  # no reference yet (identical agents from the start): gamma0
    ],
)
def test_adaptive_gamma_rises_as_the_agents_agree(distances, exponent, expected):
    assert adaptive_gammas(0.2, distances, exponent) == pytest.approx(expected)


def test_adaptive_gamma_is_monotone_and_within_gamma0_and_one():
    rng = np.random.default_rng(0)
    distances = list(rng.lognormal(0.0, 1.0, 200))
    gammas = adaptive_gammas(0.1, distances, 1.5)
    assert gammas == sorted(gammas) and 0.1 <= gammas[0] and gammas[-1] <= 1.0
    assert adaptive_gamma(0.3, 1.0, 4.0, 0.1) == 0.3  # (previous kept when the rule says less)


@pytest.mark.parametrize(
    "kind, round_index, progress, params, expected",
    [
        ("every", 3, 0.1, {}, True),
        ("none", 3, 0.9, {}, False),
        ("late", 0, 0.2, {"start": 0.5, "sparse_every": 0}, False),
        ("late", 9, 0.6, {"start": 0.5, "sparse_every": 0}, True),
        ("late", 4, 0.2, {"start": 0.5, "sparse_every": 4}, True),
        ("late", 5, 0.2, {"start": 0.5, "sparse_every": 4}, False),
        ("window", 1, 0.3, {"start": 0.25, "width": 0.25, "sparse_every": 0}, True),
        ("window", 1, 0.5, {"start": 0.25, "width": 0.25, "sparse_every": 0}, False),
        ("window", 1, 0.1, {"start": 0.25, "width": 0.25, "sparse_every": 0}, False),
        ("allreduce", 7, 0.77, {}, True),
        ("probability", 7, 0.77, {}, True),
    ],
)
def test_round_communicates(kind, round_index, progress, params, expected):
    assert round_communicates(kind, round_index, progress, params) is expected


def test_probability_coins_are_seeded_and_near_p():
    a = active_agents(1000, 7, 0.2, seed=3)
    assert np.array_equal(a, active_agents(1000, 7, 0.2, seed=3))
    assert not np.array_equal(a, active_agents(1000, 8, 0.2, seed=3))
    assert 0.16 < a.mean() < 0.24


def test_dpsgd_plan_on_a_ring_pulls_from_both_neighbours():
    W = build_topology("ring", 5).mixing()
    plan = plan_round(W, 0, whole_models=True)
    assert plan.senders_to(0) == [1, 4]
    assert plan.mixers == frozenset(range(5))
    self_w, row = plan.weights[0]
    assert self_w + sum(row.values()) == pytest.approx(1.0)


def test_dpsgd_random_peer_plan_is_row_stochastic_halves():
    W = build_topology("complete", 6).mixing()
    active = np.array([True, False, True, False, False, False])
    plan = plan_round(W, 4, whole_models=True, pull="random_peer", active=active, seed=1)
    assert plan.mixers == frozenset({0, 2})
    assert len(plan.edges) == 2
    for i in (0, 2):
        self_w, row = plan.weights[i]
        assert self_w == 0.5 and list(row.values()) == [0.5]


def test_choco_plan_pushes_from_active_agents_to_all_neighbours():
    W = build_topology("ring", 6).mixing()
    active = np.array([True, False, False, True, False, False])
    plan = plan_round(W, 0, whole_models=False, active=active)
    assert set(plan.edges) == {(0, 1), (0, 5), (3, 2), (3, 4)}
    assert plan.mixers == frozenset(range(6))
    assert plan.weights[1][1] == {0: pytest.approx(1 / 3), 2: pytest.approx(1 / 3)}


@pytest.mark.parametrize(
    "untils, progress, expected",
    [
        ([0.75, 0.8, 1.0], 0.01, 0),
        ([0.75, 0.8, 1.0], 0.7499, 0),
        ([0.75, 0.8, 1.0], 0.75, 1),  # a phase starts at the previous until
        ([0.75, 0.8, 1.0], 0.7999, 1),
        ([0.75, 0.8, 1.0], 0.8, 2),
        ([0.75, 0.8, 1.0], 1.0, 2),  # the last round ends at progress 1: the last phase
        ([1.0], 0.3, 0),
        ([1.0], 1.0, 0),
    ],
)
def test_phase_index(untils, progress, expected):
    assert phase_index(untils, progress) == expected


@pytest.mark.parametrize("n", [2, 5, 12, 16])
def test_allreduce_plan_pulls_everyone_with_weight_one_over_n(n):
    plan = allreduce_plan(n, 3)
    assert plan.round == 3 and plan.mixers == frozenset(range(n)) and len(plan.edges) == n * (n - 1)
    for i in range(n):
        assert plan.senders_to(i) == [j for j in range(n) if j != i]
        self_weight, row = plan.weights[i]
        assert self_weight == 1 / n and set(row.values()) == {1 / n} and len(row) == n - 1


@pytest.mark.parametrize("n, gamma", [(5, 1.0), (12, 1.0), (16, 1.0), (12, 0.3)])
def test_allreduce_with_dpsgd_gives_the_exact_average_at_gamma_one(n, gamma):
    rule = dpsgd(make_compressor("identity", [7]))
    xs = [torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    average = torch.stack(xs).mean(dim=0)
    plan = allreduce_plan(n, 0)
    out = []
    for i in range(n):
        state = rule.init(xs[i])
        for j in plan.senders_to(i):
            state = rule.absorb(state, xs[j], plan.weights[i][1][j])
        x, _ = rule.mix(xs[i].clone(), state, plan.weights[i][0], gamma)
        out.append(x)
    for i in range(n):
        torch.testing.assert_close(out[i], xs[i] + gamma * (average - xs[i]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("averaging_rate, extra, field, phrase", [
    ({"kind": "adaptive", "exponent": 0.0}, {}, "schedule.averaging_rate.exponent", "> 0"),
    ({"kind": "adaptive"}, {"eval": {"every": 0}}, "eval.every", "eval.every >= 1"),
    ({"kind": "adaptiv"}, {}, "schedule.averaging_rate.kind", "adaptive"),
])
def test_a_wrong_adaptive_averaging_rate_is_one_line_naming_its_field(averaging_rate, extra, field, phrase):
    from raygossip.validation import load_config
    from raygossip.errors import UserError

    with pytest.raises(UserError) as caught:
        load_config(base={"schedule": {"averaging_rate": averaging_rate}, **extra})
    assert caught.value.field == field and phrase in caught.value.message and "\n" not in str(caught.value)
