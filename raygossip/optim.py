"""Local optimizers (SGD, AdamW) and learning-rate schedules as plain step -> multiplier functions."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from raygossip.errors import UserError

LrSchedule = Callable[[int], float]


# ---------------------------------------------------------------- optimizers


class SGD:
    """SGD with torch.optim.SGD's arithmetic (dampening 0), as plain in-place tensor ops.

    Bit-for-bit the same updates as torch.optim.SGD's single-tensor path: weight decay added to the
    gradient, the momentum buffer a copy of the first gradient, then buf = momentum * buf + grad,
    Nesterov grad + momentum * buf, param -= lr * direction. It skips torch.optim's per-step
    bookkeeping and never imports torch._dynamo (which building the first torch.optim optimizer does,
    ~2 s of CPU in every fresh process). state_dict() / load_state_dict() / param_groups / zero_grad()
    have torch's shape: state[index of the param] = {"momentum_buffer": tensor} once a step with
    momentum ran.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        self.params = list(params)
        self.param_groups: list[dict[str, Any]] = [
            {"params": self.params, "lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
        ]
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """One update of every param that has a gradient."""
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        for index, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            if momentum != 0:
                state = self.state.setdefault(index, {})
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad)
                grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
            param.add_(grad, alpha=-lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim: drop the gradients (or zero them in place with set_to_none=False)."""
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """{"state": {param index: {"momentum_buffer": tensor}}, "param_groups": [hyperparameters, "params"]}."""
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(self.params)))}
                  for g in self.param_groups]
        return {"state": {index: dict(entry) for index, entry in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of state_dict(): buffers copied to each param's device and dtype, hyperparameters restored."""
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = {}
        for index, entry in state_dict["state"].items():
            param = self.params[int(index)]
            self.state[int(index)] = {
                k: v.to(device=param.device, dtype=param.dtype).clone() if torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in entry.items()
            }


def sgd(
    params: Iterable[torch.Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> SGD:
    """SGD (torch.optim.SGD's updates): heavy-ball or Nesterov momentum, L2 weight decay added to the gradient."""
    if nesterov and momentum <= 0.0:
        raise UserError("train.nesterov", "needs train.momentum > 0")
    return SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def adamw(
    params: Iterable[torch.Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """torch.optim.AdamW with decoupled weight decay; momentum and nesterov do not apply and are ignored."""
    del momentum, nesterov
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


Optimizer = SGD | torch.optim.Optimizer

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {"sgd": sgd, "adamw": adamw}


def build_optimizer(
    name: str,
    params: Iterable[torch.Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> Optimizer:
    """Optimizer `name` over params (usually one flat nn.Parameter: nothing assumes per-layer groups).

    Weight decay applies to every element, norm scales and biases included, as in the papers' code.
    """
    if name not in OPTIMIZERS:
        raise UserError("train.optimizer", f"unknown optimizer {name!r}; choose from {', '.join(sorted(OPTIMIZERS))}")
    if not _is_number(lr) or not lr > 0:
        raise UserError("train.lr", f"must be a positive number, got {lr!r}")
    if not _is_number(momentum) or not 0.0 <= momentum < 1.0:
        raise UserError("train.momentum", f"must be in [0, 1), got {momentum!r}")
    if not _is_number(weight_decay) or not weight_decay >= 0:
        raise UserError("train.weight_decay", f"must be a number >= 0, got {weight_decay!r}")
    return OPTIMIZERS[name](
        params, lr=float(lr), momentum=float(momentum), nesterov=bool(nesterov), weight_decay=float(weight_decay)
    )


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set the learning rate of every param group (base lr times the schedule's multiplier)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------- learning-rate schedules (multipliers)


def constant_schedule(total_steps: int, *, milestones: Sequence[float] = (), factor: float = 0.1) -> LrSchedule:
    """Multiplier 1 at every step."""
    del total_steps, milestones, factor
    return lambda _step: 1.0


def step_schedule(
    total_steps: int, *, milestones: Sequence[float] = (0.5, 0.75), factor: float = 0.1
) -> LrSchedule:
    """factor ** (milestones passed): milestone m is reached at step round(m * total_steps)."""
    marks = [round(m * total_steps) for m in milestones]
    return lambda step: float(factor ** sum(step >= mark for mark in marks))


def cosine_schedule(total_steps: int, *, milestones: Sequence[float] = (), factor: float = 0.1) -> LrSchedule:
    """0.5 * (1 + cos(pi * step / total_steps)): 1 at step 0, 0 at total_steps and after."""
    del milestones, factor
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(max(step, 0), total_steps) / total_steps))


LR_SCHEDULES: dict[str, Callable[..., LrSchedule]] = {
    "constant": constant_schedule,
    "step": step_schedule,
    "cosine": cosine_schedule,
}


def lr_schedule(
    kind: str,
    total_steps: int,
    *,
    milestones: Sequence[float] = (0.5, 0.75),
    factor: float = 0.1,
    warmup_steps: int = 0,
) -> LrSchedule:
    """The multiplier of the base lr at global step t (0-based), for `kind` over total_steps.

    With warmup_steps = w > 0 the multiplier first rises linearly from 0: t / w for t < w. The cosine
    then runs from 1 to 0 over the remaining total_steps - w steps; step milestones stay fractions
    of total_steps.
    """
    if kind not in LR_SCHEDULES:
        raise UserError(
            "train.lr_schedule.kind", f"unknown schedule {kind!r}; choose from {', '.join(sorted(LR_SCHEDULES))}"
        )
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise UserError("train.lr_schedule.total_steps", f"must be a positive integer, got {total_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
        raise UserError(
            "train.lr_schedule.warmup_steps", f"must be an integer in [0, {total_steps}), got {warmup_steps!r}"
        )
    marks = list(milestones)
    if not all(_is_number(m) and 0.0 < m <= 1.0 for m in marks) or marks != sorted(marks):
        raise UserError(
            "train.lr_schedule.milestones", f"must be increasing fractions of training in (0, 1], got {marks!r}"
        )
    if not _is_number(factor) or not factor > 0:
        raise UserError("train.lr_schedule.factor", f"must be a positive number, got {factor!r}")
    if kind == "cosine":
        decay = cosine_schedule(total_steps - warmup_steps)
        base = lambda step: decay(step - warmup_steps)  # noqa: E731  (cosine starts after warmup)
    else:
        base = LR_SCHEDULES[kind](total_steps, milestones=tuple(marks), factor=float(factor))
    if warmup_steps == 0:
        return base

    def warmed(step: int) -> float:
        return base(step) * (step / warmup_steps if step < warmup_steps else 1.0)

    return warmed


def run_lr_schedule(train: Any, total_steps: int) -> LrSchedule:
    """The learning-rate multiplier schedule a config's `train` section asks for, over a run of total_steps
    (every agent and every record use this one)."""
    spec = train.lr_schedule
    steps_per_epoch = max(1, total_steps // train.epochs)
    return lr_schedule(spec.kind, total_steps, milestones=spec.milestones, factor=spec.factor,
                       warmup_steps=int(spec.warmup_epochs * steps_per_epoch))
