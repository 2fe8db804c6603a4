"""Batched local steps (core/batched.py): equal to one-by-one steps, the fallback and its reason, both engines."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from raygossip.validation import load_config
from raygossip.core.agent import AgentCore
from raygossip.core.batched import BatchedSteps
from raygossip.core.flat import FlatParameters
from raygossip.data import load_dataset, partition
from raygossip.data.datasets import Split
from raygossip.engines.common import RunSetup, prepare
from raygossip.engines.ray_engine import RayEngine
from raygossip.engines.reference import ReferenceEngine
from raygossip.errors import UserError
from scenarios import DATA_ROOT
from conftest import assert_same_run, small, wait_for_idle_cluster

MNIST_ROOT = str(DATA_ROOT)
MLP = ("digits", {"name": "mlp", "hidden": [32, 16]})
LENET = ("mnist", {"name": "lenet5"})
RESNET = {"name": "resnet20", "norm": "batch"}


def group(data: str, model: dict, k: int = 4, train: dict | None = None) -> list[AgentCore]:
    """k agents of one config, as an actor hosts them (IID shards, SGD with momentum unless train says otherwise)."""
    config = load_config(base={
        "seed": 3, "data": {"name": data, "root": MNIST_ROOT, "download": False, "partition": {"kind": "iid"}},
        "model": model, "agents": {"count": k},
        "train": {"batch_size": 8, "lr": 0.05, "momentum": 0.9, "lr_schedule": {"kind": "cosine"}, **(train or {})}})
    dataset = load_dataset(data, MNIST_ROOT, False)
    shards = partition("iid", dataset.train.y.numpy(), k, config.seed, {})
    return [AgentCore(i, config, dataset, shards[i], total_steps=20) for i in range(k)]


def assert_same_agents(batched: list[AgentCore], alone: list[AgentCore], exact: bool) -> None:
    """Parameters and momentum (bit for bit, or within 1e-6 of the largest), step, loss sums, data stream."""
    for a, b in zip(batched, alone):
        for got, want in ((a.flat.data, b.flat.data), (a.optimizer.state[0]["momentum_buffer"],
                                                        b.optimizer.state[0]["momentum_buffer"])):
            if exact:
                assert torch.equal(got, want)
            else:
                assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())
        assert (a.step, a.cursor, a.loss_count) == (b.step, b.cursor, b.loss_count)
        assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-6)
        assert torch.equal(a.data_generator.get_state(), b.data_generator.get_state())


@pytest.mark.parametrize("workload, exact", [(MLP, True), (LENET, False)], ids=["mlp", "lenet5"])
def test_a_batched_step_equals_one_by_one_steps(workload, exact):
    """The MLP's stacked matmuls are the same sums as its own (bit for bit); LeNet-5's grouped convolution sums in
    another order (within 1e-6), over several steps with momentum and a cosine schedule."""
    batched, alone = group(*workload), group(*workload)
    steps = BatchedSteps(batched)
    assert steps.reason is None
    moved = [core.flat.data.clone() for core in batched]
    for _ in range(4):
        losses = steps.step()
        expected = [core.train_step() for core in alone]
        assert losses == (expected if exact else pytest.approx(expected, rel=1e-6))
    assert_same_agents(batched, alone, exact)
    assert all(not torch.equal(core.flat.data, before) for core, before in zip(batched, moved))


def test_label_smoothing_grad_clip_and_a_subset_of_the_group_step_as_alone():
    train = {"label_smoothing": 0.2, "grad_clip_value": 0.01, "momentum": 0.5, "nesterov": True}
    batched, alone = group(*MLP, train=train), group(*MLP, train=train)
    steps = BatchedSteps(batched)
    steps.step()
    steps.step(batched[1:3])  # the others stopped: only these two step
    for core in alone:
        core.train_step()
    for core in alone[1:3]:
        core.train_step()
    assert [core.step for core in batched] == [1, 2, 2, 1]
    assert_same_agents(batched, alone, exact=True)


def test_adamw_keeps_its_state_per_agent():
    train = {"optimizer": "adamw", "lr": 0.01, "momentum": 0.0}
    batched, alone = group(*MLP, train=train), group(*MLP, train=train)
    steps = BatchedSteps(batched)
    for _ in range(3):
        steps.step()
        for core in alone:
            core.train_step()
    for a, b in zip(batched, alone):
        assert torch.equal(a.flat.data, b.flat.data)
        assert torch.equal(a.optimizer.state[a.flat.param]["exp_avg_sq"], b.optimizer.state[b.flat.param]["exp_avg_sq"])


def test_a_batch_norm_model_steps_one_by_one_and_says_why():
    batched, alone = group("mnist", RESNET, k=3), group("mnist", RESNET, k=3)
    steps = BatchedSteps(batched)
    assert steps.reason == "BatchNorm2d keeps running statistics per agent"
    steps.step()
    for core in alone:
        core.train_step()
    for a, b in zip(batched, alone):
        assert torch.equal(a.flat.data, b.flat.data)
        for (name, got), (_, want) in zip(a.model.named_buffers(), b.model.named_buffers()):
            assert torch.equal(got, want), name


class Reordered(nn.Module):
    """Layers registered in one order and applied in another: not a chain the stacked forward can follow."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.second = nn.Linear(16, 10)
        self.first = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(self.flatten(x))))


class Dropping(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Flatten(), nn.Linear(64, 10), nn.Dropout(0.5))


@pytest.mark.parametrize("model, reason", [
    (Reordered, "its forward is not the chain of its layers (the stacked forward gave other logits)"),
    (Dropping, "Dropout draws its masks from the global random stream, agent after agent"),
])
def test_a_model_that_is_not_a_plain_chain_of_layers_falls_back(model, reason):
    cores = group(*MLP, k=3)
    for core in cores:
        torch.manual_seed(0)
        core.model = model()
        core.flat = FlatParameters(core.model)
    assert BatchedSteps(cores).reason == reason


def reference_config(batched: bool, k: int = 4, model: dict | None = None, data: str = "digits") -> object:
    return load_config(base={
        "seed": 1, "data": {"name": data, "root": MNIST_ROOT, "download": False, "partition": {"kind": "iid"}},
        "model": model or {"name": "mlp", "hidden": [32]}, "agents": {"count": 8},
        "topology": {"name": "ring"}, "train": {"epochs": 2, "steps_per_epoch": 6, "batch_size": 8, "lr": 0.05,
                                                "momentum": 0.9},
        "eval": {"every": 1, "test_samples": 200},
        "runtime": {"engine": "reference", "progress": False, "batched_steps": batched, "agents_per_actor": k}})


def test_the_reference_engine_steps_its_actor_groups_batched_with_the_same_numbers():
    engine = ReferenceEngine(reference_config(True))
    assert [[node.agent_id for node in members] for members, _ in engine.batched] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    outcome = engine.run(progress=False)
    alone = ReferenceEngine(reference_config(False))
    expected = alone.run(progress=False)
    for got, want in zip(engine.agent_vectors(), alone.agent_vectors()):
        assert torch.equal(got, want)  # the MLP: the same sums
    for got, want in zip(outcome["records"], expected["records"]):
        assert got["train_loss"] == want["train_loss"]
    assert not [e for e in outcome["events"] if e["kind"] == "batched_steps_off"]


def tiny_batch_norm_run(engine: str) -> object:
    """Four MNIST agents, two per actor, one step of a batch-norm ResNet: the least that makes a run say why its
    actors step one by one (the reason's wording is test_a_batch_norm_model_steps_one_by_one_and_says_why's)."""
    return load_config(base={
        "seed": 1, "data": {"name": "mnist", "root": MNIST_ROOT, "download": False, "partition": {"kind": "iid"}},
        "model": RESNET, "agents": {"count": 4},
        "train": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 8}, "eval": {"every": 0, "test_samples": 50},
        "schedule": {"final_merge": {"enabled": False}},
        "runtime": {"engine": engine, "progress": False, "batched_steps": True, "agents_per_actor": 2,
                    "num_cpus_per_agent": 0.5, "wait_timeout_s": 60.0}})


def test_the_reference_engine_says_once_why_it_steps_one_by_one():
    config = tiny_batch_norm_run("reference")
    outcome = ReferenceEngine(config, first_samples(prepare(config), 400)).run(progress=False)
    off = [e for e in outcome["events"] if e["kind"] == "batched_steps_off"]
    assert off == [{"time_s": 0.0, "kind": "batched_steps_off", "reason": "BatchNorm2d keeps running statistics per agent"}]


@pytest.mark.parametrize("runtime, message", [
    ({"agents_per_actor": 1}, "runtime.batched_steps: steps the agents of one actor together: needs "
                              "runtime.agents_per_actor > 1, got 1"),
    ({"agents_per_actor": 2, "mode": "async"}, "runtime.batched_steps: steps an actor's agents in lockstep, which "
                                               "only sync mode does; got runtime.mode 'async'"),
])
def test_batched_steps_needs_packed_actors_in_sync_mode(runtime, message):
    with pytest.raises(UserError) as error:
        load_config(base={"runtime": {"batched_steps": True, **runtime}})
    assert str(error.value) == message


def first_samples(setup: RunSetup, n: int) -> RunSetup:
    """The run's setup on the first n training samples only (what the actors get through the object store)."""
    dataset = setup.dataset
    train = Split(dataset.train.x[:n].clone(), dataset.train.y[:n].clone())
    shards = partition("iid", train.y.numpy(), setup.config.agents.count, setup.config.seed, {})
    return dataclasses.replace(setup, dataset=dataclasses.replace(dataset, train=train), shards=shards)


def test_a_sync_ray_run_with_batched_steps_gives_the_batched_reference_run_bit_for_bit(ray_cluster):
    """LeNet-5, whose batched numbers differ from one-by-one ones in the last bits: the Ray engine's actor (4 agents)
    steps them batched exactly as the reference engine does."""
    data = small(train__batch_size=8, eval__test_samples=300)
    data["data"] = {"name": "mnist", "root": MNIST_ROOT, "download": False, "partition": {"kind": "iid"}}
    data["model"] = {"name": "lenet5"}
    data["runtime"].update(agents_per_actor=4, batched_steps=True)
    config = load_config(base=data)
    setup = first_samples(prepare(config), 2000)
    reference = ReferenceEngine(config, setup)
    expected = reference.run(progress=False)
    one_by_one = ReferenceEngine(dataclasses.replace(config, runtime=dataclasses.replace(
        config.runtime, batched_steps=False)), setup)
    one_by_one.run(progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(reference.agent_vectors(), one_by_one.agent_vectors()))
    wait_for_idle_cluster()
    engine = RayEngine(config, setup)
    try:
        outcome = engine.run()
        assert_same_run(engine, outcome, reference, expected)
        assert not [e for e in outcome["events"] if e["kind"] == "batched_steps_off"]
    finally:
        engine.close()


def test_a_ray_run_says_once_why_its_actors_step_one_by_one(ray_cluster):
    """Two actors of two agents each, a batch-norm model: only agent 0's actor puts the reason in the events."""
    config = tiny_batch_norm_run("ray")
    wait_for_idle_cluster()
    engine = RayEngine(config, first_samples(prepare(config), 400))
    try:
        outcome = engine.run()
        off = [e for e in outcome["events"] if e["kind"] == "batched_steps_off"]
        assert [(e["agent"], e["reason"]) for e in off] == [(0, "BatchNorm2d keeps running statistics per agent")]
    finally:
        engine.close()
