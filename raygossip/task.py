"""The task a run learns: loss and metric registries, and the user code of a run resolved into one record."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from raygossip.registry import Registry, is_import_path, reference_of

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]

LOSSES: Registry = Registry("train.loss", "loss")
METRICS: Registry = Registry("eval.metric", "metric")
register_loss = LOSSES.register


@register_loss("cross_entropy")
def cross_entropy(outputs: torch.Tensor, batch: Batch, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Classification: outputs (N, C) logits, targets (N,) class ids (train.label_smoothing applies)."""
    return F.cross_entropy(outputs, batch[1], label_smoothing=label_smoothing)


@register_loss("mse")
def mse(outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Regression: mean squared error between outputs and targets of the same number of elements."""
    target = batch[1]
    return F.mse_loss(outputs.reshape(target.shape).float(), target.float())


@register_loss("next_token")
def next_token(outputs: torch.Tensor, batch: Batch, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Language modelling: outputs (N, T, V) logits at each position, targets (N, T) the next token there."""
    return F.cross_entropy(outputs.flatten(0, -2), batch[1].flatten(), label_smoothing=label_smoothing)


@dataclass(frozen=True)
class Metric:
    """An evaluation metric: `fn(outputs, batch)` is the batch's mean value (averaged over batches weighted by their
    sizes) or a pair (total, count) summed over batches, `finish` maps that mean to the reported number, `direction` says which way is better (max or min)."""

    name: str
    fn: Callable[[torch.Tensor, Batch], Any]
    direction: str = "max"
    finish: Callable[[float], float] | None = None

    def value(self, mean: float) -> float:
        return float(self.finish(mean)) if self.finish is not None else float(mean)


def register_metric(name: str, direction: str = "max", finish: Callable[[float], float] | None = None):
    """Decorator: make `fn(outputs, batch) -> batch mean` the metric `name` (direction: max or min is better)."""
    def add(fn):
        METRICS.register(name)(Metric(name, fn, direction, finish))
        return fn
    return add


def _accuracy(outputs: torch.Tensor, batch: Batch) -> tuple[int, int]:
    """Top-1 accuracy as (correct, samples), so the mean over a test set is exact."""
    return int((outputs.argmax(dim=-1) == batch[1]).sum()), int(batch[1].numel())


def _token_nll(outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(outputs.flatten(0, -2).float(), batch[1].flatten())


def _exp(mean: float) -> float:
    return math.exp(min(mean, 700.0))


register_metric("accuracy", "max")(_accuracy)
register_metric("mse", "min")(mse)
register_metric("perplexity", "min", finish=_exp)(_token_nll)


def as_metric(obj: Any, name: str | None = None) -> Metric:
    """A Metric from a Metric or a plain function `f(outputs, batch) -> batch mean` (its `direction` attribute,
    max or min, says which way is better; max when it has none)."""
    if isinstance(obj, Metric):
        return obj
    direction = getattr(obj, "direction", "max")
    return Metric(name or getattr(obj, "__name__", "metric"), obj, direction)


@dataclass(frozen=True)
class Task:
    """A run's user code resolved once in the driver: the model factory (and whether it takes num_classes and
    input_shape), the data loader, the loss and the metric. Ray ships it to the actors (cloudpickle: a function
    of an importable module by reference, one of __main__ by value)."""

    model: Callable[..., torch.nn.Module]
    zoo_model: bool
    loader: Callable[..., Any] | None
    zoo_data: bool
    loss: LossFn
    loss_name: str
    metric: Metric

    def modules(self) -> list[str]:
        """The modules an actor must import to rebuild this task: those of user code outside raygossip, less what
        cloudpickle sends by value (functions of __main__, closures)."""
        found = set()
        for obj in (self.model, self.loader, self.loss, self.metric.fn, self.metric.finish):
            obj = getattr(obj, "func", obj)  # a partial's function
            module = getattr(obj, "__module__", None)
            by_value = "<locals>" in getattr(obj, "__qualname__", "")  # cloudpickle sends a closure itself
            if module and not by_value and module != "__main__" and not module.startswith(("raygossip", "torch",
                                                                                             "builtins")):
                found.add(module)
        return sorted(found)


def metric_name(ref: Any) -> str:
    """The name a metric reference gives its records' keys: the registered name, or the function's own name."""
    if isinstance(ref, Metric):
        return ref.name
    if isinstance(ref, str):
        return ref.split(":")[-1].split(".")[-1] if is_import_path(ref) else ref
    return getattr(ref, "__name__", None) or reference_of(ref).split(":")[-1]
