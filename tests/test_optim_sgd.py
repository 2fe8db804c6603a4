"""raygossip.optim.SGD against torch.optim.SGD: identical parameters, buffers and state dicts step by step."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from raygossip.optim import SGD, build_optimizer

LR = 0.1
CASES = [
    (momentum, nesterov, weight_decay)
    for momentum, nesterov, weight_decay in itertools.product((0.0, 0.5, 0.9), (False, True), (0.0, 1e-4, 5e-2))
    if not (nesterov and momentum == 0.0)
]


def loss_of(param: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient changes with the parameter (so momentum and weight decay both matter)."""
    return ((param - target) ** 2).sum() + torch.sin(param).pow(3).sum()


def pair(momentum: float, nesterov: bool, weight_decay: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(257, generator=gen)
    targets = torch.randn(12, 257, generator=gen)
    ours, ref = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt = build_optimizer("sgd", [ours], lr=LR, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    ref_opt = torch.optim.SGD([ref], lr=LR, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    return ours, opt, ref, ref_opt, targets


def step_both(ours, opt, ref, ref_opt, target: torch.Tensor, lr: float) -> None:
    for param, optimizer in ((ours, opt), (ref, ref_opt)):
        optimizer.param_groups[0]["lr"] = lr
        optimizer.zero_grad()
        loss_of(param, target).backward()
        optimizer.step()


@pytest.mark.parametrize("momentum,nesterov,weight_decay", CASES)
def test_sgd_matches_torch_bit_for_bit(momentum: float, nesterov: bool, weight_decay: float) -> None:
    ours, opt, ref, ref_opt, targets = pair(momentum, nesterov, weight_decay)
    assert isinstance(opt, SGD)
    for step, target in enumerate(targets):
        step_both(ours, opt, ref, ref_opt, target, LR * (0.1 if step >= 8 else 1.0))
        assert torch.equal(ours, ref), f"step {step}"
        state, ref_state = opt.state_dict()["state"], ref_opt.state_dict()["state"]
        assert set(state) == set(ref_state)
        for index, entry in ref_state.items():
            assert set(state[index]) == set(entry)
            assert all(torch.equal(state[index][k], v) for k, v in entry.items())


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.9, True, 5e-4), (0.9, False, 0.0), (0.0, False, 1e-4)])
def test_sgd_state_dict_round_trip_continues_identically(momentum: float, nesterov: bool, weight_decay: float) -> None:
    ours, opt, ref, ref_opt, targets = pair(momentum, nesterov, weight_decay, seed=1)
    for target in targets[:5]:
        step_both(ours, opt, ref, ref_opt, target, LR)
    # what AgentCore.snapshot()/restore() do: read state[0], write it back into a fresh optimizer's state_dict
    saved = {k: v.detach().clone() for k, v in opt.state_dict()["state"].get(0, {}).items()}
    resumed = nn.Parameter(ours.detach().clone())
    fresh = build_optimizer("sgd", [resumed], lr=LR, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if saved:
        state_dict = fresh.state_dict()
        state_dict["state"] = {0: saved}
        fresh.load_state_dict(state_dict)
    assert fresh.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    for target in targets[5:]:
        step_both(ours, opt, ref, ref_opt, target, LR)
        fresh.zero_grad()
        loss_of(resumed, target).backward()
        fresh.step()
        assert torch.equal(resumed, ref) and torch.equal(ours, ref)


def test_sgd_keeps_flat_gradient_views_with_zero_grad_in_place() -> None:
    param = nn.Parameter(torch.ones(4))
    param.grad = torch.full((4,), 2.0)
    view = param.grad[1:3]
    opt = SGD([param], lr=0.5)
    opt.step()
    assert torch.equal(param.detach(), torch.zeros(4))
    opt.zero_grad(set_to_none=False)
    assert param.grad is not None and view.data_ptr() == param.grad[1:].data_ptr() and not param.grad.any()
    opt.zero_grad()
    assert param.grad is None
    opt.step()  # no gradient: nothing changes
    assert torch.equal(param.detach(), torch.zeros(4)) and opt.state_dict()["state"] == {}
