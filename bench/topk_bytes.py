"""Bytes of one top-k message per model and ratio, against the information bound (deterministic, no timing).

    python bench/topk_bytes.py [--ratios 0.01,0.1] [--seed 0]

Per tensor the bound is the kept values at float32 plus log2 C(n, k) bits for which k of the n entries
were kept (what any code needs for a set drawn uniformly). The vector compressed is seeded standard
normal noise the size of each model's parameters, so its top-k set per tensor is such a uniform draw.
Columns: bytes with `index_coding: plain` as before (int16 indices up to 32,768 entries, else int32),
plain now (uint16 up to 65,536), and `entropy`, each with its ratio to the bound.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raygossip.algorithms.compressors import make_compressor  # noqa: E402
from raygossip.models import build_model  # noqa: E402

# (name shown, model name, input shape, model params): the quickstart MLP, the results' MNIST MLP, LeNet-5, ResNet-20.
MODELS = (
    ("MLP quickstart (64-64-10)", "mlp", (64,), {"hidden": [64]}),
    ("MLP MNIST (784-128-10)", "mlp", (1, 28, 28), {"hidden": [128]}),
    ("LeNet-5 (MNIST)", "lenet5", (1, 28, 28), {}),
    ("ResNet-20 (CIFAR-10)", "resnet20", (3, 32, 32), {}),
)


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def keep_count(size: int, ratio: float) -> int:
    return min(size, max(1, math.ceil(ratio * size)))


def bound_bytes(sizes: list[int], ratio: float) -> float:
    """float32 values plus log2 C(n, k) bits per tensor, in bytes."""
    return sum(4 * keep_count(n, ratio) + log2_binomial(n, keep_count(n, ratio)) / 8 for n in sizes)


def old_plain_bytes(sizes: list[int], ratio: float) -> int:
    """The layout before uint16: float32 values and int16 indices up to 32,768 entries, int32 above."""
    width = 1 if max(sizes) <= 256 else 2 if max(sizes) <= 1 << 15 else 4
    return sum(keep_count(n, ratio) for n in sizes) * (4 + width)


def rows(ratios: list[float], seed: int) -> list[list[str]]:
    out = []
    for shown, name, shape, params in MODELS:
        torch.manual_seed(seed)
        sizes = [p.numel() for p in build_model(name, 10, shape, params).parameters()]
        x = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(seed))
        for ratio in ratios:
            bound = bound_bytes(sizes, ratio)
            plain, entropy = (make_compressor("top_k", sizes, ratio=ratio, index_coding=coding).compress(x, None).nbytes
                              for coding in ("plain", "entropy"))
            old = old_plain_bytes(sizes, ratio)
            out.append([shown, f"{sum(sizes):,}", str(len(sizes)), f"{ratio:.0%}", f"{bound:,.0f}",
                        f"{old:,} ({old / bound:.2f}x)", f"{plain:,} ({plain / bound:.2f}x)",
                        f"{entropy:,} ({entropy / bound:.3f}x)"])
    return out


HEADERS = ["model", "params", "tensors", "top-k", "bound (bytes)", "plain before", "plain (uint16)", "entropy"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.01,0.1", help="comma-separated top-k ratios (default 0.01,0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the compressed vector (default 0)")
    args = parser.parse_args(argv)
    table = rows([float(r) for r in args.ratios.split(",")], args.seed)
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "|".join(" --- " for _ in HEADERS) + "|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
