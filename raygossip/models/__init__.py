"""Model zoo: an explicit name -> factory registry and build_model, which validates model params."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from raygossip.errors import UserError
from raygossip.registry import keyword_params
from raygossip.models.lenet import lenet5
from raygossip.models.mlp import mlp
from raygossip.models.mobilenet import mobilenetv2
from raygossip.models.norms import EvoNormS0
from raygossip.models.resnet import resnet18, resnet20
from raygossip.models.vgg import vgg11

# Each factory is f(num_classes, input_shape, *, <params>); its keyword-only arguments are the
# model's params, so the registry is the single source of what each model accepts.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "lenet5": lenet5,
    "resnet20": resnet20,
    "vgg11": vgg11,
    "mobilenetv2": mobilenetv2,
    "resnet18": resnet18,
}

__all__ = ["MODELS", "EvoNormS0", "allowed_params", "build_model", "has_batchnorm"]


def allowed_params(name: str) -> list[str]:
    """The param names model `name` accepts (its factory's keyword-only arguments), sorted."""
    return sorted(keyword_params(MODELS[name]))


def build_model(
    name: str, num_classes: int, input_shape: tuple[int, ...], params: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build model `name` for inputs of input_shape (no batch dim) giving (N, num_classes) logits.

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
