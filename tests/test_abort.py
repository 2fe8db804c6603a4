"""Stop means stop: an aborted run ends every agent's wait at once, whatever runtime.wait_timeout_s says."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from raygossip.cli import main
from test_divergence import diverging

WAIT_TIMEOUT_S = 120.0
BOUND_S = 5.0  # generous: the waits it replaces were runtime.wait_timeout_s each


@pytest.mark.parametrize("engine", ["reference", "ray"])
def test_a_diverged_run_exits_within_seconds_of_the_abort(engine, tmp_path, capsys, request):
    """Agent 2 diverges at round 5 (of 48) with on_divergence abort; its neighbours' waits for its round-5 letter
    end at once: the CLI exits with status 4 within BOUND_S of the abort, not after wait_timeout_s."""
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
        from conftest import wait_for_idle_cluster

        wait_for_idle_cluster()
    data = diverging(engine=engine)
    data["faults"] = {"corrupt": [{"agent": 2, "round": 5}]}
    data["runtime"]["wait_timeout_s"] = WAIT_TIMEOUT_S
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    code = main(["run", str(path), "--no-progress", "--out", str(out)])
    exited = time.time()
    assert code == 4, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    (event,) = [e for e in summary["events"] if e["kind"] == "diverged"]
    after_abort = exited - event["unix_s"]
    print(f"{engine}: the CLI exited {after_abort:.2f} s after the abort")
    assert 0.0 <= after_abort < BOUND_S
