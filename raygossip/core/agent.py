"""One agent's state and logic: model on a flat buffer, optimizer, rule state, data stream. No transport."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..algorithms.compressors import Compressed, make_compressor
from ..algorithms.consensus import GossipRule, RuleState, make_rule
from ..config import Config
from ..core.flat import FlatParameters
from .timeline import changes_graph
from ..data.datasets import Dataset, augment_batch
from ..models import build_model, call_factory
from ..task import METRICS, Metric, Task
from ..optim import build_optimizer, run_lr_schedule


def model_params(config: Config) -> dict:
    """The model section's set fields, as keyword parameters for the model factory."""
    spec = config.model
    fields = {"norm": spec.norm, "width": spec.width, "hidden": spec.hidden, "groups": spec.groups}
    return {key: value for key, value in fields.items() if value is not None}


def make_model(config: Config, dataset: Dataset, task: Task | None = None) -> nn.Module:
    """The model every agent starts from: identical on all agents for a seed. A zoo model is built by name with its
    checked params; a user's factory (task.model) is called with model.params (and num_classes, input_shape when it
    takes them). Without a task, the one the config names."""
    if task is None:
        from ..usercode import task_of

        task = task_of(config)
    torch.manual_seed(config.seed)
    if task.zoo_model:
        return build_model(config.model.name, dataset.num_classes, dataset.input_shape, model_params(config))
    return call_factory(task.model, dataset.num_classes, dataset.input_shape, config.model.params)


@dataclass
class Traffic:
    """Bytes and messages this agent sent, in total and per receiving neighbour."""

    bytes_sent: int = 0
    messages_sent: int = 0
    per_link: dict[int, int] = field(default_factory=dict)
    per_link_messages: dict[int, int] = field(default_factory=dict)

    def record(self, receivers: list[int], nbytes: int) -> None:
        for receiver in receivers:
            self.bytes_sent += nbytes
            self.messages_sent += 1
            self.per_link[receiver] = self.per_link.get(receiver, 0) + nbytes
            self.per_link_messages[receiver] = self.per_link_messages.get(receiver, 0) + 1


def heals_losses(config: Config) -> bool:
    """Whether a lost message may be healed by a resync in this run: messages are dropped (faults.drop_messages or a
    timeline link's loss) and a recovery of resync may be in force (faults.recovery, a link event's recovery)."""
    faults = config.faults
    if faults.drop_messages > 0 and faults.recovery == "resync":
        return True
    links = [event for event in config.timeline if event.action == "link"]
    return any((event.loss or 0) > 0 for event in links) and any(event.recovery != "none" for event in links)


class AgentCore:
    """Everything one agent computes. Engines call: train_step, emit, absorb, mix, evaluate."""

    def __init__(
        self,
        agent_id: int,
        config: Config,
        dataset: Dataset,
        shard: np.ndarray,
        total_steps: int,
        device: str | torch.device = "cpu",
        track_links: bool = False,
        task: Task | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.config = config
        self.dataset = dataset
        self.device = torch.device(device)
        self.shard = torch.as_tensor(np.asarray(shard, dtype=np.int64))
        if task is None:
            from ..usercode import task_of

            task = task_of(config)
        self.task = task
        self.model = make_model(config, dataset, task).to(self.device)
        self.flat = FlatParameters(self.model)
        train = config.train
        self.optimizer = build_optimizer(
            train.optimizer, [self.flat.param], lr=train.lr, momentum=train.momentum,
            nesterov=train.nesterov, weight_decay=train.weight_decay,
        )
        self.lr_multiplier = run_lr_schedule(train, total_steps)
        spec = config.gossip.compressor
        compressor = make_compressor(
            spec.name, self.flat.segments, ratio=spec.ratio, bits=spec.bits, scope=spec.scope, scaled=spec.scaled,
            index_coding=spec.index_coding, count=spec.count,
        )
        self.rule: GossipRule = make_rule(config.gossip.rule, compressor, beta=config.gossip.beta)
        self.state: RuleState = self.rule.init(self.flat.data)
        base_seed = config.seed * 1_000_003 + agent_id
        self.data_generator = torch.Generator().manual_seed(base_seed)
        self.wire_generator = torch.Generator(device=self.device).manual_seed(base_seed + 7919)
        self.order = torch.empty(0, dtype=torch.int64)
        self.cursor = 0
        self.step = 0
        self.traffic = Traffic()
        self.loss_sum = 0.0
        self.loss_count = 0
        # CHOCO/AdaGossip: each neighbour's public copy x_hat_j as this agent knows it (the sum of what it
        # absorbed from j), so that a link can be resynchronised or dropped after a failure; s stays the
        # weighted sum of these. Costs one parameter vector per neighbour, so only engines that survive
        # failures ask for it.
        # A timeline that changes the graph needs them too (links are re-weighted, dropped and opened).
        # A receiver that asks for a resync after a lost message too (core.inbox.Inbox.lost).
        track_links = track_links or changes_graph(config.timeline) or heals_losses(config)
        self.link_copies: dict[int, torch.Tensor] | None = {} if track_links and self.rule.public_copies else None

    # ------------------------------------------------------------ local training

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next minibatch of this agent's shard, reshuffled every pass.

        With data.partition.resample (kind preference) every minibatch is drawn afresh from the agent's class
        preference over the whole training set instead (less the eval.validation_fraction held out): batch number
        `cursor`, a pure function of (seed, agent, cursor), so a restored snapshot continues the same stream.
        """
        size = self.config.train.batch_size
        spec = self.config.data.partition
        if spec.kind == "preference" and spec.resample:
            from ..data.partition import agent_preference, holdout_split, resample_batch

            if getattr(self, "_preference", None) is None:  # derived once from the labels and the seed
                labels, n, seed = self.dataset.train.labels, self.config.agents.count, self.config.seed
                pool = None  # the whole training set
                if self.config.eval.validation_fraction > 0:
                    pool = holdout_split(labels.size, self.config.eval.validation_fraction, seed)[0]
                    labels = labels[pool]
                self._preference = (*agent_preference(labels, n, seed, spec.alpha, self.agent_id), pool)
            pools, preference, pool = self._preference
            drawn = resample_batch(pools, preference, size, self.config.seed, self.agent_id, self.cursor)
            index = torch.from_numpy(drawn if pool is None else pool[drawn])
            self.cursor += 1
        else:
            if self.cursor + size > len(self.order):
                self.order = self.shard[torch.randperm(len(self.shard), generator=self.data_generator)]
                self.cursor = 0
            index = self.order[self.cursor : self.cursor + size]
            self.cursor += size
        x, y = self.dataset.train.batch(index)
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        augment = self.config.data.augment
        if self.dataset.augment if augment is None else augment:
            x = augment_batch(x, self.data_generator)
        return x, y

    def train_step(self) -> float:
        """One local optimizer step; returns the minibatch loss."""
        if not self.model.training:  # train() walks every module (~50 us for LeNet-5): only after an eval
            self.model.train()
        batch = self.next_batch()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.train.lr * self.lr_multiplier(self.step)
        train = self.config.train
        loss = self.task.loss(self.model(batch[0]), batch)
        self.flat.zero_grad()
        loss.backward()
        if train.grad_clip_value is not None:  # per element, as the single-merge code's clamp_(-v, v)
            self.flat.param.grad.clamp_(-train.grad_clip_value, train.grad_clip_value)
        self.optimizer.step()
        self.step += 1
        value = float(loss.detach())
        self.loss_sum += value
        self.loss_count += 1
        return value

    def take_mean_loss(self) -> float:
        """Mean training loss since the last call (and reset)."""
        mean = self.loss_sum / max(1, self.loss_count)
        self.loss_sum, self.loss_count = 0.0, 0
        return mean

    # ------------------------------------------------------------ gossip

    def emit(self, receivers: list[int]) -> Compressed:
        """This round's outgoing message (computed once, sent to every receiver)."""
        message, self.state = self.rule.emit(self.flat.data, self.state, self.wire_generator)
        self.traffic.record(receivers, message.nbytes)
        return message

    def absorb(self, message: Compressed, weight: float, sender: int | None = None) -> None:
        """Feed one neighbour's message, with mixing weight W_ij, to the rule (and to the copy of that neighbour's
        public copy when links are tracked)."""
        dense = self.rule.compressor.decompress(message).to(self.flat.data.dtype)
        self.state = self.rule.absorb(self.state, dense, weight)
        if self.link_copies is not None and sender is not None:
            copy = self.link_copies.get(sender)
            if copy is None:
                self.link_copies[sender] = dense.clone()
            else:
                copy.add_(dense)

    # ------------------------------------------------------------ links after failures (CHOCO/AdaGossip)

    def public_copy(self) -> torch.Tensor:
        """This agent's full public copy x_hat (what a neighbour that lost track of it needs)."""
        return self.rule.public_copy(self.state)

    def resync_link(self, sender: int, public_copy: torch.Tensor, weight: float) -> bool:
        """Replace neighbour `sender`'s contribution to s by its full public copy: s += W_ij (x_hat_j - known). False
        (nothing done) when this agent keeps no copies of its neighbours' public copies."""
        if self.link_copies is None:
            return False
        public_copy = public_copy.to(self.flat.data.device, self.flat.data.dtype)
        known = self.link_copies.get(sender)
        delta = public_copy if known is None else public_copy - known
        self.state = self.rule.resync(self.state, delta, weight)
        self.link_copies[sender] = public_copy.clone()
        return True

    def drop_link(self, sender: int, weight: float) -> None:
        """Forget neighbour `sender` for good: remove its contribution W_ij x_hat_j from s (if it is known)."""
        known = self.link_copies.pop(sender, None) if self.link_copies is not None else None
        if known is not None:
            self.state = self.rule.drop(self.state, known, weight)

    @property
    def tracks_links(self) -> bool:
        """Whether this agent keeps each neighbour's public copy as it knows it (so a link can be resynchronised)."""
        return self.link_copies is not None

    def known_copies(self) -> dict[int, torch.Tensor]:
        """Each neighbour's public copy as this agent knows it (empty when it keeps none)."""
        return dict(self.link_copies or {})

    def start_afresh(self) -> None:
        """Fresh optimizer and rule state, as a new device (a timeline's join): s is zero again, so no neighbour's
        public copy is known."""
        self.optimizer.state.clear()
        self.state = self.rule.init(self.flat.data)
        if self.link_copies is not None:
            self.link_copies = {}

    def reweight_link(self, sender: int, old: float, new: float) -> None:
        """Neighbour `sender`'s weight in s changes from `old` to `new` (a timeline changed the graph): s += (new - old)
        x_hat_j as known; new 0 forgets the link (drop_link), old 0 adds nothing (its link letter brings x_hat_j)."""
        if new == 0.0:
            self.drop_link(sender, old)
            return
        known = self.link_copies.get(sender)
        if old > 0.0 and known is not None:
            self.state = self.rule.resync(self.state, known, new - old)

    def mix(self, self_weight: float, gamma: float) -> None:
        """The consensus step of this round, with self weight W_ii and averaging rate gamma."""
        with torch.no_grad():
            _, self.state = self.rule.mix(self.flat.data, self.state, self_weight, gamma)

    # ------------------------------------------------------------ snapshots (checkpoint, restart)

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything needed to continue exactly: tensors (for safetensors) and JSON-able scalars."""
        tensors = {"params": self.flat.data, "order": self.order,
                   "rng.data": self.data_generator.get_state(), "rng.wire": self.wire_generator.get_state()}
        tensors.update({f"buffer.{k}": v for k, v in self.model.named_buffers()})
        tensors.update({f"rule.{k}": v for k, v in self.state.tensors().items()})
        tensors.update({f"link.{j}": v for j, v in (self.link_copies or {}).items()})
        optimizer_state = self.optimizer.state_dict()
        scalars = {}
        for key, value in optimizer_state["state"].get(0, {}).items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"optim.{key}"] = value
            else:
                scalars[key] = float(value)
        meta = {
            "agent": self.agent_id, "step": self.step, "cursor": self.cursor, "optim_scalars": scalars,
            "rule_rounds": self.state.rounds, "rule_acc_weight": getattr(self.state, "acc_weight", 0.0),
            "traffic": {"bytes_sent": self.traffic.bytes_sent, "messages_sent": self.traffic.messages_sent,
                        "per_link": {str(k): v for k, v in self.traffic.per_link.items()},
                        "per_link_messages": {str(k): v for k, v in self.traffic.per_link_messages.items()}},
            "loss_sum": self.loss_sum, "loss_count": self.loss_count,
        }
        return {k: v.detach().cpu().clone() for k, v in tensors.items()}, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Inverse of snapshot(): continue as if never interrupted."""
        with torch.no_grad():
            self.flat.data.copy_(tensors["params"].to(self.device))
        self.load_buffers({k[len("buffer."):]: v for k, v in tensors.items() if k.startswith("buffer.")})
        for name in self.state.tensors():
            getattr(self.state, name).copy_(tensors[f"rule.{name}"].to(self.device))
        self.state.rounds = int(meta["rule_rounds"])
        if hasattr(self.state, "acc_weight"):
            self.state.acc_weight = float(meta["rule_acc_weight"])
        if self.link_copies is not None:
            self.link_copies = {int(k[len("link."):]): v.to(self.device).clone()
                                for k, v in tensors.items() if k.startswith("link.")}
        optimizer_state = {k[len("optim."):]: v.to(self.device) for k, v in tensors.items() if k.startswith("optim.")}
        if optimizer_state or meta["optim_scalars"]:
            scalars = {k: torch.tensor(v) for k, v in meta["optim_scalars"].items()}
            saved = self.optimizer.state_dict()
            saved["state"] = {0: {**optimizer_state, **scalars}}
            self.optimizer.load_state_dict(saved)
        self.order = tensors["order"].to(torch.int64)
        self.cursor = int(meta["cursor"])
        self.step = int(meta["step"])
        self.data_generator.set_state(tensors["rng.data"])
        self.wire_generator.set_state(tensors["rng.wire"])
        traffic = meta["traffic"]
        self.traffic = Traffic(traffic["bytes_sent"], traffic["messages_sent"],
                               {int(k): v for k, v in traffic["per_link"].items()},
                               {int(k): v for k, v in traffic["per_link_messages"].items()})
        self.loss_sum, self.loss_count = float(meta["loss_sum"]), int(meta["loss_count"])

    # ------------------------------------------------------------ parameters, buffers, evaluation

    def parameters_vector(self) -> torch.Tensor:
        return self.flat.data.detach().clone()

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The model every agent started from (parameters and buffers), rebuilt without touching torch's RNG."""
        with torch.random.fork_rng(devices=[]):
            model = make_model(self.config, self.dataset, self.task)
        arrays = {"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()])}
        arrays.update({f"buffer.{k}": v.detach().clone() for k, v in model.named_buffers()})
        return arrays

    def load_parameters_vector(self, vector: torch.Tensor) -> None:
        self.flat.data.copy_(vector.to(self.flat.data.device))

    def buffers(self) -> dict[str, torch.Tensor]:
        return {name: buf.detach().clone() for name, buf in self.model.named_buffers()}

    def load_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        own = dict(self.model.named_buffers())
        for name, value in buffers.items():
            own[name].copy_(value.to(own[name].device))

    @torch.no_grad()
    def reestimate_batchnorm(self, batches: int) -> None:
        """Recompute batch-norm running statistics on `batches` minibatches of this agent's shard."""
        reestimate_batchnorm(self.model, (self.next_batch() for _ in range(batches)))

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
        return evaluate(self.model, x, y, batch_size, self.device, self.task.metric)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches) -> None:
    """Reset batch-norm statistics and recompute them as a cumulative average over the batches."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for x, _ in batches:
        model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
             metric: Metric | None = None) -> float:
    """The metric (default: top-1 accuracy) of `model` on (x, y): each batch's value weighted by its size (or the
    (total, count) a metric returns), then the metric's finish (perplexity: exp of the mean token loss)."""
    metric = metric or METRICS["accuracy"]
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = x[start : start + batch_size].to(device, non_blocking=True)
        yb = y[start : start + batch_size].to(device, non_blocking=True)
        value = metric.fn(model(xb), (xb, yb))
        if isinstance(value, tuple):
            total, count = total + float(value[0]), count + int(value[1])
        else:
            total, count = total + float(value) * len(yb), count + len(yb)
    return metric.value(total / max(1, count))
