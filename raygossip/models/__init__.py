"""Model zoo and the model registry: name (or import path) -> factory, and build_model, which validates params."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from raygossip.errors import UserError
from raygossip.registry import Registry, keyword_params, one_line
from raygossip.models.lenet import lenet5
from raygossip.models.mlp import mlp
from raygossip.models.mobilenet import mobilenetv2
from raygossip.models.norms import EvoNormS0
from raygossip.models.resnet import resnet18, resnet20
from raygossip.models.vgg import vgg11

# Each zoo factory is f(num_classes, input_shape, *, <params>); its keyword-only arguments are the model's params,
# so the registry is the single source of what each model accepts. A user factory registered here (or named by
# `package.module:factory`) may instead take only its params: see takes_shape.
MODELS: Registry = Registry("model.name", "model")
register = MODELS.register
for _name, _factory in (("mlp", mlp), ("lenet5", lenet5), ("resnet20", resnet20), ("vgg11", vgg11),
                        ("mobilenetv2", mobilenetv2), ("resnet18", resnet18)):
    register(_name)(_factory)

__all__ = ["MODELS", "EvoNormS0", "allowed_params", "build_model", "call_factory", "has_batchnorm", "register",
           "takes_shape"]


def allowed_params(name: str) -> list[str]:
    """The param names model `name` accepts (its factory's keyword-only arguments), sorted."""
    return sorted(keyword_params(MODELS[name]))


def takes_shape(factory: Callable[..., nn.Module]) -> bool:
    """Whether a factory takes the data's num_classes and input_shape (as the zoo's do: by those parameter names, or
    as its first two positional parameters); else it is called with model.params alone."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: assume the zoo's convention
        return True
    names = {p.name for p in params}
    if {"num_classes", "input_shape"} <= names:
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(positional) >= 2


def call_factory(factory: Callable[..., nn.Module], num_classes: int | None, input_shape: tuple[int, ...] | None,
                 params: Mapping[str, Any], field: str = "model.name") -> nn.Module:
    """Call a user model factory as it wants to be called; anything it raises, or a result that is not an
    nn.Module, is one UserError(field)."""
    try:
        model = factory(num_classes, input_shape, **params) if takes_shape(factory) else factory(**params)
    except UserError:
        raise
    except Exception as err:  # the user's code failed: say so on one line
        raise UserError(field, f"the model factory raised {one_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(field, f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(
    name: str, num_classes: int, input_shape: tuple[int, ...], params: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build zoo model `name` for inputs of input_shape (no batch dim) giving (N, num_classes) logits.

    Initialisation draws from torch's global RNG, so it is deterministic under torch.manual_seed.
    """
    if name not in MODELS:
        raise UserError("model.name", f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError("model.num_classes", f"must be a positive integer, got {num_classes!r}")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise UserError("model.input_shape", f"must be positive integers (no batch dim), got {shape!r}")
    params = dict(params or {})
    allowed = allowed_params(name)
    for key in params:
        if key not in allowed:
            choices = ", ".join(allowed) if allowed else "none"
            raise UserError(f"model.{key}", f"unknown parameter for {name}; allowed: {choices}")
    return MODELS[name](num_classes, shape, **params)


def has_batchnorm(model: nn.Module) -> bool:
    """True when the model holds batch-norm layers (running statistics to re-estimate after a merge)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
