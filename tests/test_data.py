"""Tests for the data layer: dataset loading, partitioners, heterogeneity report, augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raygossip.data import (
    DATASETS,
    PARTITIONERS,
    augment_batch,
    heterogeneity_report,
    load_dataset,
    partition,
)
from raygossip.errors import UserError

MNIST_ROOT = str(Path(__file__).resolve().parents[2] / "shared" / "data")  # shared/ sits beside the clone
HAVE_MNIST = (Path(MNIST_ROOT) / "MNIST" / "raw" / "train-labels-idx1-ubyte").exists()


def needs_mnist(test):
    """Real-MNIST tests fail loudly (never skip) when the shared data is missing."""
    return test


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def mnist_labels() -> np.ndarray:
    assert HAVE_MNIST, f"real MNIST is expected under {MNIST_ROOT}/MNIST/raw (the shared data beside the repo)"
    return load_dataset("mnist", MNIST_ROOT).train.y.numpy()


def assert_user_error(err: pytest.ExceptionInfo, field: str) -> None:
    assert err.value.field == field
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{field}: ")


# ---------------------------------------------------------------- datasets


def test_registry_names():
    assert set(DATASETS) == {"digits", "mnist", "fashionmnist", "cifar10", "cifar100", "imagenette"}
    assert set(PARTITIONERS) == {"iid", "by_key", "dirichlet", "dirichlet_lin", "preference", "shards"}


def test_digits_shapes_and_fixed_split(digits):
    assert digits.name == "digits" and digits.num_classes == 10 and digits.input_shape == (64,)
    assert not digits.augment
    assert len(digits.train) + len(digits.test) == 1797
    assert len(digits.test) == 360
    for split in (digits.train, digits.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[1:] == (64,)
        assert set(split.y.unique().tolist()) == set(range(10))
    assert abs(digits.train.x.mean().item()) < 1e-4
    counts = torch.bincount(digits.test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    # the split uses a fixed seed: a fresh (uncached) load gives the same test set
    from raygossip.data import clear_cache

    clear_cache()
    again = load_dataset("digits")
    assert again is not digits
    assert torch.equal(again.test.x, digits.test.x) and torch.equal(again.test.y, digits.test.y)


def test_load_is_cached(digits):
    assert load_dataset("digits") is load_dataset("digits")


@needs_mnist
def test_mnist_loads_normalized():
    ds = load_dataset("mnist", MNIST_ROOT)
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and not ds.augment
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.train.x.dtype == torch.float32
    assert ds.train.y.dtype == torch.int64
    assert abs(ds.train.x.mean().item()) < 0.01
    assert abs(ds.train.x.std().item() - 1.0) < 0.01
    assert load_dataset("mnist", MNIST_ROOT) is ds


@needs_mnist
def test_mnist_resized():
    ds = load_dataset("mnist", MNIST_ROOT, image_size=32)
    assert ds.input_shape == (1, 32, 32) and ds.test.x.shape == (10000, 1, 32, 32)


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_root_is_one_line_user_error(tmp_path, name, folder):
    with pytest.raises(UserError) as err:
        load_dataset(name, str(tmp_path / "nowhere"))
    assert_user_error(err, "data.root")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "data.download: true" in str(err.value) and folder in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_unknown_dataset():
    with pytest.raises(UserError) as err:
        load_dataset("svhn")
    assert_user_error(err, "data.name")
    assert "mnist" in str(err.value)


def test_digits_rejects_image_size():
    with pytest.raises(UserError) as err:
        load_dataset("digits", image_size=16)
    assert_user_error(err, "data.image_size")


# ---------------------------------------------------------------- partitioners

ALL_KINDS = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("dirichlet_lin", {"alpha": 0.5}),
    ("preference", {"alpha": 0.5}),
    ("shards", {"shards_per_agent": 2}),
]


@pytest.mark.parametrize(("kind", "params"), ALL_KINDS)
def test_deterministic_for_seed(digits, kind, params):
    y = digits.train.y.numpy()
    a = partition(kind, y, 8, seed=3, params=params)
    b = partition(kind, y, 8, seed=3, params=params)
    c = partition(kind, y, 8, seed=4, params=params)
    assert len(a) == 8
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in a)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


@pytest.mark.parametrize(("kind", "params"), [k for k in ALL_KINDS if k[0] in ("iid", "dirichlet", "shards")])
@pytest.mark.parametrize("n", [1, 7, 10, 16])
def test_every_sample_exactly_once(digits, kind, params, n):
    y = digits.train.y.numpy()
    parts = partition(kind, y, n, seed=0, params=params)
    assert len(parts) == n and all(len(p) > 0 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))


@pytest.mark.parametrize("kind", ["iid", "shards"])
def test_near_equal_sizes(digits, kind):
    sizes = [len(p) for p in partition(kind, digits.train.y.numpy(), 10, seed=0)]
    assert max(sizes) - min(sizes) <= (1 if kind == "iid" else 2)


def test_shards_hold_few_classes(mnist_labels):
    report = heterogeneity_report(mnist_labels, partition("shards", mnist_labels, 20, seed=0), 10)
    assert report["classes_per_agent"]["max"] <= 4  # 2 shards, each straddling at most 2 classes


@pytest.mark.parametrize("n", [4, 10, 16, 25])
def test_dirichlet_lin_equal_shards_no_repeats(digits, n):
    y = digits.train.y.numpy()
    parts = partition("dirichlet_lin", y, n, seed=1, params={"alpha": 0.1})
    assert {len(p) for p in parts} == {len(y) // n}
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat) == n * (len(y) // n)
    assert flat.min() >= 0 and flat.max() < len(y)


def test_dirichlet_lin_is_heterogeneous(mnist_labels):
    tv = [
        heterogeneity_report(
            mnist_labels, partition("dirichlet_lin", mnist_labels, 16, seed=0, params={"alpha": a}), 10
        )["tv_distance"]["mean"]
        for a in (0.01, 1.0, 100.0)
    ]
    assert tv[0] > 0.5 and tv[2] < 0.1 and tv[0] > tv[1] > tv[2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_small_alpha_about_one_class_per_agent(mnist_labels, seed):
    parts = partition("dirichlet", mnist_labels, 10, seed=seed, params={"alpha": 0.01})
    report = heterogeneity_report(mnist_labels, parts, 10)
    counts = np.array(report["class_counts"])
    # each class sits almost entirely on one agent; agents hold one or two classes, not ten
    assert (counts.max(axis=0) / counts.sum(axis=0)).mean() > 0.8
    assert report["classes_per_agent"]["mean"] <= 2.5
    assert report["dominant_class_share"]["mean"] > 0.7
    assert report["tv_distance"]["mean"] > 0.75


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_large_alpha_near_iid(mnist_labels, seed):
    parts = partition("dirichlet", mnist_labels, 10, seed=seed, params={"alpha": 100.0})
    report = heterogeneity_report(mnist_labels, parts, 10)
    assert report["tv_distance"]["mean"] < 0.1
    assert report["classes_per_agent"]["min"] == 10


def test_dirichlet_balance_caps_sizes(mnist_labels):
    free = partition("dirichlet", mnist_labels, 10, seed=0, params={"alpha": 0.3})
    capped = partition("dirichlet", mnist_labels, 10, seed=0, params={"alpha": 0.3, "balance": True})
    assert max(map(len, capped)) < max(map(len, free))
    assert np.array_equal(np.sort(np.concatenate(capped)), np.arange(len(mnist_labels)))


def test_dirichlet_impossible_alpha_errors():
    y = np.repeat(np.arange(10), 100)
    with pytest.raises(UserError) as err:
        partition("dirichlet", y, 200, seed=0, params={"alpha": 1e-4})
    assert_user_error(err, "data.partition.min_samples")


def test_preference_with_replacement(digits):
    y = digits.train.y.numpy()
    parts = partition("preference", y, 5, seed=0, params={"alpha": 0.1, "samples_per_agent": 3000})
    assert [len(p) for p in parts] == [3000] * 5  # more than the 1437 training samples: repeats
    assert all(len(np.unique(p)) < len(p) for p in parts)
    assert all(p.min() >= 0 and p.max() < len(y) for p in parts)
    default = partition("preference", y, 5, seed=0, params={"alpha": 0.1})
    assert [len(p) for p in default] == [len(y) // 5] * 5


def test_preference_follows_alpha(mnist_labels):
    def tv(alpha: float) -> float:
        parts = partition("preference", mnist_labels, 10, seed=0, params={"alpha": alpha})
        return heterogeneity_report(mnist_labels, parts, 10)["tv_distance"]["mean"]

    assert tv(0.01) > 0.8 and tv(100.0) < 0.1


# ---------------------------------------------------------------- report


def test_heterogeneity_report_table():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 4, 5, 6, 7])]
    r = heterogeneity_report(labels, parts, 4)
    json.dumps(r)
    assert r["class_counts"] == [[2, 0, 0, 0], [0, 1, 4, 0]]
    assert r["samples_per_agent"] == {"min": 2.0, "mean": 3.5, "max": 5.0}
    assert r["classes_per_agent"]["mean"] == 1.5
    assert r["dominant_class_share"]["max"] == 1.0
    assert r["dominant_class_share"]["min"] == pytest.approx(0.8)
    # global = (.25, .25, .5, 0); agent0 = (1,0,0,0): TV .75; agent1 = (0,.2,.8,0): TV .3
    assert r["tv_distance"]["mean"] == pytest.approx(0.525)
    assert r["tv_distance"]["max"] == pytest.approx(0.75)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kind", "n", "params", "field"),
    [
        ("nope", 4, {}, "data.partition.kind"),
        ("dirichlet", 4, {"alpha": 0}, "data.partition.alpha"),
        ("dirichlet_lin", 4, {"alpha": -1.0}, "data.partition.alpha"),
        ("preference", 4, {"alpha": float("nan")}, "data.partition.alpha"),
        ("iid", 0, {}, "agents.count"),
        ("dirichlet", 5000, {}, "agents.count"),
        ("iid", 4, {"alpha": 1.0}, "data.partition.alpha"),
        ("dirichlet", 4, {"beta": 1.0}, "data.partition.beta"),
        ("shards", 4, {"shards_per_agent": 0}, "data.partition.shards_per_agent"),
        ("shards", 1000, {"shards_per_agent": 2}, "data.partition.shards_per_agent"),
        ("preference", 4, {"samples_per_agent": 0}, "data.partition.samples_per_agent"),
    ],
)
def test_partition_errors(digits, kind, n, params, field):
    with pytest.raises(UserError) as err:
        partition(kind, digits.train.y.numpy(), n, seed=0, params=params)
    assert_user_error(err, field)


def test_error_messages_name_what_is_wrong(digits):
    y = digits.train.y.numpy()
    with pytest.raises(UserError) as err:
        partition("iid", y, 5000, seed=0)
    assert str(err.value) == "agents.count: 5000 agents but only 1437 training samples"
    with pytest.raises(UserError) as err:
        partition("dirichlet", y, 4, seed=0, params={"beta": 1.0})
    assert "alpha" in str(err.value) and "balance" in str(err.value)
    with pytest.raises(UserError) as err:
        partition("nope", y, 4, seed=0)
    assert "dirichlet_lin" in str(err.value)


# ---------------------------------------------------------------- augmentation


def reference_augment(x: torch.Tensor, seed: int, pad: int = 4) -> torch.Tensor:
    """Per-sample loop drawing the same random numbers as augment_batch."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    shift = torch.randint(0, 2 * pad + 1, (2, n), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    out = []
    for i in range(n):
        crop = padded[i, :, shift[0, i] : shift[0, i] + h, shift[1, i] : shift[1, i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_augment_batch_matches_reference_and_is_deterministic():
    x = torch.randn(16, 3, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(7))
    b = augment_batch(x, torch.Generator().manual_seed(7))
    c = augment_batch(x, torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    assert torch.equal(a, reference_augment(x, 7))


def test_augment_batch_reflect_and_gray():
    x = torch.randn(5, 1, 28, 28)
    out = augment_batch(x, torch.Generator().manual_seed(0), mode="reflect")
    assert out.shape == x.shape and not torch.equal(out, x)
    assert torch.isin(out, x).all()  # reflect padding only copies existing pixels


# ---------------------------------------------------------------- dirichlet with a minimum shard size


@pytest.mark.parametrize("alpha, agents, need", [(0.05, 12, 32), (0.05, 16, 32), (0.1, 16, 64), (0.05, 12, 10)])
def test_dirichlet_min_samples_makes_the_papers_alphas_work_on_mnist(mnist_labels, alpha, agents, need):
    parts = partition("dirichlet", mnist_labels, agents, seed=0, params={"alpha": alpha, "min_samples": need})
    assert min(len(p) for p in parts) >= need
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(mnist_labels)))  # every sample once
    report = heterogeneity_report(mnist_labels, parts, 10)
    assert report["dominant_class_share"]["mean"] > 0.5  # still strongly non-IID (IID: about 0.11)


def test_dirichlet_alpha_005_with_12_agents_needed_the_minimum(mnist_labels):
    """Without a minimum, seed 0's first non-empty draw leaves an agent fewer samples than one minibatch."""
    bare = partition("dirichlet", mnist_labels, 12, seed=0, params={"alpha": 0.05})
    assert min(len(p) for p in bare) < 32
    fixed = partition("dirichlet", mnist_labels, 12, seed=0, params={"alpha": 0.05, "min_samples": 32})
    assert min(len(p) for p in fixed) >= 32


def test_dirichlet_min_samples_1_is_the_old_rule():
    y = np.repeat(np.arange(10), 300)
    a = partition("dirichlet", y, 8, seed=4, params={"alpha": 0.3})
    b = partition("dirichlet", y, 8, seed=4, params={"alpha": 0.3, "min_samples": 1})
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("params", [{"alpha": 0.01, "min_samples": 300}, {"alpha": 0.05, "min_samples": 251}])
def test_dirichlet_min_samples_out_of_reach_is_a_one_line_error(params):
    y = np.repeat(np.arange(10), 300)  # 3000 samples, 12 agents: 250 each at most on average
    with pytest.raises(UserError) as err:
        partition("dirichlet", y, 12, seed=0, params=params)
    assert_user_error(err, "data.partition.min_samples")


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_dirichlet_min_samples_must_be_a_positive_integer(value):
    with pytest.raises(UserError) as err:
        partition("dirichlet", np.repeat(np.arange(10), 30), 3, seed=0, params={"alpha": 1.0, "min_samples": value})
    assert_user_error(err, "data.partition.min_samples")


# ---------------------------------------------------------------- preference, redrawn every batch (resample)


def test_preference_resample_preferences_are_a_pure_function_of_the_seed():
    from raygossip.data.partition import preference_weights

    w = preference_weights(16, 10, seed=3, alpha=0.1)
    assert w.shape == (16, 10) and np.allclose(w.sum(axis=1), 1.0)
    assert np.array_equal(w, preference_weights(16, 10, seed=3, alpha=0.1))
    assert not np.array_equal(w, preference_weights(16, 10, seed=4, alpha=0.1))
    assert (w.max(axis=1) > 0.5).mean() > 0.5  # alpha 0.1: most agents prefer one class strongly


def test_resample_batches_are_fresh_draws_from_the_preference(mnist_labels):
    from raygossip.data.partition import agent_preference, resample_batch

    pools, p = agent_preference(mnist_labels, 8, seed=1, alpha=0.5, agent=2)
    a = resample_batch(pools, p, 64, seed=1, agent=2, draw=7)
    assert np.array_equal(a, resample_batch(pools, p, 64, seed=1, agent=2, draw=7))
    assert not np.array_equal(a, resample_batch(pools, p, 64, seed=1, agent=2, draw=8))
    assert not np.array_equal(a, resample_batch(pools, p, 64, seed=1, agent=3, draw=7))
    drawn = np.concatenate([resample_batch(pools, p, 64, 1, 2, d) for d in range(400)])
    share = np.bincount(mnist_labels[drawn], minlength=10) / drawn.size
    np.testing.assert_allclose(share, p, atol=0.02)  # the class mix is p_k
    assert len(np.unique(drawn)) > 10_000  # from the whole training set, far beyond one shard of N // n


def test_preference_resample_shard_is_one_draw_from_the_same_preferences(mnist_labels):
    from raygossip.data.partition import preference_weights

    parts = partition("preference", mnist_labels, 8, seed=1, params={"alpha": 0.5, "resample": True})
    w = preference_weights(8, 10, seed=1, alpha=0.5)
    for k, part in enumerate(parts):
        assert len(part) == len(mnist_labels) // 8
        share = np.bincount(mnist_labels[part], minlength=10) / len(part)
        np.testing.assert_allclose(share, w[k], atol=0.03)


def test_prepare_redraws_dirichlet_until_every_agent_holds_a_minibatch():
    from raygossip.config import load_config
    from raygossip.engines.common import prepare

    setup = prepare(load_config(base={"agents": {"count": 12}, "train": {"batch_size": 16},
                                      "data": {"partition": {"kind": "dirichlet", "alpha": 0.1}}}))
    assert min(len(s) for s in setup.shards) >= 16
    with pytest.raises(UserError) as err:  # 1437 digits over 40 agents at alpha 0.001: never a minibatch each
        prepare(load_config(base={"agents": {"count": 40}, "train": {"batch_size": 16},
                                  "data": {"partition": {"kind": "dirichlet", "alpha": 0.001}}}))
    assert_user_error(err, "data.partition.min_samples")
    assert "train.batch_size 16" in err.value.message
    with pytest.raises(UserError) as err:  # no split can give 8 agents 500 samples each: the batch size is named
        prepare(load_config(base={"train": {"batch_size": 500}}))
    assert_user_error(err, "train.batch_size")
