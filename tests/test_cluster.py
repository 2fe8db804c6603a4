"""`raygossip run --address` against a real head started with `ray start --head` (token auth, loopback ports)."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from raygossip.engines.cluster import split_address
from raygossip.errors import UserError

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
FAIL_WITHIN_S = 15.0
RUN_FLAGS = ["--engine", "ray", "--set", "train.epochs=2", "--set", "eval.every=1", "--set", "agents.count=4",
             "--no-progress"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def head_processes(tmpdir: str) -> list[int]:
    """The processes of the head started in `tmpdir`: every one has RAY_TMPDIR=tmpdir in its environment."""
    marker = f"RAY_TMPDIR={tmpdir}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_head(tmpdir: str) -> None:
    """Stop only this head's processes (`ray stop` would stop every Ray on the machine): TERM, then KILL."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        pids = head_processes(tmpdir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_running(pid) for pid in pids):
            time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def client_env(head: dict, **changes: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_TMPDIR=head["tmpdir"],
               RAY_AUTH_TOKEN_PATH=head["token_path"])
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def raygossip(args: list[str], env: dict, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "raygossip.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return done, time.perf_counter() - began


@pytest.fixture(scope="module")
def token_head():
    """A head of 2 CPUs on 127.0.0.1 in its own RAY_TMPDIR, with token authentication and its own token file."""
    tmpdir = tempfile.mkdtemp(prefix="rg-head-", dir="/tmp")  # short: Ray's socket paths live under it
    token_path = Path(tmpdir) / "token"
    token_path.write_text(secrets.token_hex(16))
    port = free_port()
    env = {**os.environ, "RAY_TMPDIR": tmpdir, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path),
           "PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    ports = {flag: free_port() for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-port",
                                            "--metrics-export-port",
                                            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                            "--runtime-env-agent-port")}
    if importlib.util.find_spec("grpc") is not None:  # then Ray starts a Ray Client server, on 10001 unless told
        ports["--ray-client-server-port"] = free_port()
    command = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
               "--num-gpus=4",  # logical GPUs (no CUDA): Ray places GPU shares by them
               "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=200000000",
               *(f"{flag}={value}" for flag, value in ports.items())]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"address": f"127.0.0.1:{port}", "tmpdir": tmpdir, "token_path": str(token_path)}
    finally:
        stop_head(tmpdir)
        assert head_processes(tmpdir) == [] or all(not _running(p) for p in head_processes(tmpdir))
        shutil.rmtree(tmpdir, ignore_errors=True)


def one_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def test_a_run_through_address_on_a_token_head_needs_no_ray_auth_mode(token_head, tmp_path):
    out = tmp_path / "run"
    done, _ = raygossip(["run", "configs/quickstart.yaml", *RUN_FLAGS, "--address", token_head["address"],
                         "--out", str(out)], client_env(token_head))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"results in {out}" in done.stdout
    assert "connecting with this machine's token (RAY_AUTH_MODE=token)" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["engine"], summary["agents"], summary["status"]) == ("ray", 4, "finished")
    assert 0.3 < summary["merged_test_accuracy"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1.0, 2.0]
    # it ran on that head: the run's agents were the head's workers and left their logs in its session
    logs = list(Path(token_head["tmpdir"]).glob("ray/session_*/logs/worker-*.out"))
    assert logs, "no worker logs in the head's session"


def test_auto_packing_keeps_an_actors_gpu_shares_on_one_device(token_head, tmp_path):
    """8 agents x 0.5 GPU on a head of 2 CPUs and 4 logical GPUs: auto would pack 4 per actor (one per CPU), but an
    actor uses one device, so it packs 2 (4 actors asking 1 GPU each) and says so in summary.json."""
    out = tmp_path / "run"
    flags = [*RUN_FLAGS, "--set", "agents.count=8", "--set", "runtime.num_gpus_per_agent=0.5",
             "--set", "runtime.num_cpus_per_agent=0.25"]
    done, _ = raygossip(["run", "configs/quickstart.yaml", *flags, "--address", token_head["address"],
                         "--out", str(out)], client_env(token_head))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    packing = summary["placement"]
    assert (packing["agents_per_actor"], packing["chosen"], packing["actors"]) == (2, "auto", 4)
    assert packing["gpus_per_actor"] == [1.0, 1.0, 1.0, 1.0]
    assert summary["status"] == "finished"


def test_more_gpu_shares_than_one_device_in_an_actor_is_one_line_before_ray(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done, _ = raygossip(["run", *RUN_FLAGS, "--set", "runtime.num_gpus_per_agent=0.5",
                         "--set", "runtime.agents_per_actor=4", "--out", str(out)], env, timeout=60)
    assert done.returncode == 2, done.stderr
    one_line(done.stderr, "runtime.agents_per_actor: 4 agents x runtime.num_gpus_per_agent 0.5 = 2 GPUs in one actor",
             "at most 2 agents per actor")
    assert not out.exists()


@pytest.mark.parametrize("changes, needles", [
    ({"RAY_AUTH_MODE": "disabled"}, ["uses token authentication but RAY_AUTH_MODE=disabled", "RAY_AUTH_MODE=token"]),
    ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}, ["rejects this machine's token",
                                                                      "ray get-auth-token"]),
    ({"RAY_AUTH_TOKEN": "not-the-token"}, ["rejects this machine's token", "RAY_AUTH_MODE=token"]),
    ({"RAY_AUTH_TOKEN_PATH": None, "HOME": "{tmp}"}, ["no token was found here", "RAY_AUTH_MODE=token"]),
], ids=["mode-disabled", "wrong-token", "wrong-token-mode-unset", "no-token"])
def test_a_head_that_refuses_the_client_is_one_line_before_any_folder(token_head, tmp_path, changes, needles):
    changes = {k: (v.format(tmp=tmp_path) if v else v) for k, v in changes.items()}
    out = tmp_path / "run"
    done, seconds = raygossip(["run", *RUN_FLAGS, "--address", token_head["address"], "--out", str(out)],
                              client_env(token_head, **changes), timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    line = one_line(done.stderr, f"the Ray head at {token_head['address']}", *needles)
    assert line.startswith("raygossip run: error: runtime.address: ")
    assert seconds < FAIL_WITHIN_S
    assert not out.exists()


@pytest.mark.ray  # a `raygossip run --address` in a subprocess: Ray's client start-up
def test_an_address_where_nothing_listens_is_one_line_within_15_s(tmp_path):
    port = free_port()  # bound and closed again: nothing listens there
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    done, seconds = raygossip(["run", *RUN_FLAGS, "--address", f"127.0.0.1:{port}", "--out", str(out)], env,
                              timeout=60)
    assert done.returncode == 2, done.stderr
    one_line(done.stderr, f"no Ray head at 127.0.0.1:{port}", "connection refused",
             f"ray start --head --node-ip-address=127.0.0.1 --port={port}")
    assert seconds < FAIL_WITHIN_S
    assert not out.exists()


@pytest.mark.ray  # a `raygossip run --address` in a subprocess: Ray's client start-up
def test_a_port_that_accepts_but_is_no_ray_head_is_one_line_within_15_s(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: [accepted.append(listener.accept()) for _ in range(64)], daemon=True).start()
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    try:
        done, seconds = raygossip(["run", *RUN_FLAGS, "--address", f"127.0.0.1:{port}", "--out", str(out)], env,
                                  timeout=60)
    finally:
        listener.close()
    assert done.returncode == 2, done.stderr
    one_line(done.stderr, f"127.0.0.1:{port} accepts connections but no Ray head answers there", "--port=")
    assert seconds < FAIL_WITHIN_S
    assert accepted, "the probe never connected"
    assert not out.exists()


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:6379", ("127.0.0.1", 6379)), ("ray://head.example:10001", ("head.example", 10001)),
    ("[::1]:6390", ("::1", 6390)), ("auto", None), ("local", None),
])
def test_split_address_reads_host_and_port(address, expected):
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["head", "head:", ":6379", "head:port", "head:70000"])
def test_split_address_rejects_what_is_no_gcs_address(address):
    with pytest.raises(UserError, match=r"^runtime.address: expected HOST:PORT"):
        split_address(address)
