"""One local step for the agents of one group as one stacked call: their models as one wide model.

Each agent keeps its own flat parameters, optimizer and data stream; only the forward and backward pass run
stacked. Linear layers become one batched matmul over [k, B, in] x [k, in, out]; a Conv2d becomes one grouped
convolution with the agents as groups (input [B, k*C, H, W] in channels-last order, weight [k*Cout, Cin, kh, kw]);
elementwise layers and pooling run as they are. A model that is not such a chain of layers falls back to
stepping its agents one by one, with a reason the engines put in the events once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .agent import AgentCore

POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)
BATCHED = (nn.Linear, nn.Conv2d, nn.Flatten, *POINTWISE, *POOLS)
PROBE_SEED = 20_251_201  # the probe's own inputs: no agent's random stream is touched


def layer_chain(model: nn.Module) -> list[nn.Module]:
    """The model's leaf modules in registration order (what its forward must apply in turn to be batched)."""
    return [m for m in model.modules() if next(m.children(), None) is None]


def why_not(model: nn.Module) -> str | None:
    """Why this model's agents cannot step together (None: they can, if its forward is its chain of layers)."""
    for module in layer_chain(model):
        name = type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"{name} keeps running statistics per agent"
        if isinstance(module, nn.modules.dropout._DropoutNd):
            return f"{name} draws its masks from the global random stream, agent after agent"
        if not isinstance(module, BATCHED):
            return f"{name} has no batched form"
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            return f"{name} with padding_mode {module.padding_mode!r} has no batched form"
        if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) != (1, -1):
            return "Flatten other than from dim 1 to the end has no batched form"
    owned = [p for module in layer_chain(model) for p in module.parameters(recurse=False)]
    if [id(p) for p in owned] != [id(p) for p in model.parameters()]:
        return "a module that is not a layer holds parameters"
    if next(model.buffers(), None) is not None:
        return "the model keeps buffers (per-agent state the stacked step does not carry)"
    return None


class StackedForward:
    """The forward pass of k copies of one chain model, each with its row of a stacked [k, P] parameter matrix.

    An activation is either stacked ([k, B, ...], agent first) or folded ([B, k*C, H, W], the agents' channels
    side by side, as a grouped convolution takes and gives them)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = layer_chain(model)
        self.shapes = [[tuple(p.shape) for p in layer.parameters(recurse=False)] for layer in self.layers]
        self.sizes = [p.numel() for layer in self.layers for p in layer.parameters(recurse=False)]

    def __call__(self, stacked: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits [k, B, classes] for inputs x [k, B, ...] (agent a's batch through agent a's parameters)."""
        k, batch = x.shape[0], x.shape[1]
        pieces = iter(stacked.split(self.sizes, dim=1))  # one split: its backward is one cat, not a sum per slice
        h, folded = x, False
        for layer, shapes in zip(self.layers, self.shapes):
            params = [next(pieces).view(k, *shape) for shape in shapes]
            if isinstance(layer, nn.Conv2d):
                if not folded:
                    h, folded = fold(h), True
                weight = params[0].reshape(k * layer.out_channels, *params[0].shape[2:])
                bias = params[1].reshape(-1) if layer.bias is not None else None
                h = F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups * k)
            elif isinstance(layer, nn.Linear):
                if folded:
                    h, folded = unfold(h, k), False
                flat = h.reshape(k, -1, h.shape[-1])
                weight = params[0].transpose(1, 2)
                out = torch.bmm(flat, weight) if layer.bias is None else torch.baddbmm(params[1].unsqueeze(1), flat, weight)
                h = out.view(*h.shape[:-1], layer.out_features)
            elif isinstance(layer, nn.Flatten):
                if folded:
                    h, folded = unfold(h, k), False
                h = h.reshape(k, batch, -1)
            elif isinstance(layer, POOLS) and not folded:
                h = layer(h.flatten(0, 1)).unflatten(0, (k, batch))
            else:  # pointwise, or a pool over folded channels (each channel on its own)
                h = layer(h)
        return (unfold(h, k) if folded else h).reshape(k, batch, -1)


def fold(h: torch.Tensor) -> torch.Tensor:
    """[k, B, C, H, W] -> [B, k*C, H, W] (channels-last: the fast layout of a grouped convolution on CPU)."""
    k, batch, channels, height, width = h.shape
    cl = h.permute(1, 3, 4, 0, 2).reshape(batch, height, width, k * channels).contiguous()
    return cl.permute(0, 3, 1, 2)


def unfold(h: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k*C, H, W] -> [k, B, C, H, W] (a view)."""
    channels = h.shape[1] // k
    return h.unflatten(1, (k, channels)).transpose(0, 1)


class BatchedSteps:
    """Takes one local step for several AgentCores of one model config at once (AgentCore.train_step's math).

    `reason` is None when the group steps stacked, else why it steps one by one (a `batched_steps_off` event)."""

    def __init__(self, cores: list[AgentCore]) -> None:
        self.cores = list(cores)
        self.forward: StackedForward | None = None
        self.reason = self._check()

    def _check(self) -> str | None:
        first = self.cores[0]
        if first.task.loss_name != "cross_entropy":
            return f"the loss is {first.task.loss_name} (stacked steps take cross_entropy only)"
        reason = why_not(first.model)
        if reason is not None:
            return reason
        if any(c.flat.segments != first.flat.segments or c.device != first.device for c in self.cores):
            return "the agents' models differ in shape or device"
        self.forward = StackedForward(first.model)
        if not self._probe():
            self.forward = None
            return "its forward is not the chain of its layers (the stacked forward gave other logits)"
        return None

    @torch.no_grad()
    def _probe(self) -> bool:
        """Whether the stacked forward gives every agent's own logits on a few inputs of its own."""
        first = self.cores[0]
        generator = torch.Generator().manual_seed(PROBE_SEED)
        shape = tuple(first.dataset.input_shape)
        x = torch.randn((len(self.cores), 2, *shape), generator=generator).to(first.device, first.flat.data.dtype)
        stacked = torch.stack([core.flat.data for core in self.cores])
        try:
            got = self.forward(stacked, x)
        except RuntimeError:  # shapes that do not chain
            return False
        want = torch.stack([core.model(x[a]) for a, core in enumerate(self.cores)])
        return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)

    def step(self, cores: list[AgentCore] | None = None) -> list[float]:
        """One local step of each of these cores (default: the whole group); returns their minibatch losses."""
        cores = self.cores if cores is None else cores
        if self.forward is None or len(cores) < 2:
            return [core.train_step() for core in cores]
        for core in cores:
            if not core.model.training:
                core.model.train()
        batches = [core.next_batch() for core in cores]
        x = torch.stack([b[0] for b in batches])
        y = torch.stack([b[1] for b in batches])
        train = cores[0].config.train
        stacked = torch.stack([core.flat.data for core in cores]).requires_grad_()
        logits = self.forward(stacked, x)
        smoothing, batch = train.label_smoothing, y.shape[1]
        total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum", label_smoothing=smoothing)
        (grads,) = torch.autograd.grad(total / batch, stacked)  # each agent's mean loss: its own gradient
        with torch.no_grad():  # each agent's loss as train_step takes it (the same sums)
            values = torch.stack([F.cross_entropy(out, target, label_smoothing=smoothing)
                                  for out, target in zip(logits, y)]).tolist()  # one device sync
        for core, grad, value in zip(cores, grads, values):
            for group in core.optimizer.param_groups:
                group["lr"] = train.lr * core.lr_multiplier(core.step)
            core.flat.param.grad.copy_(grad)
            if train.grad_clip_value is not None:
                core.flat.param.grad.clamp_(-train.grad_clip_value, train.grad_clip_value)
            core.optimizer.step()
            core.step += 1
            core.loss_sum += value
            core.loss_count += 1
        return values
