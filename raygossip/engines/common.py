"""What both engines share: run set-up (data, shards, graph, plan), merged-model evaluation and summaries."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from raygossip.algorithms.merge import consensus_distance, global_average
from raygossip.algorithms.schedules import adaptive_gamma
from raygossip.algorithms.spectral import spectral_report
from raygossip.algorithms.topology import Topology, build_topology
from raygossip.config import Config, RuntimeConfig
from raygossip.core.agent import evaluate, make_model, reestimate_batchnorm
from raygossip.core.flat import FlatParameters
from raygossip.core.plan import RunPlan, steps_per_epoch
from raygossip.data.datasets import Dataset, load_dataset
from raygossip.data.partition import allowed_params, heterogeneity_report, holdout_split, partition
from raygossip.errors import UserError
from raygossip.optim import run_lr_schedule
from raygossip.task import Task

Observer = Callable[[dict], None]


def agent_threads(runtime: RuntimeConfig) -> int:
    """torch intra-op threads that step one agent, in either engine: runtime.torch_threads, else the agent's whole-CPU
    share (runtime.num_cpus_per_agent; unset, a Ray agent gets at most 1 CPU), at least 1. Both engines use the same
    count because on some CPUs it changes the order of floating-point sums, and so the numbers."""
    return runtime.torch_threads or max(1, int(runtime.num_cpus_per_agent or 1))


@dataclass
class RunSetup:
    """Everything a run derives from its config before any agent exists."""

    config: Config
    dataset: Dataset
    shards: list[np.ndarray]
    topology: Topology
    plan: RunPlan
    test_x: torch.Tensor
    test_y: torch.Tensor
    heterogeneity: dict
    task: Task | None = None


def validation_split(config: Config, train_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out validation indices) of the training set: eval.validation_fraction of it, drawn
    with the run's seed before the partition, so the same for every agent and every engine; sorted."""
    return holdout_split(train_size, config.eval.validation_fraction, config.seed)


def prepare(config: Config, task: Task | None = None) -> RunSetup:
    """Load the data, partition it, build the graph and the plan (raises UserError on bad input). task: the run's
    user code resolved (usercode.resolve_task); without one, what the config names."""
    from raygossip.data.user import load_user_data, materialize
    from raygossip.usercode import resolve_task

    if task is None:
        config, task = resolve_task(config)
    spec = config.data
    if task.zoo_data:
        dataset = load_dataset(spec.name, spec.root, spec.download, image_size=spec.image_size)
    else:
        dataset = load_user_data(task.loader, spec.params, spec.name)
    if spec.augment and len(dataset.input_shape) != 3:
        raise UserError("data.augment", f"{spec.name} has flat inputs {dataset.input_shape}; crop and flip need images")
    train_index, held_out = validation_split(config, len(dataset.train))
    if config.eval.validation_fraction > 0 and (len(held_out) == 0 or len(train_index) < config.agents.count):
        raise UserError("eval.validation_fraction", f"{config.eval.validation_fraction} of {len(dataset.train)} "
                                                    f"training samples leaves {len(held_out)} for validation and "
                                                    f"{len(train_index)} for training")
    labels = partition_labels(config, dataset)[train_index]  # the agents never see the held-out part
    try:
        shards = [train_index[shard] for shard in partition(spec.partition.kind, labels, config.agents.count,
                                                             config.seed, _partition_params(config, labels.size))]
    except UserError as error:
        if error.field != "data.partition.min_samples" or spec.partition.min_samples is not None:
            raise
        raise UserError(error.field, f"{error.message} (unset, min_samples is one minibatch: "
                                     f"train.batch_size {config.train.batch_size})") from None
    smallest = min(len(shard) for shard in shards)
    if smallest < config.train.batch_size:
        raise UserError(
            "train.batch_size",
            f"{config.train.batch_size} is larger than the smallest agent shard ({smallest} samples); "
            "lower it or use fewer agents",
        )
    topology = build_topology(config.topology.name, config.agents.count, config.topology.weights, config.topology.params)
    plan = RunPlan(config, topology, steps_per_epoch(config, len(labels)))
    keep = None
    if config.eval.test_samples is not None and config.eval.test_samples < len(dataset.test):
        keep = torch.randperm(len(dataset.test), generator=torch.Generator().manual_seed(0))[: config.eval.test_samples]
    test_x, test_y = materialize(dataset.test, keep)  # a lazy test set is read once, here
    labels = dataset.train.labels
    report = {} if labels is None else heterogeneity_report(labels, shards, dataset.num_classes)
    preflight(config, dataset, shards, plan, task)
    return RunSetup(config, dataset, shards, topology, plan, test_x, test_y, report, task)


def partition_labels(config: Config, dataset: Dataset) -> np.ndarray:
    """What the partitioner splits by: group ids of data.partition.key (by_key), the class labels (kinds that need
    them: a one-line error when the data has none), or placeholders (iid)."""
    from raygossip.data.partition import group_ids

    part = config.data.partition
    if part.kind == "by_key":
        return group_ids(dataset.train, part.key)
    labels = dataset.train.labels
    if labels is None and part.kind != "iid":
        raise UserError("data.partition.kind", f"{part.kind} splits by class label, and {config.data.name}'s targets "
                                               "are not class labels; use iid or by_key")
    return np.zeros(len(dataset.train), dtype=np.int64) if labels is None else labels


def preflight(config: Config, dataset: Dataset, shards: list[np.ndarray], plan: RunPlan, task: Task | None = None) -> None:
    """Build one agent on the CPU so model, optimizer, schedules and compressor errors surface now, and run one batch
    of two samples through its model, loss and metric."""
    from raygossip.core.agent import AgentCore
    from raygossip.usercode import check_task

    core = AgentCore(0, config, dataset, shards[0], plan.total_steps, "cpu", task=task)
    check_task(config, core.task, core.model, dataset.train.batch(torch.as_tensor(shards[0][:2])))
    for name in ("kill", "corrupt"):
        for k, fault in enumerate(getattr(config.faults, name)):
            if fault.round >= plan.total_rounds:
                raise UserError(f"faults.{name}[{k}].round",
                                f"must be below the run's {plan.total_rounds} rounds, got {fault.round}")
    plan.timeline.check_rounds(plan.total_rounds)
    if config.faults.kill_round is not None and config.faults.kill_round >= plan.total_rounds:
        raise UserError("faults.kill_round", f"must be below the run's {plan.total_rounds} rounds, "
                                             f"got {config.faults.kill_round}")


def _partition_params(config: Config, n_samples: int) -> dict:
    """The data.partition keys the partitioner of data.partition.kind takes. dirichlet's min_samples defaults to one
    minibatch per agent (train.batch_size), or 1 where no split can give every agent a minibatch (the batch-size
    check then names train.batch_size)."""
    part = config.data.partition
    batch = config.train.batch_size
    default_min = batch if batch * config.agents.count <= n_samples else 1
    params = {"alpha": part.alpha, "shards_per_agent": part.shards_per_agent, "balance": part.balance,
              "resample": part.resample, "min_samples": default_min if part.min_samples is None else part.min_samples}
    if part.samples_per_agent is not None:
        params["samples_per_agent"] = part.samples_per_agent
    takes = allowed_params(part.kind)
    return {key: value for key, value in params.items() if key in takes}


class AdaptiveRate:
    """The adaptive averaging rate as either engine's coordinator runs it: after each record at an epoch's end, the
    gamma of the next epoch (algorithms.schedules.adaptive_gamma), set in the plan and returned as an event."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        spec = plan.config.schedule.averaging_rate
        self.gamma0 = spec.gamma0 if spec.gamma0 is not None else plan.config.gossip.gamma
        self.exponent = spec.exponent
        self.gamma = self.gamma0
        self.reference: float | None = None

    def observe(self, step: int, distance: float) -> dict | None:
        """The record after 0-based local step `step` measured this consensus distance: the `gamma_set` event of the
        epoch that follows (None: not adaptive, not an epoch's end, or the run's last)."""
        plan = self.plan
        if not plan.adaptive or (step + 1) % plan.steps_per_epoch != 0:
            return None
        epoch = (step + 1) // plan.steps_per_epoch
        if epoch >= plan.config.train.epochs:
            return None
        if math.isfinite(distance):  # the reference: the largest distance so far (schedules.adaptive_gamma)
            self.reference = max(self.reference or 0.0, float(distance))
        self.gamma = adaptive_gamma(self.gamma, self.reference or 0.0, float(distance), self.gamma0, self.exponent)
        plan.set_gamma(epoch, self.gamma)
        return {"kind": "gamma_set", "epoch": epoch, "step": step + 1, "gamma": self.gamma,
                "consensus_distance": float(distance), "reference_distance": self.reference or 0.0}

    def restore(self, events: list[dict], step: int) -> list[dict]:
        """A resumed run at (1-based) `step`: the gammas its checkpoint's events set for epochs that begin by then,
        back in the plan; returns the events without the later gamma_set ones (the run sets those again)."""
        kept = []
        for event in events:
            if event.get("kind") == "gamma_set":
                if event["step"] > step:
                    continue
                self.plan.set_gamma(event["epoch"], event["gamma"])
                self.gamma, self.reference = event["gamma"], event["reference_distance"]
            kept.append(event)
        return kept


def public_copy_error(plan: RunPlan, states: dict[int, dict[str, np.ndarray]], agents: Sequence[int]) -> float:
    """max |s_i - sum_j W_ij x_hat_j| over these agents (those there at the end) and their neighbours among them,
    W the graph in force at the last round (CHOCO/AdaGossip; 0 when every message, resync, drop and graph change
    was applied exactly once). states: agent -> its rule state's arrays (x_hat, s)."""
    mixing = plan.mixing_at(plan.total_rounds - 1)
    error = 0.0
    for i in agents:
        want = np.zeros_like(states[i]["s"], dtype=np.float64)
        for j in agents:
            if j != i and mixing[i, j] > 0:
                want += mixing[i, j] * states[j]["x_hat"].astype(np.float64)
        error = max(error, float(np.max(np.abs(states[i]["s"] - want))))
    return error


def average_buffers(buffer_sets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average floating buffers (running stats); integer ones (batch counters) take the maximum."""
    merged = {}
    for name in buffer_sets[0]:
        values = [buffers[name] for buffers in buffer_sets]
        if values[0].is_floating_point():
            merged[name] = global_average([v.reshape(-1) for v in values]).reshape(values[0].shape)
        else:
            merged[name] = torch.stack(values).max(dim=0).values
    return merged


class MergedModel:
    """A scratch copy of the model that evaluates any parameter vector + buffers (the merged model)."""

    def __init__(self, setup: RunSetup, device: str | torch.device = "cpu") -> None:
        self.setup = setup
        self.device = torch.device(device)
        self.model = make_model(setup.config, setup.dataset, setup.task).to(self.device)
        self.flat = FlatParameters(self.model)
        self.train_index, held_out = validation_split(setup.config, len(setup.dataset.train))
        self.validation = setup.dataset.train.batch(torch.from_numpy(held_out))
        self.metric = setup.task.metric if setup.task is not None else None

    def load(self, vector: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        self.flat.data.copy_(vector.to(self.device))
        own = dict(self.model.named_buffers())
        for name, value in buffers.items():
            own[name].copy_(value.to(self.device))

    def evaluate(self) -> float:
        cfg = self.setup.config.eval
        return evaluate(self.model, self.setup.test_x, self.setup.test_y, cfg.batch_size, self.device, self.metric)

    def validation_accuracy(self) -> float | None:
        """Accuracy on the held-out validation part of the training set (None when eval.validation_fraction is 0)."""
        x, y = self.validation
        if len(y) == 0:
            return None
        return evaluate(self.model, x, y, self.setup.config.eval.batch_size, self.device, self.metric)

    def local_validation_accuracies(self, states: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]
                                    ) -> list[float] | None:
        """Each agent's own model (parameters, buffers) on the held-out validation part, in the order given (None when
        eval.validation_fraction is 0 or eval.local is off). Both engines evaluate here, on this scratch model, so
        their numbers agree; leaves the last agent's state loaded."""
        if len(self.validation[1]) == 0 or not self.setup.config.eval.local:
            return None
        accuracies = []
        for vector, buffers in states:
            self.load(vector, buffers)
            accuracies.append(self.validation_accuracy())
        return accuracies

    def reestimate_on_global_sample(self, batches: int, seed: int) -> None:
        """Re-estimate batch-norm statistics on batches drawn uniformly from the whole training set (less the
        held-out validation part)."""
        train = self.setup.dataset.train
        generator = torch.Generator().manual_seed(seed)
        size = self.setup.config.train.batch_size
        pool = torch.from_numpy(self.train_index)

        def sample():
            for _ in range(batches):
                index = pool[torch.randint(len(pool), (size,), generator=generator)]
                x, y = train.batch(index)
                yield x.to(self.device), y

        reestimate_batchnorm(self.model, sample())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().cpu().clone() for name, tensor in self.model.state_dict().items()}


def merge_all(merged: MergedModel, states: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
              broadcast: Callable[[torch.Tensor, dict[str, torch.Tensor]], None],
              reestimate_local: Callable[[int], list[dict[str, torch.Tensor]]]) -> float:
    """The final global merge, for either engine: the exact average of the agents' (parameters, buffers) goes to
    every agent (`broadcast`), then batch-norm statistics are re-estimated as schedule.final_merge.bn says (local:
    each agent on its own shard, `reestimate_local(batches)` returns their buffers, averaged into the merged
    model; global: the merged model on a sample of the whole training set, sent to every agent). Returns the
    merged model's test accuracy."""
    config = merged.setup.config
    spec = config.schedule.final_merge
    average = global_average([params for params, _ in states])
    buffers = average_buffers([b for _, b in states])
    broadcast(average, buffers)
    merged.load(average, buffers)
    if spec.bn == "local":
        merged.load(average, average_buffers(reestimate_local(spec.bn_batches)))
    elif spec.bn == "global":
        merged.reestimate_on_global_sample(spec.bn_batches, config.seed)
        broadcast(average, {k: v.detach() for k, v in merged.model.named_buffers()})
    return merged.evaluate()


def network_record(
    *,
    step: int,
    plan: RunPlan,
    vectors: Sequence[torch.Tensor],
    local_accuracies: list[float] | None,
    merged_accuracy: float,
    merged_validation_accuracy: float | None = None,
    local_validation_accuracies: list[float] | None = None,
    traffic: Sequence,
    train_loss: float,
    rounds_done: int,
    communication_rounds: int,
    wall_time_s: float,
) -> dict:
    """One metrics.jsonl record: accuracies, consensus distance, traffic and the clock.

    `step` is the 0-based index of the last local step taken; gamma is the averaging rate of the last round
    done and lr_multiplier the learning-rate multiplier of that last step (both the same on every agent).
    """
    last_round = max(0, rounds_done - 1)
    record = {
        "step": step + 1,
        "epoch": (step + 1) / plan.steps_per_epoch,
        "round": rounds_done,
        "communication_rounds": communication_rounds,
        "gamma": plan.gamma(last_round) if plan.total_rounds else None,
        "lr_multiplier": lr_multiplier(plan, step),
        "train_loss": train_loss,
        "merged_test_accuracy": merged_accuracy,
        **({} if merged_validation_accuracy is None else {"merged_validation_accuracy": merged_validation_accuracy}),
        "consensus_distance": consensus_distance(vectors),
        "bytes_sent": int(sum(t.bytes_sent for t in traffic)),
        "messages_sent": int(sum(t.messages_sent for t in traffic)),
        "wall_time_s": wall_time_s,
    }
    if local_accuracies is not None:
        record.update(
            mean_local_test_accuracy=statistics.fmean(local_accuracies),
            std_local_test_accuracy=statistics.pstdev(local_accuracies),
            min_local_test_accuracy=min(local_accuracies),
            max_local_test_accuracy=max(local_accuracies),
            local_test_accuracy=local_accuracies,
        )
    if local_validation_accuracies is not None:
        record.update(
            mean_local_validation_accuracy=statistics.fmean(local_validation_accuracies),
            std_local_validation_accuracy=statistics.pstdev(local_validation_accuracies),
            min_local_validation_accuracy=min(local_validation_accuracies),
        )
    return with_metric_keys(record, plan.config)


# ---------------------------------------------------------------- the task's metric in record keys


def metric_info(config: Config) -> tuple[str, str]:
    """(name, direction) of the run's eval.metric as records name it: accuracy keeps today's keys
    (merged_test_accuracy, ...), another metric puts its name in their place (merged_test_perplexity, ...)."""
    from raygossip.task import METRICS, metric_name

    name = metric_name(config.eval.metric)
    known = METRICS.get(config.eval.metric)
    return name, (known.direction if known is not None else "max")


def metric_key(key: str, config: Config) -> str:
    """An accuracy record key (merged_test_accuracy, ...) as the run's metric names it."""
    name = metric_info(config)[0]
    return key if name == "accuracy" else key.replace("accuracy", name)


def with_metric_keys(record: dict, config: Config) -> dict:
    """A record built with accuracy keys, its keys named for the run's metric."""
    name = metric_info(config)[0]
    if name == "accuracy":
        return record
    return {key.replace("accuracy", name): value for key, value in record.items()}


LOCAL_VALIDATION_KEYS = ("mean_local_validation_accuracy", "std_local_validation_accuracy",
                         "min_local_validation_accuracy")


def lr_multiplier(plan: RunPlan, step: int) -> float:
    """The multiplier of train.lr at local step `step` (0-based): the schedule every agent builds over the
    run's plan.total_steps (raygossip.core.agent.AgentCore.lr_multiplier), so the same on every agent."""
    return float(run_lr_schedule(plan.config.train, plan.total_steps)(step))


def summary_record(
    *,
    engine: str,
    setup: RunSetup,
    last: dict,
    merged_after: float,
    wall_time_s: float,
    traffic: Sequence,
    events: list[dict],
    communication_rounds: int,
) -> dict:
    """summary.json: the run's headline numbers, the graph and data heterogeneity, and its events."""
    config = setup.config
    name, direction = metric_info(config)
    direction = setup.task.metric.direction if setup.task is not None else direction
    last = {key.replace(metric_key("accuracy", config), "accuracy"): value for key, value in last.items()}
    return with_metric_keys({
        "name": config.name,
        "engine": engine,
        "mode": config.runtime.mode,
        "agents": config.agents.count,
        "epochs": config.train.epochs,
        "steps": setup.plan.total_steps,
        "rounds": setup.plan.total_rounds,
        "communication_rounds": communication_rounds,
        "merged_test_accuracy": merged_after,
        "merged_test_accuracy_before_merge": last["merged_test_accuracy"],
        **({"merged_validation_accuracy": last["merged_validation_accuracy"]}
           if "merged_validation_accuracy" in last else {}),
        "final_merge": config.schedule.final_merge.enabled,
        "mean_local_test_accuracy": last.get("mean_local_test_accuracy"),
        "std_local_test_accuracy": last.get("std_local_test_accuracy"),
        "local_test_accuracy": last.get("local_test_accuracy"),
        **{key: last[key] for key in LOCAL_VALIDATION_KEYS if key in last},
        "consensus_distance": last["consensus_distance"],
        "gamma": last.get("gamma"),
        **({"adaptive_gamma": {str(e["epoch"]): e["gamma"] for e in events if e.get("kind") == "gamma_set"}}
           if setup.plan.adaptive else {}),
        "bytes_sent": int(sum(t.bytes_sent for t in traffic)),
        "messages_sent": int(sum(t.messages_sent for t in traffic)),
        "bytes_sent_per_agent": [int(t.bytes_sent) for t in traffic],
        "wall_time_s": wall_time_s,
        "topology": spectral_report(setup.topology),
        "heterogeneity": {k: v for k, v in setup.heterogeneity.items() if not isinstance(v, list)},
        "events": events,
    }, config) | {"metric": {"name": name, "direction": direction}}
