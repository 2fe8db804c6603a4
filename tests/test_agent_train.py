"""AgentCore.train_step with label smoothing and the per-element gradient clamp; next_batch in resample mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raygossip.validation import load_config
from raygossip.core.agent import AgentCore
from raygossip.data import load_dataset, partition
from raygossip.data.partition import agent_preference, resample_batch


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def agent(digits, train: dict | None = None, partition_spec: dict | None = None, agent_id: int = 1) -> AgentCore:
    base = {"seed": 2, "agents": {"count": 4}, "train": {"batch_size": 16, "lr": 0.05, "momentum": 0.9, **(train or {})},
            "data": {"partition": partition_spec or {"kind": "iid"}}}
    config = load_config(base=base)
    spec = config.data.partition
    params = {"alpha": spec.alpha, "resample": True} if spec.resample else {}
    shards = partition(spec.kind, digits.train.y.numpy(), 4, config.seed, params)
    return AgentCore(agent_id, config, digits, shards[agent_id], total_steps=50)


def old_train_step(core: AgentCore) -> float:
    """train_step as it was before label smoothing and the clamp existed."""
    core.model.train()
    x, y = core.next_batch()
    for group in core.optimizer.param_groups:
        group["lr"] = core.config.train.lr * core.lr_multiplier(core.step)
    loss = F.cross_entropy(core.model(x), y)
    core.flat.zero_grad()
    loss.backward()
    core.optimizer.step()
    core.step += 1
    return float(loss.detach())


def test_both_off_is_bit_identical_to_the_plain_step(digits):
    new, old = agent(digits), agent(digits)
    for _ in range(12):
        assert new.train_step() == old_train_step(old)
        assert torch.equal(new.flat.data, old.flat.data)


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_is_the_smoothed_cross_entropy(digits, smoothing):
    core, twin = agent(digits, {"label_smoothing": smoothing}), agent(digits)
    x, y = twin.next_batch()
    expected = F.cross_entropy(twin.model(x), y, label_smoothing=smoothing)
    assert core.train_step() == pytest.approx(float(expected.detach()), rel=1e-6)
    plain = agent(digits)
    plain.train_step()
    assert not torch.equal(core.flat.data, plain.flat.data)  # the smoothed loss moved the parameters differently


def test_grad_clip_value_clamps_every_gradient_element(digits):
    v = 1e-3
    core = agent(digits, {"grad_clip_value": v, "momentum": 0.0})
    twin = agent(digits, {"momentum": 0.0})
    before = core.flat.data.clone()
    core.train_step()
    x, y = twin.next_batch()
    twin.flat.zero_grad()
    F.cross_entropy(twin.model(x), y).backward()
    grad = twin.flat.param.grad
    assert (grad.abs() > v).any()  # the clamp matters for this batch
    torch.testing.assert_close(core.flat.data, before - 0.05 * grad.clamp(-v, v), rtol=0, atol=1e-7)
    assert core.flat.param.grad.abs().max() <= v


def test_resample_batches_are_fresh_draws_and_continue_after_a_snapshot(digits):
    spec = {"kind": "preference", "alpha": 0.5, "resample": True}
    core = agent(digits, partition_spec=spec)
    labels = digits.train.y.numpy()
    pools, p = agent_preference(labels, 4, 2, 0.5, 1)
    for draw in range(3):
        _, y = core.next_batch()
        expected = resample_batch(pools, p, 16, seed=2, agent=1, draw=draw)
        assert torch.equal(y, digits.train.y[torch.from_numpy(expected)])
    for _ in range(4):
        core.train_step()
    tensors, meta = core.snapshot()
    ahead = [core.next_batch()[1] for _ in range(3)]
    restored = agent(digits, partition_spec=spec)
    restored.restore(tensors, meta)
    assert all(torch.equal(a, restored.next_batch()[1]) for a in ahead)
    other = agent(digits, partition_spec=spec, agent_id=2)
    assert not torch.equal(other.next_batch()[1], agent(digits, partition_spec=spec).next_batch()[1])


def test_resample_never_draws_the_held_out_validation_part(digits):
    from raygossip.data.partition import holdout_split

    base = {"seed": 2, "agents": {"count": 4}, "train": {"batch_size": 64},
            "data": {"partition": {"kind": "preference", "alpha": 0.5, "resample": True}}}
    config = load_config(base={**base, "eval": {"validation_fraction": 0.3}})
    train, held_out = holdout_split(len(digits.train), 0.3, 2)
    core = AgentCore(1, config, digits, np.arange(8), total_steps=50)
    pools, p = agent_preference(digits.train.y.numpy()[train], 4, 2, 0.5, 1)
    for draw in range(5):
        index = train[resample_batch(pools, p, 64, seed=2, agent=1, draw=draw)]  # training part only
        assert not np.isin(index, held_out).any()
        x, y = core.next_batch()
        assert torch.equal(x, digits.train.x[torch.from_numpy(index)]) and torch.equal(y, digits.train.y[index])
    plain = AgentCore(1, load_config(base=base), digits, np.arange(8), total_steps=50)
    pools, p = agent_preference(digits.train.y.numpy(), 4, 2, 0.5, 1)  # no hold-out: the whole set, as before
    assert torch.equal(plain.next_batch()[1], digits.train.y[resample_batch(pools, p, 64, seed=2, agent=1, draw=0)])


def test_without_resample_the_shard_is_walked_as_before(digits):
    core = agent(digits, partition_spec={"kind": "preference", "alpha": 0.5})
    batches = len(core.shard) // 16
    seen = np.bincount(torch.cat([core.next_batch()[1] for _ in range(batches)]).numpy(), minlength=10)
    held = np.bincount(digits.train.y[core.shard].numpy(), minlength=10)
    assert seen.sum() == batches * 16 and (seen <= held).all()  # one pass over the fixed shard, no fresh draws
    assert held.sum() - seen.sum() < 16


def test_data_augment_overrides_the_datasets_default(digits):
    from dataclasses import replace

    import torch as t

    images = replace(digits, augment=False, train=replace(digits.train, x=digits.train.x.reshape(-1, 1, 8, 8)))
    plain = agent(images)
    forced = AgentCore(1, load_config(base={"seed": 2, "agents": {"count": 4}, "train": {"batch_size": 16},
                                            "data": {"partition": {"kind": "iid"}, "augment": True}}),
                       images, plain.shard.numpy(), total_steps=50)
    x_plain, _ = plain.next_batch()
    x_forced, _ = forced.next_batch()
    assert x_plain.shape == x_forced.shape == (16, 1, 8, 8) and not t.equal(x_plain, x_forced)
    off = replace(images, augment=True)
    same = AgentCore(1, load_config(base={"seed": 2, "agents": {"count": 4}, "train": {"batch_size": 16},
                                          "data": {"partition": {"kind": "iid"}, "augment": False}}),
                     off, plain.shard.numpy(), total_steps=50)
    assert t.equal(same.next_batch()[0], agent(images).next_batch()[0])  # augment false: the plain batch


def test_augment_true_on_flat_inputs_is_a_one_line_error():
    from raygossip.engines.common import prepare
    from raygossip.errors import UserError

    with pytest.raises(UserError) as caught:
        prepare(load_config(base={"data": {"name": "digits", "augment": True}}))
    assert caught.value.field == "data.augment" and "\n" not in str(caught.value)
