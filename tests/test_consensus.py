"""Consensus rules on hand-made tensors: contraction rates, CHOCO(identity) == D-PSGD, AdaGossip's formula."""

import math

import pytest
import torch

from raygossip.algorithms.compressors import make_compressor
from raygossip.algorithms.consensus import adagossip, choco, dpsgd, make_rule
from raygossip.algorithms.merge import consensus_distance, global_average
from raygossip.algorithms.spectral import spectral_report
from raygossip.algorithms.topology import build_topology
from raygossip.errors import UserError


def gossip_round(rule, xs, states, W, gamma, generator=None):
    """One synchronous round of any rule over all agents (the reference engine's inner loop)."""
    n = len(xs)
    messages = []
    for i in range(n):
        message, states[i] = rule.emit(xs[i], states[i], generator)
        messages.append(rule.compressor.decompress(message))
    for i in range(n):
        for j in range(n):
            if j != i and W[i, j] > 0:
                states[i] = rule.absorb(states[i], messages[j], float(W[i, j]))
    for i in range(n):
        xs[i], states[i] = rule.mix(xs[i], states[i], float(W[i, i]), gamma)
    return xs, states


@pytest.mark.parametrize("name, n, params", [("ring", 16, {}), ("circulant", 16, {"offsets": [1, 4]}), ("dyck", 32, {})])
def test_pure_gossip_contracts_at_lambda2_squared(name, n, params):
    topo = build_topology(name, n, "uniform", params)
    W = topo.mixing()
    lam = spectral_report(topo)["lambda2"]
    rule = dpsgd(make_compressor("identity", [20]))
    torch.manual_seed(0)
    xs = [torch.randn(20, dtype=torch.float64) for _ in range(n)]
    states = [rule.init(x) for x in xs]
    distances = [consensus_distance(xs)]
    rounds = min(150, int(math.log(1e-20) / (2 * math.log(lam))))  # stay far above float64's floor
    for _ in range(rounds):
        xs, states = gossip_round(rule, xs, states, W, 1.0)
        distances.append(consensus_distance(xs))
    # the bound holds at every round (W symmetric): d_t <= lambda2^(2t) d_0
    for t, d in enumerate(distances):
        assert d <= lam ** (2 * t) * distances[0] * (1 + 1e-9)
    # and asymptotically the per-round ratio is lambda2^2
    ratio = distances[-1] / distances[-2]
    assert ratio == pytest.approx(lam**2, rel=2e-2)
    # the average is preserved exactly by doubly stochastic mixing
    assert torch.allclose(global_average(xs), global_average([x for x in xs]))


def test_gamma_scales_the_step():
    W = build_topology("ring", 4).mixing()
    rule = dpsgd(make_compressor("identity", [3]))
    xs = [torch.full((3,), float(i), dtype=torch.float64) for i in range(4)]
    expected = [x + 0.3 * (sum(W[i, j] * xs[j] for j in range(4)) - x) for i, x in enumerate(xs)]
    states = [rule.init(x) for x in xs]
    xs, _ = gossip_round(rule, [x.clone() for x in xs], states, W, 0.3)
    for got, want in zip(xs, expected):
        assert torch.allclose(got, want)


def test_choco_identity_equals_dpsgd_step_for_step():
    n, d = 8, 30
    W = build_topology("ring", n).mixing()
    comp = make_compressor("identity", [d])
    torch.manual_seed(1)
    start = [torch.randn(d, dtype=torch.float64) for _ in range(n)]
    runs = {}
    for rule in (dpsgd(comp), choco(comp)):
        xs = [x.clone() for x in start]
        states = [rule.init(x) for x in xs]
        noise = torch.Generator().manual_seed(5)
        trajectory = []
        for _ in range(25):
            xs = [x - 0.1 * torch.randn(d, generator=noise, dtype=torch.float64) for x in xs]  # a "local step"
            xs, states = gossip_round(rule, xs, states, W, 0.7)
            trajectory.append(torch.stack(xs).clone())
        runs[rule.name] = trajectory
    for a, b in zip(runs["dpsgd"], runs["choco"]):
        assert torch.allclose(a, b, atol=1e-12)


def test_choco_keeps_s_equal_to_weighted_public_copies():
    n, d = 6, 40
    W = build_topology("ring", n).mixing()
    rule = choco(make_compressor("top_k", [d], ratio=0.1))
    torch.manual_seed(2)
    xs = [torch.randn(d) for _ in range(n)]
    states = [rule.init(x) for x in xs]
    for _ in range(10):
        xs, states = gossip_round(rule, xs, states, W, 0.5)
    for i in range(n):
        expected = sum(float(W[i, j]) * states[j].x_hat for j in range(n) if j != i and W[i, j] > 0)
        assert torch.allclose(states[i].s, expected, atol=1e-5)


def test_choco_with_compression_still_reaches_consensus():
    n, d = 8, 50
    W = build_topology("ring", n).mixing()
    rule = choco(make_compressor("top_k", [d], ratio=0.2))
    torch.manual_seed(3)
    xs = [torch.randn(d, dtype=torch.float64) for _ in range(n)]
    mean = global_average(xs)
    states = [rule.init(x) for x in xs]
    before = consensus_distance(xs)
    for _ in range(400):
        xs, states = gossip_round(rule, xs, states, W, 0.3)
    assert consensus_distance(xs) < 1e-3 * before
    assert torch.allclose(global_average(xs), mean, atol=1e-8)


def test_adagossip_step_equals_formula_on_hand_made_tensors():
    beta, gamma = 0.9, 0.5
    rule = adagossip(make_compressor("identity", [3]), beta=beta)
    x_half = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    state = rule.init(x_half)
    state.x_hat = torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64)
    state.s = torch.tensor([0.2, 0.1, -0.3], dtype=torch.float64)
    state.u = torch.tensor([0.01, 0.0, 4.0], dtype=torch.float64)
    state.rounds = 2
    w_self = 0.25
    r = state.s + w_self * state.x_hat - state.x_hat
    u = beta * torch.tensor([0.01, 0.0, 4.0], dtype=torch.float64) + (1 - beta) * r**2
    t = 3
    step = torch.clamp(gamma / (torch.sqrt(u / (1 - beta**t)) + 1e-8), max=1.0)
    expected = x_half + step * r
    got, state = rule.mix(x_half.clone(), state, w_self, gamma)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(state.u, u)
    assert state.rounds == 3
    assert step[0] == 1.0 and step[2] < 0.2  # the cap and the adaptive scaling both matter in this table


def test_adagossip_first_round_uses_bias_correction():
    rule = adagossip(make_compressor("identity", [2]), beta=0.999)
    x = torch.zeros(2, dtype=torch.float64)
    state = rule.init(x)
    state.s = torch.tensor([0.3, 1e-12], dtype=torch.float64)
    got, state = rule.mix(x.clone(), state, 1.0, 0.01)
    # t = 1: u/(1-beta) = r^2, so gamma_i = gamma / |r_i| (capped at 1)
    assert got[0].item() == pytest.approx(0.01 / (0.3 + 1e-8) * 0.3)
    assert got[1].item() == pytest.approx(1.0 * 1e-12)


def test_dpsgd_renormalises_when_messages_are_missing():
    rule = dpsgd(make_compressor("identity", [1]))
    x = torch.tensor([0.0], dtype=torch.float64)
    state = rule.init(x)
    state = rule.absorb(state, torch.tensor([3.0], dtype=torch.float64), 1 / 3)  # one of two neighbours arrived
    got, state = rule.mix(x.clone(), state, 1 / 3, 1.0)
    assert got.item() == pytest.approx(1.5)
    assert state.acc_weight == 0.0 and state.acc.abs().sum() == 0


def test_unknown_rule_is_a_user_error():
    with pytest.raises(UserError, match="gossip.rule"):
        make_rule("gossipy", make_compressor("identity", [1]))
