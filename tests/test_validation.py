"""eval.validation_fraction: a seeded held-out part of the training set that no agent trains on, in every record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from raygossip.api import run
from raygossip.validation import load_config
from raygossip.core.agent import evaluate, make_model
from raygossip.engines.common import prepare, validation_split
from raygossip.errors import UserError
from conftest import run_ray, small


def test_validation_split_is_seeded_disjoint_and_covers_the_training_set():
    config = load_config(base=small(eval__validation_fraction=0.25))
    train, held_out = validation_split(config, 1000)
    assert len(held_out) == 250 and len(train) == 750
    assert np.array_equal(np.union1d(train, held_out), np.arange(1000))
    again_train, again_held = validation_split(config, 1000)
    assert np.array_equal(held_out, again_held) and np.array_equal(train, again_train)
    other = small(eval__validation_fraction=0.25)
    other["seed"] = 1
    assert not np.array_equal(validation_split(load_config(base=other), 1000)[1], held_out)


def test_no_validation_fraction_keeps_the_whole_training_set():
    config = load_config(base=small())
    train, held_out = validation_split(config, 1797)
    assert np.array_equal(train, np.arange(1797)) and len(held_out) == 0


def test_no_agent_shard_holds_a_validation_sample():
    config = load_config(base=small(eval__validation_fraction=0.2, train__steps_per_epoch=None))
    setup = prepare(config)
    train, held_out = validation_split(config, len(setup.dataset.train))
    shards = np.concatenate(setup.shards)
    assert len(np.intersect1d(shards, held_out)) == 0
    assert np.array_equal(np.sort(shards), train)  # the partition covers exactly the training part
    whole = prepare(load_config(base=small(train__steps_per_epoch=None)))
    assert setup.plan.steps_per_epoch < whole.plan.steps_per_epoch  # an epoch is one pass over the training part


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_a_validation_fraction_out_of_range_is_a_one_line_error(fraction):
    with pytest.raises(UserError, match=r"^eval.validation_fraction: must be in \[0, 1\)"):
        load_config(base=small(eval__validation_fraction=fraction))


def test_every_record_carries_the_merged_validation_accuracy(tmp_path):
    data = small(eval__validation_fraction=0.2, runtime__engine="reference")
    data["schedule"]["final_merge"] = {"enabled": False}  # the saved model is then the last record's merged model
    config = load_config(base=data)
    result = run(config, out_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    assert all(0.0 <= r["merged_validation_accuracy"] <= 1.0 for r in records)
    assert result.summary["merged_validation_accuracy"] == records[-1]["merged_validation_accuracy"]
    # recomputed from scratch: the saved merged model on the held-out samples
    setup = prepare(config)
    _, held_out = validation_split(config, len(setup.dataset.train))
    model = make_model(config, setup.dataset)
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    x, y = setup.dataset.train.x[held_out], setup.dataset.train.y[held_out]
    assert evaluate(model, x, y, 1000, torch.device("cpu")) == pytest.approx(records[-1]["merged_validation_accuracy"],
                                                                          abs=1e-12)


def test_every_record_carries_each_agents_own_validation_accuracy():
    from raygossip.engines.reference import ReferenceEngine

    data = small(eval__validation_fraction=0.2, runtime__engine="reference", gossip__rule="choco", gossip__gamma=0.3)
    data["schedule"]["final_merge"] = {"enabled": False}  # the agents' models at the end are the last record's
    config = load_config(base=data)
    engine = ReferenceEngine(config)
    records = engine.run(progress=False)["records"]
    assert all({"mean_local_validation_accuracy", "std_local_validation_accuracy",
                "min_local_validation_accuracy"} <= set(r) for r in records)
    setup = prepare(config)
    _, held_out = validation_split(config, len(setup.dataset.train))
    x, y = setup.dataset.train.x[held_out], setup.dataset.train.y[held_out]
    own = [evaluate(agent.model, x, y, 1000, torch.device("cpu")) for agent in engine.agents]  # recomputed
    last = records[-1]
    assert len(set(own)) > 1  # the agents' own models differ (CHOCO, no merge before the record)
    assert last["mean_local_validation_accuracy"] == pytest.approx(float(np.mean(own)), abs=1e-12)
    assert last["min_local_validation_accuracy"] == min(own)
    assert last["std_local_validation_accuracy"] == pytest.approx(float(np.std(own)), abs=1e-12)


def test_records_have_no_validation_accuracy_without_a_fraction(tmp_path):
    result = run(load_config(base=small(runtime__engine="reference")), progress=False)
    assert all("merged_validation_accuracy" not in r for r in result.records)
    assert all("mean_local_validation_accuracy" not in r for r in result.records)
    assert "merged_validation_accuracy" not in result.summary


def test_the_ray_engine_reports_the_reference_validation_accuracy(ray_cluster):
    from raygossip.engines.reference import ReferenceEngine

    config = load_config(base=small(eval__validation_fraction=0.2))
    expected = ReferenceEngine(config).run(progress=False)["records"]
    engine, outcome = run_ray(config, progress=False)
    engine.close()
    for key in ("merged_validation_accuracy", "mean_local_validation_accuracy", "min_local_validation_accuracy"):
        got = [r[key] for r in outcome["records"]]
        assert got == pytest.approx([r[key] for r in expected], abs=1e-6), key
