"""The worked examples of user code (scenarios/own_*.py) at the smoke scale: they learn, on both engines, equally."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # scenarios/ sits beside the package, not inside it

from raygossip.data.datasets import LazySplit  # noqa: E402
from raygossip.engines.common import prepare  # noqa: E402
from scenarios import common, own_image_folder, own_language_model, own_regression  # noqa: E402

EXAMPLES = [own_language_model, own_image_folder, own_regression]


def smoke(module, tmp_path: Path) -> list[common.Variant]:
    """The example's smoke variants; the image folder is drawn under tmp_path."""
    overrides = [f"data.params.root={tmp_path / 'images'}"] if module is own_image_folder else []
    return module.variants("smoke", overrides)


def on_ray(config):
    """The same config on the Ray engine (sync, as the examples are), two agents per actor."""
    return dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, engine="ray"))


def first_and_last_train_loss(outcome: common.Outcome) -> tuple[float, float]:
    losses = [record["train_loss"] for record in outcome.records if record.get("train_loss") is not None]
    return losses[0], losses[-1]


@pytest.mark.parametrize("module", EXAMPLES, ids=lambda m: m.SCENARIO)
def test_example_configs_name_user_code_by_import_path(module, tmp_path):
    for label, config in smoke(module, tmp_path):
        assert config.model.name.startswith(f"scenarios.{module.SCENARIO}:"), label
        assert config.data.name.startswith(f"scenarios.{module.SCENARIO}:"), label
    cpu = dict(module.variants("cpu"))
    assert len(cpu) >= 2 and all(config.runtime.engine == "reference" for config in cpu.values())


def test_language_model_agents_hold_contiguous_sections_of_the_files():
    label, config = own_language_model.variants("smoke")[0]
    setup = prepare(config)
    train = setup.dataset.train
    assert isinstance(train, LazySplit)
    per_agent = own_language_model.SECTIONS // config.agents.count
    main = []  # each agent's per_agent most frequent sections, and the share of its windows they hold
    for shard in setup.shards:
        counts = np.bincount([own_language_model.section_of(train.source[int(i)]) for i in shard],
                             minlength=own_language_model.SECTIONS)
        top = sorted(np.argsort(-counts, kind="stable")[:per_agent].tolist())
        assert counts[top].sum() >= 0.95 * len(shard)  # by_key: whole sections (a repeated window may stray)
        assert top == list(range(top[0], top[0] + per_agent))  # neighbouring sections: neighbouring files
        main += top
    assert sorted(main) == list(range(own_language_model.SECTIONS))  # each section to one agent
    x, y = train.source[int(setup.shards[0][0])]
    assert x.shape == y.shape == (config.data.params["seq_len"],) and torch.equal(x[1:], y[:-1])  # y: the next char


def test_language_model_learns_and_says_how_far_from_parallel_sgd(tmp_path, capsys):
    out = tmp_path / "lm"
    assert own_language_model.COMMAND(["--scale", "smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "against parallel SGD" in printed and "at equal steps: " in printed and "%, within 10%." in printed
    summaries = {p.name: json.loads((p / "summary.json").read_text()) for p in out.iterdir()}
    for name, summary in summaries.items():
        assert summary["metric"] == {"name": "perplexity", "direction": "min"}, name
        assert 1.0 < summary["merged_test_perplexity"] < own_language_model.VOCAB / 2, name  # far below a uniform guess


def test_image_folder_is_written_once_and_read_lazily(tmp_path):
    train, test = own_image_folder.image_folder(root=str(tmp_path / "images"), per_class=3, test_per_class=2)
    assert (len(train), len(test), train.classes) == (12, 8, list(own_image_folder.SHAPES))
    x, y = train[0]
    assert x.shape == (3, own_image_folder.SIZE, own_image_folder.SIZE) and y == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "images").rglob("*.png")}
    own_image_folder.image_folder(root=str(tmp_path / "images"), per_class=3, test_per_class=2)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "images").rglob("*.png")} == before
    shapes = [own_image_folder.draw(shape, np.random.default_rng(0)) for shape in own_image_folder.SHAPES]
    assert all(s.shape == (32, 32, 3) and s.dtype == np.uint8 for s in shapes)
    assert len({s.tobytes() for s in shapes}) == len(shapes)


def test_regression_learns_far_below_predicting_the_mean(tmp_path, capsys):
    out = tmp_path / "reg"
    assert own_regression.COMMAND(["--scale", "smoke", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Predicting the mean" in printed and "| parallel SGD | 0 |" in printed
    label, config = own_regression.variants("smoke")[0]
    variance = own_regression.target_variance(config)
    summary = json.loads((out / f"{common.slug(label)}-seed0" / "summary.json").read_text())
    assert summary["metric"] == {"name": "mse", "direction": "min"}
    assert summary["merged_test_mse"] < 0.8 * variance


@pytest.mark.parametrize("module", EXAMPLES, ids=lambda m: m.SCENARIO)
def test_example_on_the_ray_engine_equals_the_reference_engine(module, ray_cluster, tmp_path):
    """Each example's gossip variant, sync: the Ray engine's numbers are the reference engine's, bit for bit,
    and its training loss falls."""
    label, config = smoke(module, tmp_path)[0]
    reference, ray = common.run_variants([(label, config), (label + " (ray)", on_ray(config))], [0],
                                         tmp_path / "runs", log=None)
    assert ray.summary["engine"] == "ray" and reference.summary["engine"] == "reference"
    metric = reference.summary["metric"]["name"]
    for key in (f"merged_test_{metric}", f"mean_local_test_{metric}", "consensus_distance"):
        assert ray.summary[key] == reference.summary[key], key
    assert [r.get("train_loss") for r in ray.records] == [r.get("train_loss") for r in reference.records]
    first, last = first_and_last_train_loss(ray)
    assert last < first and math.isfinite(last)
    if module is own_language_model:
        assert last < math.log(own_language_model.VOCAB)  # below a uniform guess's cross-entropy


def test_lazy_bench_dataset_travels_without_its_images(tmp_path):
    """bench/lazy_data.py's memory-mapped dataset: what is pickled to an actor is its path, range and labels."""
    import pickle

    sys.path.insert(0, str(REPO / "bench"))
    import lazy_data

    train, test = lazy_data.memmap_images(root=str(tmp_path), samples=3000)
    x, y = train[7]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == int(train.targets[7])
    copy = pickle.loads(pickle.dumps(train))
    assert torch.equal(copy[7][0], x) and len(copy) == 3000 and len(test) == lazy_data.TEST
    images = (tmp_path / "images-3000.npy").stat().st_size
    assert len(pickle.dumps(train)) < 0.2 * images  # the labels (8 bytes a sample), not the 784-byte images
    assert x[0, 2 * y + 3, 10] > x[0, 2 * ((y + 1) % 10) + 3, 10]  # the class's bright bar
