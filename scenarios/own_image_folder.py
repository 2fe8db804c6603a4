"""Your own model and data, (b): a CNN written here, gossip-trained on a folder of PNG images read lazily.

The example first draws its image folder (once; `--set data.params.root=DIR` to choose where, default
runs/own_image_folder-images): 32 x 32 RGB images of four shapes (circle, square, triangle, cross) of random
size, place and colours (light on a noisy dark background), in torchvision's ImageFolder layout (`train/<class>/*.png`,
`test/<class>/*.png`). The loader (`image_folder`) returns two `torchvision.datasets.ImageFolder`s: nothing is
read until an agent draws a batch, each agent reading only its own partition's files (Dirichlet alpha 0.5 over
the folder's classes, from the ImageFolder's `targets`). The model (`small_cnn`: two conv blocks with batch
norm, global average pooling, a linear head) is ordinary user code referenced by import path:

    model.name: scenarios.own_image_folder:small_cnn     data.name: scenarios.own_image_folder:image_folder

It compares 8 agents on a ring (D-PSGD, final merge with batch-norm re-estimation) against parallel SGD and
local training without communication, and prints the test accuracy of each (a guess is 25 %).

    python -m scenarios own_image_folder                  # cpu scale: 640 training images, about a minute
    python -m scenarios own_image_folder --scale smoke    # seconds (tests)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from torch import nn


from scenarios import common
from scenarios.common import Outcome, Variant

SCENARIO = "own_image_folder"
HERE = "scenarios.own_image_folder"
SHAPES = ("circle", "cross", "square", "triangle")
SIZE = 32
DEFAULT_ROOT = common.REPO / "runs" / f"{SCENARIO}-images"


# ---------------------------------------------------------------- the user's data


def _mask(shape: str, rng: np.random.Generator) -> np.ndarray:
    """A boolean SIZE x SIZE mask of one shape, of random size and place."""
    r = rng.uniform(4, 10)
    cx, cy = rng.uniform(r + 1, SIZE - r - 1, size=2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8)
    if shape == "cross":
        return ((np.abs(dx) <= r / 4) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r / 4) & (np.abs(dx) <= r))
    return (dy <= r * 0.8) & (dy >= -r * 0.8 + 1.6 * np.abs(dx))  # triangle, apex up


def draw(shape: str, rng: np.random.Generator) -> np.ndarray:
    """One SIZE x SIZE x 3 uint8 image: a shape in a random light colour on a noisy dark background."""
    background, ink = rng.integers(0, 120, size=3), rng.integers(136, 256, size=3)
    image = np.broadcast_to(background, (SIZE, SIZE, 3)).astype(np.float32)
    image = np.where(_mask(shape, rng)[..., None], ink, image) + rng.normal(0, 25, size=(SIZE, SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def make_image_folder(root: str | Path, per_class: int = 160, test_per_class: int = 40, seed: int = 0) -> Path:
    """Write root/train/<shape>/<k>.png and root/test/<shape>/<k>.png (skipped when they are already there)."""
    from PIL import Image

    root = Path(root)
    marker = root / f".complete-{per_class}-{test_per_class}-{seed}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                Image.fromarray(draw(shape, rng)).save(folder / f"{k:04d}.png")
    marker.touch()
    return root


def image_folder(*, root: str = str(DEFAULT_ROOT), per_class: int = 160, test_per_class: int = 40):
    """The loader: (train, test) torchvision ImageFolders over the generated PNGs, decoded when indexed."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    folder = make_image_folder(root, per_class, test_per_class)
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.25,) * 3)])
    return (ImageFolder(str(folder / "train"), transform=to_tensor),
            ImageFolder(str(folder / "test"), transform=to_tensor))


# ---------------------------------------------------------------- the user's model


def small_cnn(num_classes: int, input_shape: tuple[int, ...], *, width: int = 16) -> nn.Module:
    """Two conv-BN-ReLU-pool blocks, global average pooling and a linear head (input_shape read from the data)."""
    channels = input_shape[0]

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(channels, width), *block(width, 2 * width), *block(2 * width, 2 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


# ---------------------------------------------------------------- the scenario

CPU = {
    "data": {"name": f"{HERE}:image_folder", "params": {"root": str(DEFAULT_ROOT)},
             "partition": {"kind": "dirichlet", "alpha": 0.5}},
    "model": {"name": f"{HERE}:small_cnn", "params": {"width": 16}},
    "agents": {"count": 8},
    "topology": {"name": "ring", "weights": "uniform"},
    "train": {"epochs": 6, "steps_per_epoch": 20, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
    "gossip": common.EXACT_GOSSIP,
    "schedule": {"averaging_rate": {"kind": "constant", "gamma0": 1.0}, "communication": {"kind": "every"},
                 "final_merge": {"enabled": True, "bn": "local", "bn_batches": 5}},
    "eval": {"every": 2, "local": True, "batch_size": 160},
    "runtime": {"engine": "reference", "progress": False, "num_cpus_per_agent": 0.25,
                "agents_per_actor": 4, "wait_timeout_s": 300.0},
}
SMOKE = {
    "data": {"params": {"per_class": 24, "test_per_class": 8}},
    "model": {"params": {"width": 8}},
    "agents": {"count": 4},
    "train": {"epochs": 3, "steps_per_epoch": 6, "batch_size": 8},
    "eval": {"every": 1, "batch_size": 32},
    "runtime": {"agents_per_actor": 2, "num_cpus_per_agent": 0.25, "wait_timeout_s": 60.0},
}
GOSSIP = "D-PSGD ring + final merge"


def base_of(scale: str, overrides: Sequence[str] = ()) -> dict:
    """The example's own config (no YAML file): cpu, or smoke shrunk to seconds."""
    return common.scaled_base(CPU, SMOKE, scale, overrides)


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    base = base_of(scale, overrides)
    return [common.variant(SCENARIO, base, GOSSIP), common.parallel_sgd(SCENARIO, base),
            common.local_only(SCENARIO, base, merge=False)]


def report(outcomes: Sequence[Outcome]) -> str:
    first = outcomes[0].config
    return (f"A user CNN on a generated image folder ({len(SHAPES)} shapes, read lazily), {first.agents.count} "
            f"agents, Dirichlet alpha {first.data.partition.alpha:g} over the classes; a guess is "
            f"{1 / len(SHAPES):.0%}.\n\n" + common.summary_table(outcomes))


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report)
