"""Your own model and data, (c): a regression task, mean squared error as loss and metric.

The data is a user loader (`smooth_function`) returning two `TensorDataset`s of float inputs and float targets:
x uniform in [-1, 1]^8, y = sin(3 x.w1) + (x.w2)^2 + noise (sd 0.05), so no line fits it. Agents get
different regions of the input space (`data.partition.kind: by_key`, the key being the sign pattern of x's
first two coordinates: four groups, the agents of a group share its quarter of the space), so each agent
alone learns only its own quarter. The model (`regressor`: an MLP with one output, no num_classes: a
factory that takes only its params) is ordinary user code referenced by import path:

    model.name: scenarios.own_regression:regressor   train.loss: mse   eval.metric: mse

It compares 8 agents on a ring (D-PSGD, final merge) against parallel SGD and local training without
communication, and prints the test mean squared error of each (lower is better) beside the variance of the
test targets (the error of predicting their mean).

    python -m scenarios own_regression                 # cpu scale, well under a minute
    python -m scenarios own_regression --scale smoke   # seconds (tests)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.data import TensorDataset


from scenarios import common
from scenarios.common import Outcome, Variant

SCENARIO = "own_regression"
HERE = "scenarios.own_regression"
DIM = 8
DATA_SEED = 1234  # the data never changes with the run's seed


# ---------------------------------------------------------------- the user's data


def target_of(x: torch.Tensor) -> torch.Tensor:
    """The function to learn, (N, DIM) -> (N,), without noise."""
    g = torch.Generator().manual_seed(DATA_SEED)
    w1, w2 = torch.randn(2, DIM, generator=g) * (2 / DIM) ** 0.5
    return torch.sin(3 * x @ w1) + (x @ w2) ** 2


def smooth_function(*, train: int = 4000, test: int = 1000, noise: float = 0.05) -> tuple[TensorDataset, TensorDataset]:
    """The loader: (train, test) TensorDatasets of x (N, DIM) float32 and y (N,) float32."""
    g = torch.Generator().manual_seed(DATA_SEED + 1)

    def part(n: int) -> TensorDataset:
        x = torch.rand(n, DIM, generator=g) * 2 - 1
        return TensorDataset(x, target_of(x) + noise * torch.randn(n, generator=g))

    return part(train), part(test)


def quadrant(sample: tuple[torch.Tensor, torch.Tensor]) -> int:
    """The by_key partition's key: which quarter of the input space (signs of x[0] and x[1]) a sample lies in."""
    x = sample[0]
    return int(x[0] > 0) * 2 + int(x[1] > 0)


# ---------------------------------------------------------------- the user's model


def regressor(*, hidden: int = 64, depth: int = 2) -> nn.Module:
    """An MLP from DIM inputs to one output; a factory of params only (no num_classes or input_shape)."""
    layers: list[nn.Module] = []
    width = DIM
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, 1), nn.Flatten(0))


# ---------------------------------------------------------------- the scenario

CPU = {
    "data": {"name": f"{HERE}:smooth_function", "params": {"train": 4000, "test": 1000},
             "partition": {"kind": "by_key", "key": f"{HERE}:quadrant"}},
    "model": {"name": f"{HERE}:regressor", "params": {"hidden": 64, "depth": 2}},
    "agents": {"count": 8},
    "topology": {"name": "ring", "weights": "uniform"},
    "train": {"epochs": 10, "steps_per_epoch": 30, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "loss": "mse"},
    "gossip": common.EXACT_GOSSIP,
    "schedule": {"averaging_rate": {"kind": "constant", "gamma0": 1.0}, "communication": {"kind": "every"},
                 "final_merge": {"enabled": True}},
    "eval": {"every": 2, "local": True, "metric": "mse"},
    "runtime": {"engine": "reference", "progress": False, "num_cpus_per_agent": 0.25,
                "agents_per_actor": 4, "wait_timeout_s": 300.0},
}
SMOKE = {
    "data": {"params": {"train": 800, "test": 200}},
    "model": {"params": {"hidden": 16}},
    "agents": {"count": 4},
    "train": {"epochs": 4, "steps_per_epoch": 10, "batch_size": 16},
    "eval": {"every": 1},
    "runtime": {"agents_per_actor": 2, "wait_timeout_s": 60.0},
}
GOSSIP = "D-PSGD ring + final merge"


def base_of(scale: str, overrides: Sequence[str] = ()) -> dict:
    """The example's own config (no YAML file): cpu, or smoke shrunk to seconds."""
    return common.scaled_base(CPU, SMOKE, scale, overrides)


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    base = base_of(scale, overrides)
    return [common.variant(SCENARIO, base, GOSSIP), common.parallel_sgd(SCENARIO, base),
            common.local_only(SCENARIO, base, merge=False)]


def target_variance(config) -> float:
    """The test targets' variance: the mean squared error of always predicting their mean."""
    _, test = smooth_function(**config.data.params)
    return float(test.tensors[1].var(unbiased=False))


def report(outcomes: Sequence[Outcome]) -> str:
    rows = []
    for label, runs in common.by_label(outcomes).items():
        rows.append([label, ",".join(str(run.seed) for run in runs),
                     common.pm([run.summary.get("merged_test_mse") for run in runs]),
                     common.pm([run.summary.get("mean_local_test_mse") for run in runs]),
                     "yes" if runs[0].config.schedule.final_merge.enabled else "no"])
    config = outcomes[0].config
    return (f"Regression, {config.agents.count} agents, each on a quarter of the input space; test mean squared "
            f"error (lower is better). Predicting the mean: {target_variance(config):.4f}.\n\n"
            + common.markdown(["label", "seeds", "merged test mse", "mean local test mse", "final merge"], rows))


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report)
