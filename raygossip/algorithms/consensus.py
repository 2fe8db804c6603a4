"""Consensus rules (D-PSGD with an averaging rate, CHOCO-SGD, AdaGossip) as small init/emit/absorb/mix functions.

A rule never sees the transport: an agent asks `emit` for what to put on the wire after its local
steps, feeds each neighbour's decoded message to `absorb` with the mixing weight W_ij, and calls
`mix` to take the consensus step. State tensors are updated in place (TorchOpt's `inplace`
style, so the hot path does not allocate) and also returned, so callers can treat the functions
as pure transformations of an explicit state record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from ..algorithms.compressors import Compressed, Compressor
from ..errors import UserError

Tensor = torch.Tensor


@dataclass
class DpsgdState:
    """D-PSGD: the weighted sum of the neighbour models received this round, and its total weight."""

    acc: Tensor
    acc_weight: float = 0.0
    rounds: int = 0  # communication rounds (mix calls) so far

    def tensors(self) -> dict[str, Tensor]:
        """The state's tensors by name (for checkpoints and equality checks)."""
        return {"acc": self.acc}


@dataclass
class CompressedGossipState:
    """CHOCO-SGD and AdaGossip: the public copy x_hat, s = sum_j W_ij x_hat_j, and AdaGossip's second moment u."""

    x_hat: Tensor
    s: Tensor
    u: Tensor | None = None
    rounds: int = 0

    def tensors(self) -> dict[str, Tensor]:
        names = ("x_hat", "s", "u")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


RuleState = DpsgdState | CompressedGossipState


class StepSize(NamedTuple):
    """How the consensus step scales the gossip error r: a scalar gamma or a per-element vector."""

    init: Callable[[Tensor, RuleState], RuleState]
    scale: Callable[[Tensor, RuleState, float], tuple[Tensor | float, RuleState]]


def fixed_step() -> StepSize:
    """CHOCO-SGD: x <- x + gamma * r."""
    return StepSize(init=lambda x, state: state, scale=lambda r, state, gamma: (gamma, state))


def rms_scaled_step(beta: float = 0.999, eps: float = 1e-8, cap: float = 1.0) -> StepSize:
    """AdaGossip: u <- beta u + (1-beta) r^2; gamma_i = min(cap, gamma / (sqrt(u / (1-beta^t)) + eps))."""

    def init(x: Tensor, state: RuleState) -> RuleState:
        state.u = torch.zeros_like(x)
        return state

    def scale(r: Tensor, state: RuleState, gamma: float) -> tuple[Tensor, RuleState]:
        state.u.mul_(beta).addcmul_(r, r, value=1.0 - beta)
        correction = 1.0 - beta**state.rounds
        denominator = (state.u / correction).sqrt_().add_(eps)
        return torch.clamp(gamma / denominator, max=cap), state

    return StepSize(init=init, scale=scale)


class GossipRule(NamedTuple):
    """A consensus rule: the functions an agent calls each communication round, and what the runtime must know.

    whole_models: a message is the sender's whole model (D-PSGD), so of several letters from one sender only
    the newest counts, a sender with nothing new may count with its last model (bounded/async), and after a
    restart a round mark is all a neighbour needs. Otherwise messages are differences that must each be
    applied exactly once, in order, and a neighbour that lost track of a sender needs its whole public copy:
    `resync(state, delta, weight)` adds weight * delta (what the receiver did not know of the sender's public
    copy) and `drop(state, known, weight)` removes a sender's known contribution for good. Rules with public
    copies need a graph that is static between timeline events; at one, the same two hooks re-weight, drop and
    open links (core.graph_links.GraphChanges.step)."""

    name: str
    init: Callable[[Tensor], RuleState]
    emit: Callable[[Tensor, RuleState, torch.Generator | None], tuple[Compressed, RuleState]]
    absorb: Callable[[RuleState, Tensor, float], RuleState]
    mix: Callable[[Tensor, RuleState, float, float], tuple[Tensor, RuleState]]
    compressor: Compressor
    whole_models: bool = False
    resync: Callable[[RuleState, Tensor, float], RuleState] | None = None
    drop: Callable[[RuleState, Tensor, float], RuleState] | None = None

    @property
    def public_copies(self) -> bool:
        """Whether neighbours keep this rule's public copies (and a lost link is resynchronised by a full copy)."""
        return self.resync is not None

    def public_copy(self, state: RuleState) -> Tensor:
        """The agent's whole public copy x_hat (what a neighbour that lost track of it needs)."""
        return state.x_hat.detach().clone()


def dpsgd(compressor: Compressor) -> GossipRule:
    """D-PSGD with an averaging rate: x <- x_half + gamma (sum_j W_ij x_j_half - x_half).

    Weights are renormalised over the messages that arrived, so a round with missing neighbours
    (asynchronous mode, dropped agents) still averages with a stochastic row.
    """

    def init(x: Tensor) -> DpsgdState:
        return DpsgdState(acc=torch.zeros_like(x))

    def emit(x_half: Tensor, state: RuleState, generator: torch.Generator | None):
        return compressor.compress(x_half, generator), state

    def absorb(state: RuleState, neighbour_params: Tensor, weight: float) -> RuleState:
        state.acc.add_(neighbour_params, alpha=weight)
        state.acc_weight += weight
        return state

    def mix(x_half: Tensor, state: RuleState, self_weight: float, gamma: float):
        state.rounds += 1
        total = self_weight + state.acc_weight
        if state.acc_weight > 0.0:
            average = state.acc.add_(x_half, alpha=self_weight).div_(total)
            x_half = x_half.add_(average.sub_(x_half), alpha=gamma)
        state.acc.zero_()
        state.acc_weight = 0.0
        return x_half, state

    return GossipRule("dpsgd", init, emit, absorb, mix, compressor, whole_models=True)


def compressed_gossip(name: str, compressor: Compressor, step: StepSize) -> GossipRule:
    """CHOCO-SGD's bookkeeping with a pluggable step size (fixed: CHOCO-SGD, rms-scaled: AdaGossip).

    q = C(x_half - x_hat); x_hat += q; neighbours do s += W_ji q;
    r = s + W_ii x_hat - x_hat; x = x_half + step(r) * r.
    """

    def init(x: Tensor) -> RuleState:
        return step.init(x, CompressedGossipState(x_hat=torch.zeros_like(x), s=torch.zeros_like(x)))

    def emit(x_half: Tensor, state: RuleState, generator: torch.Generator | None):
        message = compressor.compress(x_half - state.x_hat, generator)
        state.x_hat.add_(compressor.decompress(message))
        return message, state

    def absorb(state: RuleState, q_neighbour: Tensor, weight: float) -> RuleState:
        state.s.add_(q_neighbour, alpha=weight)
        return state

    def mix(x_half: Tensor, state: RuleState, self_weight: float, gamma: float):
        state.rounds += 1
        residual = state.s + (self_weight - 1.0) * state.x_hat
        step_size, state = step.scale(residual, state, gamma)
        if isinstance(step_size, Tensor):
            x_half.addcmul_(step_size, residual)
        else:
            x_half.add_(residual, alpha=step_size)
        return x_half, state

    def resync(state: RuleState, delta: Tensor, weight: float) -> RuleState:
        state.s.add_(delta, alpha=weight)
        return state

    def drop(state: RuleState, known: Tensor, weight: float) -> RuleState:
        state.s.sub_(known, alpha=weight)
        return state

    return GossipRule(name, init, emit, absorb, mix, compressor, resync=resync, drop=drop)


def choco(compressor: Compressor) -> GossipRule:
    return compressed_gossip("choco", compressor, fixed_step())


def adagossip(compressor: Compressor, beta: float = 0.999, eps: float = 1e-8) -> GossipRule:
    return compressed_gossip("adagossip", compressor, rms_scaled_step(beta=beta, eps=eps))


class RuleEntry(NamedTuple):
    """A rule in the registry: its factory, and what plans and checks must know of it before any agent builds one."""

    build: Callable[..., GossipRule]
    whole_models: bool  # its messages are whole models (GossipRule.whole_models): a receiver pulls from the senders
    # of a round and mixes over what arrived, so any graph will do (time-varying, random peers, an all-reduce);
    # otherwise differences to public copies, which need the fixed W of a static graph


RULES: dict[str, RuleEntry] = {
    "dpsgd": RuleEntry(dpsgd, whole_models=True),
    "choco": RuleEntry(choco, whole_models=False),
    "adagossip": RuleEntry(adagossip, whole_models=False),
}


# What a receiver does when one of a sender's messages is lost (rules with public copies; a whole-model rule's next
# message replaces the lost one anyway): ask the sender for its whole public copy, or live with the gap (a lossy link
# without retransmission, for studies of it).
RECOVERIES: tuple[str, ...] = ("resync", "none")


def sends_whole_models(name: str) -> bool:
    """Whether the rule called `name` sends whole models (RuleEntry.whole_models)."""
    return RULES[name].whole_models


def make_rule(name: str, compressor: Compressor, *, beta: float = 0.999) -> GossipRule:
    if name not in RULES:
        raise UserError("gossip.rule", f"unknown rule {name!r} (allowed: {', '.join(RULES)})")
    if name == "adagossip":
        return adagossip(compressor, beta=beta)
    return RULES[name].build(compressor)
