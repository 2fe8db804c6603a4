"""A diverged agent is an outcome: detected within a round, never absorbed, the run aborted or the agent dropped."""

from __future__ import annotations

import json

import pytest
import torch

from raygossip.algorithms.compressors import Compressed
from raygossip.api import RunDiverged, run
from raygossip.cli import main
from raygossip.validation import load_config
from raygossip.core.wire import Kind, Letter
from raygossip.presets import quickstart
from test_node import make_nodes


def diverging(on_divergence: str = "abort", engine: str = "reference", **train) -> dict:
    """4 agents on a ring; agent 2's parameters become NaN at round 20 (of 48)."""
    data = quickstart()
    data["agents"] = {"count": 4}
    data["model"] = {"name": "mlp", "hidden": [32]}
    data["train"].update(epochs=4, steps_per_epoch=12, on_divergence=on_divergence, **train)
    data["eval"] = {"every": 1}
    data["faults"] = {"corrupt": [{"agent": 2, "round": 20}]}
    data["runtime"] = {"engine": engine, "num_cpus_per_agent": 0.5, "progress": False, "wait_timeout_s": 30.0}
    return data


def strict_lines(path) -> list[dict]:
    return [json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in {path}"))
            for line in path.read_text().splitlines()]


def test_abort_ends_the_run_as_diverged_with_its_records_so_far(tmp_path):
    with pytest.raises(RunDiverged, match="agent 2's parameters became non-finite at step 21"):
        run(load_config(base=diverging()), out_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["status"] == "diverged"
    (event,) = [e for e in summary["events"] if e["kind"] == "diverged"]
    assert (event["agent"], event["step"], event["what"]) == (2, 21, "parameters")
    assert [r["step"] for r in strict_lines(tmp_path / "metrics.jsonl")] == [12]  # epoch 1; step 24 never came
    assert not (tmp_path / "model.safetensors").exists()


def test_drop_goes_on_without_the_diverged_agent():
    result = run(load_config(base=diverging("drop")))
    summary = result.summary
    assert summary["status"] == "finished"
    assert [e["agent"] for e in summary["events"] if e["kind"] == "agent_dropped"] == [2]
    assert result.records[-1]["agents"] == [0, 1, 3]
    assert all(torch.isfinite(torch.tensor(r["consensus_distance"])) for r in result.records)
    assert summary["merged_test_accuracy"] > 0.5


def test_a_loss_that_overflows_is_caught_on_the_step_it_happens(tmp_path, capsys):
    code = main(["run", "--no-progress", "--out", str(tmp_path), "--set", "runtime.engine=reference",
                 "--set", "train.lr=1e6", "--set", "train.momentum=0.9", "--set", "train.epochs=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4, err
    assert err[-1].startswith("raygossip run: train.on_divergence: run diverged: agent "), err
    assert "became non-finite" in err[-1] and "Traceback" not in "\n".join(err)
    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)["status"] == "diverged"


def test_a_receiver_never_absorbs_a_non_finite_message():
    nodes = make_nodes({"rule": "dpsgd"})
    node = nodes[0]
    node.local_step()
    poisoned = node.core.parameters_vector()
    poisoned[3] = float("inf")
    before = node.core.state.acc.clone()
    letter = Letter(1, 0, Kind.GOSSIP, Compressed({"values": poisoned}, poisoned.numel()), 0.0, 0.0, seq=0)
    node.inbox.apply_letters([letter], node.peers.in_weights, 0)
    assert node.inbox.counters["nonfinite_messages"] == 1
    assert torch.equal(node.core.state.acc, before)


def test_the_ray_engine_drops_a_diverged_agent_as_the_reference_engine_does(ray_cluster):
    from conftest import assert_same_run, run_ray
    from raygossip.engines.reference import ReferenceEngine

    config = load_config(base=diverging("drop", engine="ray"))
    reference = ReferenceEngine(config)
    expected = reference.run(progress=False)
    engine, outcome = run_ray(config)
    try:
        assert outcome["extra"]["dropped_agents"] == [2]
        assert_same_run(engine, outcome, reference, expected)
    finally:
        engine.close()


def test_the_ray_engine_aborts_a_diverged_run(ray_cluster, tmp_path):
    from conftest import wait_for_idle_cluster

    wait_for_idle_cluster()
    with pytest.raises(RunDiverged, match="agent 2's parameters"):
        run(load_config(base=diverging(engine="ray")), out_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["status"] == "diverged"
