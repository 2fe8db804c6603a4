"""What a run leaves on disk, written so a crash never leaves a half file (atomic JSON/YAML/safetensors, flushed JSONL),
and what reads it back: a finished run, runs grouped over seeds, and mean_std over seeds."""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from raygossip.config import Config


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, fsync it, then rename over `path` (mode as for open())."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(text.encode()))


def strict_json(data: Any, **kwargs: Any) -> str:
    """json.dumps with every non-finite float (NaN, +-Infinity) written as null: strict JSON, never NaN tokens."""
    return json.dumps(_finite(data), allow_nan=False, default=_jsonable, **kwargs)


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, strict_json(data, indent=2, sort_keys=False) + "\n")


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        save_file(contiguous, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _finite(value: Any) -> Any:
    """A copy of `value` with non-finite floats (Python, numpy or 0-d tensor scalars) replaced by None."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_finite(item) for item in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return _finite(value.item())
    return value


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class MetricsLog:
    """metrics.jsonl: one JSON record per line, appended, flushed and fsynced per record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()  # present (maybe empty) from the start, so a failed run still has one

    def append(self, record: dict) -> None:
        line = strict_json(record) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


def read_metrics(path: str | Path) -> list[dict]:
    """Every complete record of a metrics.jsonl (a torn last line from a crash is ignored)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


@dataclass
class Run:
    """One finished run folder: its config (validated, defaults filled), summary and evaluation records."""

    path: Path
    config: Config
    flat: dict[str, Any]
    summary: dict
    records: list[dict]

    @property
    def seed(self) -> int:
        return self.config.seed


@dataclass
class Group:
    """Runs equal on every differing config key but the seed; `settings` holds those keys' values.

    `label` is the runs' own config label when they share one that no other group has, else the fewest
    `key=value` pairs of `settings` that tell this group from every other.
    """

    label: str
    settings: dict[str, Any]
    runs: list[Run]


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) over seeds of the values that are not None; (None, None) when none
    is, and std None for one value (one seed says nothing about the spread)."""
    present = [float(value) for value in values if value is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def metric_of(groups: Sequence[Group]) -> str:
    """The metric the runs were evaluated with (summary.json's metric.name; accuracy for runs from before it)."""
    return next(((run.summary.get("metric") or {}).get("name", "accuracy") for g in groups for run in g.runs),
                "accuracy")


def named(key: str, metric: str) -> str:
    """An accuracy key or column as the run's metric names it (merged_test_accuracy -> merged_test_perplexity)."""
    return key if metric == "accuracy" else key.replace("accuracy", metric).replace("acc.", metric)
