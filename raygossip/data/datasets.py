"""Dataset loading (in-memory tensors or lazily read map-style datasets), the loader registry, batch augmentation."""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from raygossip.errors import UserError
from raygossip.registry import Registry, one_line

DIGITS_SPLIT_SEED = 0  # fixed, independent of the run seed, so the digits test set never changes
CACHE_SIZE = 4


@dataclass(frozen=True)
class Split:
    """One split held in memory: inputs x (the zoo's: float32 normalized N x C x H x W or N x D; a user's: any
    dtype) and targets y (class labels, token ids, regression values), indexed by the first dimension."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples at `index`, as one (inputs, targets) batch."""
        return self.x[index], self.y[index]

    @property
    def labels(self) -> np.ndarray | None:
        """Class labels (int64, one per sample) when the targets are those, else None."""
        return class_labels(self.y)


class LazySplit:
    """One split read on demand from a map-style torch Dataset of (input, target) samples: a batch stacks the
    samples at its indices, so no process holds the whole split. `labels` were read once in the driver."""

    def __init__(self, source: Any, labels: np.ndarray | None) -> None:
        self.source = source
        self.labels = labels

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(index) == 0:  # no samples: empty tensors shaped like one sample's
            x, y = stack_samples([self.source[0]])
            return x[:0], y[:0]
        return stack_samples([self.source[int(i)] for i in index])


@dataclass(frozen=True)
class Dataset:
    """A whole dataset, ready to be indexed by partitions: splits in memory (Split) or read lazily (LazySplit).
    num_classes is None when the targets are not integers (regression)."""

    name: str
    train: Split | LazySplit
    test: Split | LazySplit
    num_classes: int | None
    input_shape: tuple[int, ...]
    augment: bool


def class_labels(y: Any) -> np.ndarray | None:
    """y as int64 class labels when it is a 1-D integer array or tensor of non-negative values, else None."""
    array = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or (array.size and array.min() < 0):
        return None
    return array.astype(np.int64, copy=False)


def stack_samples(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) samples -> one (inputs, targets) batch; numbers and numpy arrays become tensors."""
    xs, ys = zip(*samples)
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.stack([torch.as_tensor(y) for y in ys])


@dataclass(frozen=True)
class _Vision:
    """How to read one torchvision dataset: its class, display name, folder and statistics."""

    display: str
    folder: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    augment: bool


_VISION = {
    "mnist": _Vision("MNIST", "MNIST/raw", (0.1307,), (0.3081,), 10, False),
    "fashionmnist": _Vision("FashionMNIST", "FashionMNIST/raw", (0.2860,), (0.3530,), 10, False),
    "cifar10": _Vision(
        "CIFAR-10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, True
    ),
    "cifar100": _Vision(
        "CIFAR-100", "cifar-100-python", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 100, True
    ),
    "imagenette": _Vision(
        "Imagenette", "imagenette2-160", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 10, True
    ),
}


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 scaled to [0, 1] and standardized per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - m).div_(s)


def _resize(x: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Resize a float image batch to image_size x image_size (no-op when None or already that size)."""
    if image_size is None or tuple(x.shape[-2:]) == (image_size, image_size):
        return x
    size = (image_size, image_size)
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _to_nchw(data: object) -> torch.Tensor:
    """torchvision `.data` (N x H x W tensor, or N x H x W x C numpy) -> uint8 N x C x H x W."""
    t = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
    return t.unsqueeze(1) if t.dim() == 3 else t.permute(0, 3, 1, 2).contiguous()


def _split_from(ds: object, spec: _Vision, image_size: int | None) -> Split:
    """Convert one torchvision dataset object (with `.data`, `.targets`) into a Split."""
    x = _resize(_normalize(_to_nchw(ds.data), spec.mean, spec.std), image_size)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return Split(x.contiguous(), y)


def _torchvision(name: str, cls_name: str) -> Callable[..., Dataset]:
    """A loader for a torchvision dataset that exposes `.data` and `.targets`."""

    def load(root: str, download: bool, image_size: int | None) -> Dataset:
        import torchvision.datasets as tvd

        spec = _VISION[name]
        cls = getattr(tvd, cls_name)
        train = _split_from(cls(root, train=True, download=download), spec, image_size)
        test = _split_from(cls(root, train=False, download=download), spec, image_size)
        return Dataset(name, train, test, spec.num_classes, tuple(train.x.shape[1:]), spec.augment)

    load.__doc__ = f"Load {_VISION[name].display} through torchvision as normalized tensors."
    return load


def _imagenette_split(root: str, split: str, download: bool, image_size: int) -> Split:
    """Decode every Imagenette-160 image of a split, resized (short side) and center-cropped, in threads."""
    import torchvision.datasets as tvd
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.functional import center_crop, resize

    def loader(path: str) -> torch.Tensor:
        img = resize(decode_image(path, mode=ImageReadMode.RGB), [image_size], antialias=True)
        return center_crop(img, [image_size, image_size])

    ds = tvd.Imagenette(root, split=split, size="160px", download=download, loader=loader)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        items = list(pool.map(ds.__getitem__, range(len(ds))))
    spec = _VISION["imagenette"]
    x = _normalize(torch.stack([img for img, _ in items]), spec.mean, spec.std)
    return Split(x, torch.tensor([label for _, label in items], dtype=torch.int64))


def load_imagenette(root: str, download: bool, image_size: int | None) -> Dataset:
    """Load Imagenette (160px release), resized once to image_size (default 32) and normalized."""
    size = image_size or 32
    train = _imagenette_split(root, "train", download, size)
    test = _imagenette_split(root, "val", download, size)
    return Dataset("imagenette", train, test, 10, (3, size, size), True)


def load_digits(root: str, download: bool, image_size: int | None) -> Dataset:
    """scikit-learn's bundled 8x8 digits as 64 standardized features, fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    if image_size is not None:
        raise UserError("data.image_size", "digits is tabular (64 features); leave image_size unset")
    bunch = sk_digits()
    x = bunch.data.astype(np.float32) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, bunch.target, test_size=0.2, stratify=bunch.target, random_state=DIGITS_SPLIT_SEED
    )
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0
    train = Split(torch.from_numpy((x_tr - mean) / std), torch.as_tensor(y_tr, dtype=torch.int64))
    test = Split(torch.from_numpy((x_te - mean) / std), torch.as_tensor(y_te, dtype=torch.int64))
    return Dataset("digits", train, test, 10, (64,), False)


# The zoo's loaders are f(root, download, image_size); a user's loader (registered here, or named by
# `package.module:loader`) is called with data.params and returns a Dataset or a (train, test) pair (data.user).
DATASETS: Registry = Registry("data.name", "dataset")
register = DATASETS.register
for _name, _loader in (("digits", load_digits), ("mnist", _torchvision("mnist", "MNIST")),
                       ("fashionmnist", _torchvision("fashionmnist", "FashionMNIST")),
                       ("cifar10", _torchvision("cifar10", "CIFAR10")),
                       ("cifar100", _torchvision("cifar100", "CIFAR100")), ("imagenette", load_imagenette)):
    register(_name)(_loader)
ZOO = frozenset(DATASETS)

_cache: OrderedDict[tuple[str, str, int | None], Dataset] = OrderedDict()


def _load_uncached(name: str, root: str, download: bool, image_size: int | None) -> Dataset:
    """Call the registered loader, turning missing files and failed downloads into UserError."""
    try:
        return DATASETS[name](root, download, image_size)
    except UserError:
        raise
    except (RuntimeError, OSError) as err:
        spec = _VISION.get(name)
        if spec is None:
            raise
        if download:
            msg = f"could not fetch {spec.display} into '{root}': {one_line(err)}"
            raise UserError("data.download", msg) from None
        raise UserError(
            "data.root",
            f"no {spec.display} data under '{root}' (set data.download: true to fetch it, "
            f"or point data.root at a folder holding {spec.folder})",
        ) from None


def load_dataset(
    name: str, root: str = "data", download: bool = False, *, image_size: int | None = None
) -> Dataset:
    """Load a registered dataset into memory; repeated loads in one process come from a small cache."""
    if name not in DATASETS:
        raise UserError("data.name", f"unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))})")
    bad_size = isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8
    if image_size is not None and bad_size:
        raise UserError("data.image_size", f"must be an integer >= 8, got {image_size!r}")
    key = (name, "" if name == "digits" else os.path.abspath(os.path.expanduser(str(root))), image_size)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    ds = _load_uncached(name, os.path.expanduser(str(root)), download, image_size)
    _cache[key] = ds
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return ds


def clear_cache() -> None:
    """Forget every dataset loaded so far in this process."""
    _cache.clear()


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, *, pad: int = 4, mode: str = "constant"
) -> torch.Tensor:
    """Random crop (pad each side, zero or reflect) and random horizontal flip of an N x C x H x W batch.

    All randomness is drawn from `generator` (on its own device) and moved to the batch's device, so
    the result depends only on the generator state; the work is a single gather on x's device.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects N x C x H x W, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    shift = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device).to(x.device)
    flip = (torch.rand(n, generator=generator, device=generator.device) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    rows = shift[0][:, None] + torch.arange(h, device=x.device)
    cols_fwd = torch.arange(w, device=x.device).expand(n, w)
    cols = shift[1][:, None] + torch.where(flip[:, None], cols_fwd.flip(1), cols_fwd)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
