"""Whole-run checkpoints on the Ray engine: a consistent cut at a barrier; a killed driver resumes to the same end."""

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

from raygossip.api import run
from raygossip.checkpoint import MANIFEST
from raygossip.validation import load_config
from raygossip.results import read_metrics
from conftest import small, wait_for_idle_cluster

CLI = str(Path(sys.executable).with_name("raygossip"))
CHOCO = {"rule": "choco", "gamma": 0.5, "compressor": {"name": "top_k", "ratio": 0.1}}


def ray_config():
    data = small()
    data["gossip"] = CHOCO
    data["train"].update(epochs=4, steps_per_epoch=12)
    return load_config(base=data)


def same_model(a: Path, b: Path) -> bool:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in read_metrics(path / "metrics.jsonl")]


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    wait_for_idle_cluster()
    return out, run(ray_config(), out_dir=out)


def test_ray_driver_killed_mid_run_resumes_to_identical_results(ray_cluster, tmp_path, uninterrupted):
    """The driver (a CLI process joined to the test cluster) is SIGKILLed; Ray removes its actors; resume ends
    with the uninterrupted run's model and metrics."""
    whole_dir, whole = uninterrupted
    out = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    data = small()
    data["gossip"] = CHOCO
    data["train"].update(epochs=4, steps_per_epoch=12)
    data["runtime"]["timing"] = {"step_time_s": 0.15}  # slow enough to be killed part way; numbers unchanged
    import yaml

    config_file.write_text(yaml.safe_dump(data))
    wait_for_idle_cluster()
    cmd = [CLI, "run", str(config_file), "--no-progress", "--checkpoint-every", "3", "--out", str(out),
           "--address", ray_cluster.address]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads((out / MANIFEST).read_text())["step"]
        except (OSError, ValueError, KeyError):
            pass
        if step >= 15:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((out / MANIFEST).read_text())
    step = manifest["step"]
    assert 15 <= step < 48 and step % 3 == 0, "the run should have been killed part way, at a checkpoint round"
    assert len(manifest["run_state"]["record_list"]) == step // 12  # one evaluation per epoch of 12 steps
    for record in read_metrics(out / "metrics.jsonl"):
        assert "merged_test_accuracy" in record
    wait_for_idle_cluster()  # the dead driver's actors and placement group are released
    done = subprocess.run([CLI, "resume", str(out), "--no-progress"], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["merged_test_accuracy"] == whole.summary["merged_test_accuracy"]
    kinds = [e["kind"] for e in summary["events"]]
    assert kinds.count("resumed") == 1
    assert kinds.count("checkpoint_written") == 15  # every 3rd round of 48 but the last, over both lives
    assert same_model(whole_dir, out)
    assert without_time(out) == without_time(whole_dir)


class DriverLost(Exception):
    """Raised from the observer: the driver stops part way, after a checkpoint, and its actors are killed."""


@pytest.mark.parametrize(
    "mode, rule, on_failure",
    [(mode, rule, "abort") for mode in ("bounded", "async") for rule in ("choco", "adagossip")]  # the case
    + [("async", "choco", "restart"), ("bounded", "adagossip", "drop")],
)
def test_a_resumed_bounded_or_async_run_loses_no_message_in_flight(ray_cluster, tmp_path, mode, rule, on_failure):
    """A bounded/async checkpoint does not drain the inboxes: on resume every agent resends its whole public copy,
    which its neighbours apply against what they knew of it, whatever runtime.on_failure says (issue 18: under
    abort the agents kept no copies of their neighbours' public copies, and the letters in flight were lost)."""
    data = small(runtime__mode=mode, runtime__on_failure=on_failure)
    data["gossip"] = {"rule": rule, "gamma": 0.5, "compressor": {"name": "top_k", "ratio": 0.1}}
    data["schedule"]["averaging_rate"] = {"kind": "constant"}
    data["train"].update(epochs=4, steps_per_epoch=12)
    data["runtime"].update(checkpoint_every=3, finish_quorum=1.0)
    data["runtime"]["timing"] = {"step_time_s": 0.02, "latency_s": 0.03}  # letters in flight at every barrier
    config = load_config(base=data)
    out = tmp_path / "run"

    def lose_the_driver(record: dict) -> None:
        if record["step"] >= 24:
            raise DriverLost

    wait_for_idle_cluster()
    with pytest.raises(DriverLost):
        run(config, out_dir=out, observer=lose_the_driver)
    manifest = json.loads((out / MANIFEST).read_text())
    assert 0 < manifest["step"] < 48
    wait_for_idle_cluster()
    from raygossip.api import resume

    result = resume(out)
    summary = result.summary
    assert summary["status"] == "finished"
    assert [e["kind"] for e in summary["events"]].count("resumed") == 1
    assert summary["public_copy_error"] < 1e-5, summary["public_copy_error"]
    assert summary["resyncs"] >= 8  # each of the 4 agents took the whole public copy of its 2 neighbours
