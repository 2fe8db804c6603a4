"""A user's data: call their loader, check what it returned, read class labels and shapes from the data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

from raygossip.data.datasets import Dataset, LazySplit, Split, class_labels, stack_samples
from raygossip.errors import UserError
from raygossip.registry import one_line

FIELD = "data.name"


def load_user_data(loader: Callable[..., Any], params: Mapping[str, Any], name: str) -> Dataset:
    """Call a user loader with data.params; it returns a Dataset, or (train, test) map-style torch Datasets of
    (input, target) samples (read lazily: only the indices an agent draws are ever read)."""
    try:
        result = loader(**params)
    except UserError:
        raise
    except Exception as err:  # the user's loader failed
        raise UserError(FIELD, f"the data loader {name!r} raised {one_line(err)}") from None
    if isinstance(result, Dataset):
        return result
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise UserError(FIELD, f"the data loader {name!r} returned {type(result).__name__}; it must return a "
                               "raygossip.data.Dataset or a pair (train, test) of map-style torch Datasets")
    train, test = (_split(part, which, name) for part, which in zip(result, ("train", "test")))
    labels = [part.labels for part in (train, test)]
    num_classes = None
    if all(lab is not None for lab in labels):
        num_classes = int(max(int(lab.max(initial=0)) for lab in labels)) + 1
    elif isinstance(train, Split) and isinstance(test, Split) and _integer_targets(train):
        num_classes = _largest_target(train, test) + 1  # token ids: the vocabulary is at least the largest id + 1
    x, _ = train.batch(torch.tensor([0]))
    return Dataset(name, train, test, num_classes, tuple(x.shape[1:]), False)


def _split(part: Any, which: str, name: str) -> Split | LazySplit:
    """One (train or test) torch Dataset as a Split (a TensorDataset of two tensors: kept as it is) or LazySplit."""
    if isinstance(part, TensorDataset) and len(part.tensors) == 2:
        x, y = part.tensors
        if len(x) == 0:
            raise UserError(FIELD, f"the {which} set of {name!r} is empty")
        return Split(x, y)
    if not isinstance(part, TorchDataset) or not hasattr(part, "__getitem__") or not hasattr(part, "__len__"):
        raise UserError(FIELD, f"the {which} set of {name!r} is a {type(part).__name__}, not a map-style "
                               "torch.utils.data.Dataset (with __len__ and __getitem__)")
    if len(part) == 0:
        raise UserError(FIELD, f"the {which} set of {name!r} is empty")
    try:
        sample = part[0]
        ok = isinstance(sample, (tuple, list)) and len(sample) == 2
        if ok:
            stack_samples([sample])
    except Exception as err:  # a sample that cannot be read or stacked
        raise UserError(FIELD, f"reading sample 0 of the {which} set of {name!r} raised {one_line(err)}") from None
    if not ok:
        raise UserError(FIELD, f"sample 0 of the {which} set of {name!r} is a {type(sample).__name__}; samples must "
                               "be (input, target) pairs")
    return LazySplit(part, _read_labels(part))


def _read_labels(part: Any) -> np.ndarray | None:
    """Class labels of a lazy split: its `targets` attribute when it has one (torchvision's datasets do), else the
    targets of its samples when they are integer scalars (reads every sample once); None for other targets."""
    targets = getattr(part, "targets", None)
    if targets is not None:
        return class_labels(np.asarray(targets))
    first = torch.as_tensor(part[0][1])
    if first.dim() != 0 or first.is_floating_point() or first.is_complex():
        return None
    return class_labels(np.asarray([int(part[i][1]) for i in range(len(part))], dtype=np.int64))


def _integer_targets(split: Split | LazySplit) -> bool:
    _, y = split.batch(torch.tensor([0]))
    return not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)


def _largest_target(*splits: Split | LazySplit) -> int:
    """The largest integer target over the splits (held in memory: a lazy split is not read whole for this)."""
    return max(int(split.y.max()) for split in splits)


def materialize(split: Split | LazySplit, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the samples at `index` (all when None) as tensors: how evaluation sets travel."""
    if isinstance(split, Split):
        return (split.x, split.y) if index is None else split.batch(index)
    return split.batch(torch.arange(len(split)) if index is None else index)
