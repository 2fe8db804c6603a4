"""Reference engine end to end: the quickstart learns and is deterministic, MNIST learns, compression saves bytes."""

from __future__ import annotations

import math

import networkx as nx
import pytest
import torch

from raygossip.algorithms.spectral import spectral_report
from raygossip.algorithms.topology import topology_from_graph
from raygossip.api import run, with_graph
from raygossip.config import Config
from raygossip.validation import load_config
from raygossip.engines.reference import ReferenceEngine
from raygossip.models import build_model
from raygossip.presets import quickstart
from scenarios import DATA_ROOT

# Merged test accuracy of the quickstart (seed 0), measured with the reference engine:
#   .venv/bin/python -c "from raygossip.api import run; from raygossip.validation import load_config;
#     from raygossip.presets import quickstart;
#     print(run(load_config(base=quickstart(), overrides=['runtime.progress=false'])).summary['merged_test_accuracy'])"
# -> 0.9722222222222222 (350 of the 360 held-out digits).
QUICKSTART_MERGED_ACCURACY = 0.9722
TIMING_KEYS = {"wall_time_s", "time_s"}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Two shared cores: torch's intra-op threads only contend (a LeNet step is ~8x slower with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quick(*overrides: str) -> Config:
    return load_config(base=quickstart(), overrides=["runtime.engine=reference", "runtime.progress=false", *overrides])


def without_timing(value):
    """A summary or record with its clock readings removed (they differ between identical runs)."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


# ---------------------------------------------------------------- the quickstart


@pytest.fixture(scope="module")
def quickstart_runs():
    """The quickstart, run twice with the same config and seed."""
    return [run(quick()) for _ in range(2)]


def test_quickstart_reaches_the_pinned_accuracy(quickstart_runs):
    summary = quickstart_runs[0].summary
    assert summary["merged_test_accuracy"] >= QUICKSTART_MERGED_ACCURACY - 0.02, summary["merged_test_accuracy"]
    assert summary["merged_test_accuracy"] >= 0.9
    assert summary["mean_local_test_accuracy"] >= 0.9
    assert summary["epochs"] == 20 and summary["agents"] == 8
    assert summary["rounds"] == summary["communication_rounds"] > 0
    # D-PSGD on a ring: every round each agent sends its dense float32 model to its 2 neighbours
    records = quickstart_runs[0].records
    assert [r["epoch"] for r in records] == [5.0, 10.0, 15.0, 20.0]  # eval.every: 5 (epochs)
    assert summary["messages_sent"] == 8 * 2 * summary["rounds"]


def test_quickstart_is_deterministic(quickstart_runs):
    first, second = (result.summary for result in quickstart_runs)
    assert first["merged_test_accuracy"] == second["merged_test_accuracy"]
    assert first["bytes_sent"] == second["bytes_sent"]
    assert first["consensus_distance"] == second["consensus_distance"]
    assert without_timing(first) == without_timing(second)
    assert without_timing(quickstart_runs[0].records) == without_timing(quickstart_runs[1].records)


def _final_vectors(config: Config) -> list[torch.Tensor]:
    engine = ReferenceEngine(config)
    engine.run(progress=False)
    return engine.agent_vectors()


def test_reference_engine_parameters_are_bit_identical_for_a_seed():
    """Same config and seed: every agent's final parameter vector is equal bit for bit (final merge off,
    so the vectors still differ between agents and the check is not just the shared average)."""
    config = quick("train.epochs=2", "eval.every=0", "schedule.final_merge.enabled=false")
    first, second = _final_vectors(config), _final_vectors(config)
    assert len(first) == len(second) == 8
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # agents did not collapse onto one vector
    other_seed = _final_vectors(quick("train.epochs=2", "eval.every=0", "schedule.final_merge.enabled=false",
                                      "seed=1"))
    assert not torch.equal(first[0], other_seed[0])


# ---------------------------------------------------------------- real MNIST


@pytest.mark.slow
def test_short_mnist_run_learns():
    raw = DATA_ROOT / "MNIST" / "raw"
    if not raw.is_dir() or not any(raw.iterdir()):
        pytest.fail(f"MNIST is missing: expected the raw MNIST files under {raw} (the shared data folder beside "
                    "the repository); put them there, this test does not download")
    config = load_config(base={
        "name": "mnist_short",
        "seed": 0,
        "data": {"name": "mnist", "root": str(DATA_ROOT), "download": False,
                 "partition": {"kind": "dirichlet", "alpha": 1.0}},
        "model": {"name": "lenet5"},
        "agents": {"count": 4},
        "topology": {"name": "ring"},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9, "steps_per_epoch": 100},
        "eval": {"every": 0, "test_samples": 2000, "local": False},
        "runtime": {"progress": False},
    })
    summary = run(config).summary
    assert summary["steps"] == 100
    assert summary["merged_test_accuracy"] > 0.8, summary["merged_test_accuracy"]


# ---------------------------------------------------------------- compressed gossip saves bytes

COMPRESSED_EPOCHS = 5
RUNS = {
    "dpsgd": [],
    "choco_top_k": ["gossip.rule=choco", "gossip.compressor.name=top_k", "gossip.compressor.ratio=0.1"],
    # AdaGossip's gamma bounds the per-element step (gamma_i * r_i ~ gamma at first), so it is far
    # smaller than CHOCO's; QSGD is scaled by CHOCO's factor so the compressor contracts.
    "adagossip_qsgd": ["gossip.rule=adagossip", "gossip.compressor.name=qsgd", "gossip.compressor.bits=4",
                       "gossip.compressor.scaled=true", "schedule.averaging_rate.gamma0=0.01"],
}


def _segments() -> list[int]:
    model = build_model("mlp", 10, (64,), {"hidden": quickstart()["model"]["hidden"]})
    return [p.numel() for p in model.parameters()]


def _expected_factor(name: str) -> float:
    """Wire bytes relative to a dense float32 model, from the payload layouts in DESIGN.md."""
    segments = _segments()
    dense = 4 * sum(segments)
    if name == "choco_top_k":  # float32 values + uint16 indices (segments up to 4096 entries)
        return sum(math.ceil(0.1 * s) * (4 + 2) for s in segments) / dense
    if name == "adagossip_qsgd":  # 1 sign bit + 4 level bits per entry + one float32 norm per tensor
        d = sum(segments)
        return (math.ceil(d / 8) + math.ceil(4 * d / 8) + 4 * len(segments)) / dense
    return 1.0


@pytest.fixture(scope="module")
def compressed_runs():
    overrides = [f"train.epochs={COMPRESSED_EPOCHS}", f"eval.every={COMPRESSED_EPOCHS}"]
    return {name: run(quick(*overrides, *extra)).summary for name, extra in RUNS.items()}


@pytest.mark.parametrize("name", ["choco_top_k", "adagossip_qsgd"])
def test_compressed_gossip_sends_fewer_bytes_for_the_same_rounds(compressed_runs, name):
    dense, compressed = compressed_runs["dpsgd"], compressed_runs[name]
    assert compressed["rounds"] == dense["rounds"] > 0
    assert compressed["messages_sent"] == dense["messages_sent"]
    factor = compressed["bytes_sent"] / dense["bytes_sent"]
    assert factor == pytest.approx(_expected_factor(name), rel=0.02), factor
    assert 0.1 < factor < 0.2


@pytest.mark.parametrize("name", ["choco_top_k", "adagossip_qsgd"])
def test_compressed_gossip_still_learns(compressed_runs, name):
    summary = compressed_runs[name]
    assert summary["merged_test_accuracy"] > 0.8, summary["merged_test_accuracy"]
    assert summary["mean_local_test_accuracy"] > 0.8, summary["mean_local_test_accuracy"]
    assert math.isfinite(summary["consensus_distance"])


def test_a_run_takes_a_networkx_graph_and_records_it_as_an_edge_list(tmp_path):
    graph = nx.relabel_nodes(nx.circulant_graph(6, [1, 2]), {k: f"agent-{k}" for k in range(6)})
    config = quick("train.epochs=1", "eval.every=1", "train.steps_per_epoch=3", "topology.weights=metropolis")
    result = run(config, out_dir=tmp_path, graph=graph)
    recorded = load_config(tmp_path / "config.yaml")
    assert recorded.agents.count == 6 and recorded.topology.name == "edges"
    assert recorded.topology.weights == "metropolis"
    assert recorded == with_graph(config, graph)
    expected = spectral_report(topology_from_graph(graph, "metropolis"))
    assert result.summary["topology"]["lambda2"] == pytest.approx(expected["lambda2"], abs=1e-12)
    again = run(recorded)  # the recorded config alone reruns the same run
    assert again.summary["merged_test_accuracy"] == result.summary["merged_test_accuracy"]


def test_entropy_coded_top_k_indices_give_the_same_run_in_fewer_bytes():
    base = ["train.epochs=2", "eval.every=1", "gossip.rule=choco", "gossip.gamma=0.1",
            "gossip.compressor.name=top_k", "gossip.compressor.ratio=0.1"]
    plain, entropy = (run(quick(*base, f"gossip.compressor.index_coding={coding}")).summary
                      for coding in ("plain", "entropy"))
    assert entropy["merged_test_accuracy"] == plain["merged_test_accuracy"]
    assert entropy["bytes_sent"] < 0.8 * plain["bytes_sent"]
