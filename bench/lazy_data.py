"""Memory of a Ray run on a lazily read dataset against the number of agents: the data is not copied per agent.

    python bench/lazy_data.py [--agents 16 64] [--actors 2] [--samples 200000] [--steps 10] [--modes lazy memory]

The dataset is a user loader (`memmap_images`, here): N x 1 x 28 x 28 uint8 images and their labels in two .npy
files (written once under --root, 157 MB at 200,000 samples), read through `np.load(mmap_mode="r")` one sample
at a time when an agent draws it; the dataset object that travels to the actors holds only the file's path
(it drops its memory map when pickled), so each actor maps the file itself and the kernel shares its pages.
`--modes memory` runs the same samples as in-memory TensorDatasets instead (the whole array in the driver,
in the object store once, mapped zero-copy by every actor), for contrast.

Each point runs in a fresh process with its own local Ray (bench/scale.py's `measure`): the peak proportional
set size (PSS: a shared page split among the processes that map it) summed over that process and all its
descendants (GCS, raylet, workers, the agent actors), sampled every 0.2 s. The number of actors is the same at
every agent count (`--actors`, agents_per_actor = agents / actors), so what grows from one point to the next is
the agents themselves: their models, optimizer state and gossip buffers, set against the model's size and the
dataset's size. LeNet-5 (61,706 parameters, 0.25 MB), ring, D-PSGD every step, sync, IID partition.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from scale import measure, total_memory_bytes  # noqa: E402

DEFAULT_ROOT = REPO / "runs" / "lazy-data"
SIDE, CLASSES, TEST = 28, 10, 2000


# ---------------------------------------------------------------- the user's data


def write_images(root: Path, samples: int, seed: int = 0) -> tuple[Path, Path]:
    """root/images-N.npy (N + TEST images, uint8: a class's bar on noise) and root/labels-N.npy, written once."""
    images, labels = root / f"images-{samples}.npy", root / f"labels-{samples}.npy"
    if images.exists() and labels.exists():
        return images, labels
    root.mkdir(parents=True, exist_ok=True)
    total = samples + TEST
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=total).astype(np.int64)
    out = np.lib.format.open_memmap(str(images) + ".part", mode="w+", dtype=np.uint8, shape=(total, 1, SIDE, SIDE))
    for start in range(0, total, 20_000):  # in chunks: the whole array is never in memory
        stop = min(total, start + 20_000)
        chunk = rng.integers(0, 96, size=(stop - start, 1, SIDE, SIDE), dtype=np.uint8)
        for c in range(CLASSES):  # class c: a bright horizontal bar at rows 2c+3, 2c+4
            chunk[y[start:stop] == c, 0, 2 * c + 3: 2 * c + 5, 4:24] = 220
        out[start:stop] = chunk
    out.flush()
    del out
    os.replace(str(images) + ".part", images)
    np.save(labels, y)
    return images, labels


class MemmapImages(TorchDataset):
    """Samples [lo, hi) of an images .npy file, read one at a time through a memory map opened on first use.

    Pickled (to reach an actor), it carries its path and range, not the map: each process maps the file itself.
    `targets` are the labels, for partitioners that need classes (a small int64 array)."""

    def __init__(self, images: Path, targets: np.ndarray, lo: int, hi: int) -> None:
        self.images, self.targets, self.lo, self.hi = str(images), targets, lo, hi
        self._map: np.ndarray | None = None

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._map is None:
            self._map = np.load(self.images, mmap_mode="r")
        x = torch.from_numpy(np.array(self._map[self.lo + index], dtype=np.float32)).div_(255.0).sub_(0.25)
        return x, int(self.targets[index])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}


def memmap_images(*, root: str = str(DEFAULT_ROOT), samples: int = 200_000, in_memory: bool = False):
    """The loader: (train, test) lazily read MemmapImages, or (in_memory) the same samples as TensorDatasets."""
    images, labels = write_images(Path(root), samples)
    y = np.load(labels)
    train = MemmapImages(images, y[:samples], 0, samples)
    test = MemmapImages(images, y[samples:], samples, samples + TEST)
    if not in_memory:
        return train, test
    whole = torch.from_numpy(np.load(images)).float().div_(255.0).sub_(0.25)
    return (TensorDataset(whole[:samples], torch.from_numpy(y[:samples])),
            TensorDataset(whole[samples:], torch.from_numpy(y[samples:])))


# ---------------------------------------------------------------- the bench


def spec_of(args: argparse.Namespace, agents: int, mode: str) -> dict:
    per_actor = -(-agents // args.actors)
    return {
        "name": "bench-lazy-data", "seed": 0,
        "data": {"name": "lazy_data:memmap_images", "partition": {"kind": "iid"},
                 "params": {"root": str(args.root), "samples": args.samples, "in_memory": mode == "memory"}},
        "model": {"name": "lenet5"}, "agents": {"count": agents}, "topology": {"name": "ring"},
        "train": {"epochs": 1, "steps_per_epoch": args.steps, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
        "gossip": {"rule": "dpsgd"},
        "schedule": {"averaging_rate": {"kind": "constant", "gamma0": 1.0}, "communication": {"kind": "every"},
                     "final_merge": {"enabled": False}},
        "eval": {"every": 0, "local": False, "test_samples": 1000},
        "runtime": {"engine": "ray", "mode": "sync", "progress": False, "wait_timeout_s": 600.0,
                    "agents_per_actor": per_actor, "on_failure": "abort", "num_cpus": 2,
                    "num_cpus_per_agent": 2 / agents},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--actors", type=int, default=2, help="actor processes at every agent count")
    parser.add_argument("--samples", type=int, default=200_000, help="training images in the file")
    parser.add_argument("--steps", type=int, default=10, help="local steps per agent (one round each)")
    parser.add_argument("--modes", nargs="+", choices=["lazy", "memory"], default=["lazy"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where the .npy files are written")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    # the child process and every Ray worker import the loader as `lazy_data` from bench/
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "bench"), str(REPO),
                                                             os.environ.get("PYTHONPATH")]))
    images, _ = write_images(args.root, args.samples)
    data_mb = images.stat().st_size / 1e6
    from raygossip.models import build_model

    model = build_model("lenet5", CLASSES, (1, SIDE, SIDE))
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    print(f"lenet5 ({model_mb:.2f} MB of parameters) on {args.samples} memory-mapped images ({data_mb:.0f} MB file), "
          f"{args.actors} actors, {args.steps} rounds; {os.cpu_count()} cores, {total_memory_bytes() / 2**30:.0f} GiB")
    print(f"{'mode':>6} {'agents':>6} {'k':>4} {'start-up s':>10} {'train s':>8} {'memory GB':>9}")
    rows = []
    for mode in args.modes:
        for agents in args.agents:
            point = measure(spec_of(args, agents, mode), args.timeout_s)
            rows.append({"mode": mode, "agents": agents, "k": -(-agents // args.actors), **point})
            if "error" in point:
                print(f"{mode:>6} {agents:>6}  failed: {point['error']}", flush=True)
                continue
            print(f"{mode:>6} {agents:>6} {rows[-1]['k']:>4} {point['startup_s']:>10.1f} {point['train_s']:>8.1f} "
                  f"{point['memory_gb']:>9.2f}", flush=True)
    for mode in args.modes:
        done = sorted((r["agents"], r["memory_gb"]) for r in rows if r["mode"] == mode and "error" not in r)
        if len(done) >= 2:
            (a0, m0), (a1, m1) = done[0], done[-1]
            per_agent = (m1 - m0) * 1e3 / (a1 - a0)
            print(f"{mode}: {a0} -> {a1} agents adds {1e3 * (m1 - m0):.0f} MB, {per_agent:.1f} MB per added agent "
                  f"({per_agent / model_mb:.1f} x the model's parameters; the data file is {data_mb:.0f} MB)")
    if args.json is not None:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "model_mb": model_mb, "data_mb": data_mb,
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
