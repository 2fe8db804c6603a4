"""Agent snapshot files: written atomically, read back exactly, left behind only by runs whose process died."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import torch

from raygossip.engines.snapshots import PREFIX, make_snapshot_dir, read_snapshot, snapshot_path, sweep_stale, write_snapshot


def state(step: int) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"params": torch.arange(10, dtype=torch.float32) + step, "order": torch.arange(5, dtype=torch.int64),
               "rng.data": torch.zeros(16, dtype=torch.uint8)}
    meta = {"agent": 3, "step": step, "optim_scalars": {"lr": 0.05}, "traffic": {"per_link": {"2": 7}}}
    return tensors, meta


def test_a_snapshot_reads_back_exactly_and_replaces_the_previous_one(tmp_path):
    assert read_snapshot(str(tmp_path), 3) is None
    write_snapshot(str(tmp_path), 3, *state(10))
    write_snapshot(str(tmp_path), 3, *state(20))
    arrays, meta = read_snapshot(str(tmp_path), 3)
    assert meta == state(20)[1]
    for name, tensor in state(20)[0].items():
        np.testing.assert_array_equal(arrays[name], tensor.numpy())
        assert arrays[name].dtype == tensor.numpy().dtype
    assert sorted(os.listdir(tmp_path)) == [snapshot_path(str(tmp_path), 3).name]  # no temporary file left


def test_directories_of_dead_runs_are_swept_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{PREFIX}{os.getpid()}-def"
    other = tmp_path / "someone-elses"
    for directory in (stale, live, other):
        directory.mkdir()
    sweep_stale(str(tmp_path))
    assert not stale.exists() and live.exists() and other.exists()


def test_a_run_directory_is_named_after_its_process():
    directory = make_snapshot_dir()
    try:
        assert os.path.basename(directory).startswith(f"{PREFIX}{os.getpid()}-")
        if os.path.isdir("/dev/shm"):
            assert os.path.dirname(directory) == "/dev/shm"  # memory, not disk
    finally:
        os.rmdir(directory)
