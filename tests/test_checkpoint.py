"""Checkpoint and resume: a killed run resumes to the same final parameters; bad checkpoints are clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raygossip.api import resume, run
from raygossip.checkpoint import MANIFEST, load_checkpoint
from raygossip.validation import load_config
from raygossip.errors import UserError
from raygossip.presets import quickstart
from raygossip.results import read_metrics

CLI = str(Path(sys.executable).with_name("raygossip"))


def config(**extra):
    overrides = ["runtime.engine=reference", "runtime.progress=false", "train.epochs=4", "eval.every=1",
                 "model.hidden=[32]"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(base=quickstart(), overrides=overrides)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    result = run(config(), out_dir=out)
    return out, result


def test_resume_in_process_reaches_the_same_final_parameters(tmp_path, uninterrupted):
    whole_dir, whole = uninterrupted
    cfg = config(**{"runtime.checkpoint_every": 7})
    run(cfg, out_dir=tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["step"] == 42  # 48 rounds, a checkpoint every 7: the last one after round 42
    resumed = resume(tmp_path)
    assert resumed.summary["merged_test_accuracy"] == whole.summary["merged_test_accuracy"]
    a, b = load_file(whole_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # a whole run in a subprocess, killed, then resumed by another
def test_driver_killed_mid_run_resumes_to_identical_results(tmp_path, uninterrupted):
    whole_dir, whole = uninterrupted
    out = tmp_path / "run"
    cmd = [CLI, "run", "--engine", "reference", "--no-progress", "--checkpoint-every", "2", "--out", str(out),
           "--set", "train.epochs=4", "--set", "eval.every=1", "--set", "model.hidden=[32]"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads((out / MANIFEST).read_text())["step"] >= 20:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = json.loads((out / MANIFEST).read_text())["step"]
    assert 20 <= step < 48, "the run should have been killed part way"
    for record in read_metrics(out / "metrics.jsonl"):  # whatever was written is readable
        assert "merged_test_accuracy" in record
    done = subprocess.run([CLI, "resume", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["merged_test_accuracy"] == whole.summary["merged_test_accuracy"]
    assert summary["bytes_sent"] == whole.summary["bytes_sent"]
    assert [e["kind"] for e in summary["events"]].count("resumed") == 1
    a, b = load_file(whole_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    def without_time(path):
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in read_metrics(path / "metrics.jsonl")]

    assert without_time(out) == without_time(whole_dir)


@pytest.fixture
def checkpointed(tmp_path):
    cfg = config(**{"runtime.checkpoint_every": 24, "train.epochs": 2})
    run(cfg, out_dir=tmp_path)
    return tmp_path, cfg


def corrupt_tensors(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    target = path / manifest["tensors"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def truncate_tensors(path: Path) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    target = path / manifest["tensors"]
    target.write_bytes(target.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / MANIFEST).write_text("{ not json"), "not valid JSON"),
        (lambda p: (p / MANIFEST).write_text('{"format": 1}'), "lacks"),
        (lambda p: (p / MANIFEST).unlink(), "no checkpoint.json"),
        (truncate_tensors, "checksum"),
        (corrupt_tensors, "checksum"),
        (lambda p: (p / json.loads((p / MANIFEST).read_text())["tensors"]).unlink(), "missing"),
    ],
    ids=["bad-json", "incomplete-manifest", "no-manifest", "truncated", "corrupt", "missing-tensors"],
)
def test_damaged_checkpoints_are_one_line_errors(checkpointed, damage, message):
    path, cfg = checkpointed
    damage(path)
    with pytest.raises(UserError) as error:
        load_checkpoint(path, cfg)
    assert error.value.field == "checkpoint"
    assert message in str(error.value) and "\n" not in str(error.value)


def test_checkpoint_from_another_config_is_refused(checkpointed):
    path, _ = checkpointed
    other = config(**{"runtime.checkpoint_every": 24, "train.epochs": 2, "train.lr": 0.5})
    with pytest.raises(UserError, match="different config.*train.lr"):
        load_checkpoint(path, other)


def test_resume_cli_reports_damage_without_traceback(checkpointed):
    path, _ = checkpointed
    truncate_tensors(path)
    done = subprocess.run([CLI, "resume", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "checkpoint:" in done.stderr
