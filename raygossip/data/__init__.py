"""Data layer: in-memory or lazily read datasets, the loader registry, non-IID partitioners, augmentation (no Ray)."""

from raygossip.data.datasets import (
    DATASETS, Dataset, LazySplit, Split, augment_batch, clear_cache, load_dataset, register,
)
from raygossip.data.partition import PARTITIONERS, allowed_params, heterogeneity_report, partition

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "Dataset",
    "LazySplit",
    "Split",
    "allowed_params",
    "augment_batch",
    "clear_cache",
    "heterogeneity_report",
    "load_dataset",
    "partition",
    "register",
]
