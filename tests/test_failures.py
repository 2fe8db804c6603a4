"""Agents and nodes that die mid-run on the Ray engine: restart, drop and abort, with real process deaths."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import ray

from raygossip.api import RunAborted, run
from raygossip.validation import load_config
from conftest import run_ray, small, wait_for_idle_cluster

CHOCO = {"rule": "choco", "gamma": 0.5, "compressor": {"name": "top_k", "ratio": 0.1}}


PACKING = pytest.mark.parametrize("k", [1, 2], ids=["1-per-actor", "2-per-actor"])


def mates(agents: list[int], k: int) -> list[int]:
    """The agents that die with these: those of the same actors (consecutive groups of k on the ring)."""
    return sorted({j for i in agents for j in range(i - i % k, i - i % k + k)})


def failing(k: int = 1, **overrides) -> dict:
    """4 agents on a ring, 80 rounds of ~0.08 s (long enough for a restart to rejoin), snapshots every 5 rounds;
    k agents per actor."""
    data = small(**overrides)
    data["runtime"]["agents_per_actor"] = k
    data["train"].update(epochs=2, steps_per_epoch=40)
    data["runtime"].setdefault("timing", {})["step_time_s"] = 0.08
    data["runtime"]["snapshot_every"] = 5
    return data


def events_of(outcome: dict, kind: str) -> list[dict]:
    return [e for e in outcome["events"] if e["kind"] == kind]


def link_report(engine) -> str:
    """For a failed invariant: how far each agent's copy of each neighbour's x_hat is from that x_hat."""
    import numpy as np

    live = engine.live
    states = dict(zip(live, ray.get([a.rule_state.remote(i) for i, a in live.items()])))
    return "; ".join(
        f"{i} knows {k[5:]}: {float(np.max(np.abs(v - states[int(k[5:])]['x_hat']))):.2e}"
        for i in live for k, v in states[i].items() if k.startswith("link.") and int(k[5:]) in states)


def check_every_record(outcome: dict, config) -> None:
    """One record per evaluation step, none twice, in order (a restarted agent's repeated reports are ignored)."""
    steps = [r["step"] for r in outcome["records"]]
    assert steps == sorted(set(steps))
    assert steps[-1] == 80 and len(steps) == config.train.epochs


@PACKING
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_agent_restarts_from_its_snapshot_and_resyncs_choco(ray_cluster, mode, k):
    """With 2 agents per actor the kill of agent 1 takes agent 0 (its actor mate) with it: both restart."""
    data = failing(k, runtime__mode=mode)
    data["gossip"] = CHOCO
    data["faults"] = {"kill": [{"agent": 1, "round": 7}]}
    config = load_config(base=data)
    engine, outcome = run_ray(config)
    try:
        extra = outcome["extra"]
        dead = mates([1], k)
        failures = {f["agent"]: f for f in extra["failures"]}
        assert sorted(failures) == dead
        failure = failures[1]
        assert failure["action"] == "restarted" and failure["injected_round"] == 7
        assert 0 <= failure["detection_s"] < 10.0
        # on the coordinator's node (the driver's) a snapshot is a file in shared memory; from the other node it is sent
        coordinator_node = ray.get_runtime_context().get_node_id()
        for i in dead:
            assert failures[i]["action"] == "restarted"
            assert failures[i]["restored_step"] == 5  # the snapshot after round 4 (every 5 rounds)
            assert failures[i]["snapshot"] == ("file" if engine.placement[i]["node"] == coordinator_node else "sent")
        assert failure["rounds_lost"] == 2 and failure["rounds_behind"] >= 2
        assert extra["restarts"] == len(dead) and extra["dropped_agents"] == []
        restarted = events_of(outcome, "agent_restarted")
        assert sorted(e["agent"] for e in restarted) == dead and all(e["incarnation"] == 1 for e in restarted)
        assert {e["neighbour"] for e in events_of(outcome, "neighbour_down")} == set(dead)
        if mode == "sync":  # (in async mode the quorum may stop agent 1 before it trains: its drain resyncs it)
            assert extra["transport"] == "channels"  # the links to agent 1 went back to calls when it died
            assert extra["resyncs"] >= 2 * len(dead)  # each restarted agent took its 2 neighbours' copies
            check_every_record(outcome, config)
            assert extra["steps_per_agent"] == [80] * 4
        # every message applied once, the resync replaced what the neighbours knew of agent 1
        error = engine.choco_consistency_error()
        assert error < 1e-5, (error, link_report(engine), outcome["events"])
        assert outcome["merged_accuracy"] > 0.5
    finally:
        engine.close()


@PACKING
def test_agent_killed_from_outside_is_detected_and_replaced(ray_cluster, k):
    """SIGKILL an agent's process while the run goes on (D-PSGD, sync); measure detection and recovery."""
    data = failing(k)
    config = load_config(base=data)
    wait_for_idle_cluster()
    from raygossip.engines.common import prepare
    from raygossip.engines.ray_engine import RayEngine

    engine = RayEngine(config, prepare(config))
    victim = engine.placement[2]["pid"]
    killed = {}

    def kill_on_first_record(record: dict) -> None:
        if not killed:
            killed["at"] = time.time()
            os.kill(victim, signal.SIGKILL)

    try:
        started = time.time()
        outcome = engine.run(kill_on_first_record)
        failures = outcome["extra"]["failures"]
        assert [f["agent"] for f in failures] == mates([2], k)
        for failure in failures:
            assert failure["error"] in ("ActorDiedError", "RayActorError")
            detection = failure["detected_at_s"] - (killed["at"] - started)
            assert detection < 10.0
            assert failure["action"] == "restarted" and failure["recovery_s"] < 60.0
        assert outcome["extra"]["transport"] == "channels"  # a reader waiting on the dead writer's channel let go
        check_every_record(outcome, config)
        assert outcome["extra"]["steps_per_agent"] == [80] * 4
        assert outcome["merged_accuracy"] > 0.5
    finally:
        engine.close()


@PACKING
def test_two_deaths_at_once_are_both_detected_at_once(ray_cluster, k):
    """The second death is detected while the first agent is being restarted, not after (D-PSGD, sync)."""
    data = failing(k)
    data["faults"] = {"kill": [{"agent": 0, "round": 7}, {"agent": 2, "round": 7}]}
    engine, outcome = run_ray(load_config(base=data))
    try:
        failures = outcome["extra"]["failures"]
        assert sorted(f["agent"] for f in failures) == mates([0, 2], k)
        assert all(f["action"] == "restarted" for f in failures), failures
        assert all(f["detection_s"] < 3.0 for f in failures if f["agent"] in (0, 2)), failures  # the injected kills
        assert outcome["extra"]["steps_per_agent"] == [80] * 4
    finally:
        engine.close()


@PACKING
def test_drop_policy_continues_without_the_dead_agent(ray_cluster, k):
    data = failing(k, runtime__on_failure="drop")
    data["gossip"] = CHOCO
    data["faults"] = {"kill": [{"agent": 2, "round": 7}]}
    config = load_config(base=data)
    engine, outcome = run_ray(config)
    try:
        extra = outcome["extra"]
        dead = mates([2], k)
        survivors = [i for i in range(4) if i not in dead]
        assert extra["dropped_agents"] == dead and extra["restarts"] == 0
        assert all(f["action"] == "dropped" for f in extra["failures"])
        assert [s["agent"] for s in engine.finished] == survivors
        last = outcome["records"][-1]
        assert last["agents"] == survivors and len(last["local_test_accuracy"]) == len(survivors)
        # neighbours 1 and 3 removed agent 2's share of s: the invariant holds over the survivors
        error = engine.choco_consistency_error()
        assert error < 1e-5, (error, link_report(engine), outcome["events"])
        assert outcome["merged_accuracy"] > 0.5
    finally:
        engine.close()


@PACKING
def test_abort_policy_stops_cleanly_and_keeps_what_was_written(ray_cluster, tmp_path, k):
    data = failing(k, runtime__on_failure="abort")
    data["faults"] = {"kill": [{"agent": 0, "round": 50}]}
    config = load_config(base=data)
    wait_for_idle_cluster()
    with pytest.raises(RunAborted, match="agent 0 died"):
        run(config, out_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "aborted" and [f["agent"] for f in summary["failures"]] == mates([0], k)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [40]  # the first epoch's record, written before the failure
    assert not (tmp_path / "model.safetensors").exists()


@PACKING
def test_message_loss_and_delay_are_injected_and_counted(ray_cluster, k):
    data = failing(k)
    data["faults"] = {"drop_messages": 0.25, "delay_messages": 0.5, "delay_s": 0.02}
    config = load_config(base=data)
    engine, outcome = run_ray(config)
    try:
        sent = outcome["last"]["messages_sent"]
        lost = outcome["extra"]["lost_messages"]
        assert 0.15 * sent < lost < 0.35 * sent
        check_every_record(outcome, config)
    finally:
        engine.close()


@PACKING
def test_removed_node_moves_its_agents_to_the_survivors(ray_cluster, k):
    """Three actors (of k agents) spread over three nodes; the third node goes away mid-run; its agents restart
    elsewhere."""
    node = ray_cluster.add_node(num_cpus=2, object_store_memory=128 * 1024**2)
    ray_cluster.wait_for_nodes()
    try:
        data = failing(k, agents__count=3 * k, runtime__placement="SPREAD")
        data["topology"] = {"name": "complete"}
        config = load_config(base=data)
        wait_for_idle_cluster()
        from raygossip.engines.common import prepare
        from raygossip.engines.ray_engine import RayEngine

        engine = RayEngine(config, prepare(config))
        doomed = node.node_id
        on_doomed = [p["agent"] for p in engine.placement if p["node"] == doomed]
        assert on_doomed, "SPREAD put no agent on the third node"
        removed = {}

        def remove_on_first_record(record: dict) -> None:
            if not removed:
                removed["at"] = time.time()
                ray_cluster.remove_node(node)

        try:
            outcome = engine.run(remove_on_first_record)
            failures = outcome["extra"]["failures"]
            assert sorted(f["agent"] for f in failures) == sorted(on_doomed)
            assert all(f["action"] == "restarted" and f["node"] != doomed for f in failures)
            assert all(f["snapshot"] == "sent" for f in failures)  # a copy on the coordinator's node survived
            assert len(on_doomed) == k
            assert outcome["extra"]["steps_per_agent"] == [80] * 3 * k
            check_every_record(outcome, config)
        finally:
            engine.close()
    finally:
        if any(n is node for n in ray_cluster.worker_nodes):
            ray_cluster.remove_node(node)


def test_cli_abort_is_one_line_and_exit_status_3(ray_cluster, tmp_path, capsys):
    """`raygossip run --on-failure abort` with an injected kill: one line on stderr, status 3, outputs kept."""
    from raygossip.cli import main

    out = tmp_path / "run"
    wait_for_idle_cluster()
    code = main(["run", "--no-progress", "--on-failure", "abort", "--out", str(out), "--address", ray_cluster.address,
                 "--set", "agents.count=4", "--set", "model.hidden=[32]", "--set", "runtime.num_cpus_per_agent=0.5",
                 "--set", "train.epochs=2", "--set", "eval.every=1", "--set", "faults.kill=[{agent: 3, round: 30}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("raygossip run: runtime.on_failure: run aborted: agent 3 died"), err
    assert "Traceback" not in "\n".join(err)
    assert json.loads((out / "summary.json").read_text())["status"] == "aborted"
    assert (out / "config.yaml").exists() and not (out / "model.safetensors").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1's record, before the kill
