"""Agent snapshots as files in shared memory on the coordinator's node: they outlive the agent's process (and the
coordinator's: the driver makes the run's folder)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from raygossip.results import save_tensors_atomic

PREFIX = "raygossip-snapshots-"


def shared_memory_root() -> str | None:
    """Where a snapshot directory goes: /dev/shm (memory, not disk) when this platform has it, else the
    temporary directory."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def make_snapshot_dir() -> str:
    """A new directory for one run's state (the agents' snapshot files, the coordinator's ledger), named after this
    process (the driver's, which outlives the coordinator's deaths) so that `sweep_stale` can find the
    directories of runs whose driver died without removing them."""
    root = shared_memory_root()
    sweep_stale(root or tempfile.gettempdir())
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root)


def sweep_stale(root: str) -> None:
    """Remove the snapshot directories under `root` whose run's process is gone."""
    for entry in Path(root).glob(f"{PREFIX}*"):
        match = re.match(rf"{PREFIX}(\d+)-", entry.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, somebody else's
        return True
    return True


def snapshot_path(directory: str, agent: int) -> Path:
    return Path(directory) / f"agent-{agent}.safetensors"


def write_snapshot(directory: str, agent: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """One agent's state (AgentCore.snapshot()), replacing its previous one atomically."""
    save_tensors_atomic(snapshot_path(directory, agent), tensors, {"meta": json.dumps(meta)})


def read_snapshot(directory: str, agent: int) -> tuple[dict[str, np.ndarray], dict] | None:
    """The agent's latest snapshot as (arrays, meta), or None when it wrote none."""
    path = snapshot_path(directory, agent)
    if not path.exists():
        return None
    with safe_open(str(path), framework="numpy") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, json.loads(handle.metadata()["meta"])
