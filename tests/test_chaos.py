"""Chaos on the Ray engine: agents that die again in their next lives, seeded chaos schedules, and the chaos config's
one-line errors (before Ray starts)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from raygossip.config import ChaosConfig, FaultsConfig, KillConfig
from raygossip.core.faults import chaos_rounds, death_round, death_rounds
from raygossip.errors import UserError
from raygossip.presets import quickstart
from raygossip.validation import load_config
from conftest import run_ray, small

CHOCO = {"rule": "choco", "gamma": 0.5, "compressor": {"name": "top_k", "ratio": 0.1}}


def long_run(**overrides) -> dict:
    """4 agents on a ring, 80 rounds of ~0.08 s, snapshots every 5 rounds (as test_failures.failing)."""
    data = small(**overrides)
    data["runtime"]["agents_per_actor"] = 1
    data["train"].update(epochs=2, steps_per_epoch=40)
    data["runtime"].setdefault("timing", {})["step_time_s"] = 0.08
    data["runtime"]["snapshot_every"] = 5
    return data


# ------------------------------------------------------------ pure schedules


def test_death_rounds_give_each_life_its_own_round():
    faults = FaultsConfig(kill=[KillConfig(agent=1, round=20), KillConfig(agent=1, round=7),
                                KillConfig(agent=2, round=5), KillConfig(agent=2, round=5 + 0)][:3])
    deaths = death_rounds(faults, 4, 80, seed=0)
    assert deaths == {1: [7, 20], 2: [5]}
    assert [death_round(deaths, {}, 1, life) for life in range(3)] == [7, 20, None]
    assert death_round(deaths, {3: 9}, 3, 0) == 9 and death_round(deaths, {3: 9}, 3, 1) is None
    assert death_round(deaths, {1: 2}, 1, 0) == 7  # the faults' kill, not a timeline's


@pytest.mark.parametrize("every, start, stop, cap", [(2.0, 0, None, None), (5.0, 10, 360, None), (1.0, 0, None, 7)])
def test_chaos_rounds_are_seeded_bounded_and_near_the_rate(every, start, stop, cap):
    chaos = ChaosConfig(every_rounds=every, start=start, stop=stop, max_deaths=cap)
    rounds = chaos_rounds(chaos, 8, 400, seed=3)
    assert rounds == chaos_rounds(chaos, 8, 400, seed=3) and rounds != chaos_rounds(chaos, 8, 400, seed=4)
    flat = sorted(r for listed in rounds.values() for r in listed)
    assert all(start <= r < (stop or 400) for r in flat)
    expected = ((stop or 400) - start) / every
    if cap is None:
        assert 0.7 * expected < len(flat) < 1.3 * expected, len(flat)
    else:
        assert len(flat) == cap
    deaths = death_rounds(FaultsConfig(chaos=chaos), 8, 400, seed=3)
    for listed in deaths.values():  # each life dies past the round the previous one died at
        assert all(b > a for a, b in zip(listed, listed[1:]))
    assert sum(map(len, deaths.values())) >= 0.9 * len(flat)


# ------------------------------------------------------------ config: one line each, nothing started


@pytest.mark.parametrize(
    "chaos, runtime, field",
    [
        ({"every_rounds": 0}, {}, "faults.chaos.every_rounds"),
        ({"every_rounds": -2.0}, {}, "faults.chaos.every_rounds"),
        ({"every_s": float("inf")}, {}, "faults.chaos.every_s"),
        ({"every_s": float("nan")}, {}, "faults.chaos.every_s"),
        ({"coordinator_every_s": 0.0}, {}, "faults.chaos.coordinator_every_s"),
        ({"every_rounds": 3, "every_s": 2}, {}, "faults.chaos.every_s"),
        ({"every_rounds": 3, "target": "node"}, {}, "faults.chaos.target"),
        ({"every_s": 3, "target": "rack"}, {}, "faults.chaos.target"),
        ({"every_rounds": 3, "start": 10, "stop": 5}, {}, "faults.chaos.stop"),
        ({"every_rounds": 3, "max_deaths": 0}, {}, "faults.chaos.max_deaths"),
        ({"coordinator_at_s": [1.0, -1.0]}, {}, "faults.chaos.coordinator_at_s[1]"),
        ({"every_rounds": 3}, {"on_failure": "abort"}, "runtime.on_failure"),
        ({"coordinator_every_s": 5}, {"engine": "reference"}, "faults.chaos.coordinator_every_s"),
        ({"coordinator_at_s": [2.0]}, {"engine": "reference"}, "faults.chaos.coordinator_every_s"),
        ({"every_rounds": 3}, {"engine": "reference"}, "faults.chaos"),
        ({"every_round": 3}, {}, "faults.chaos.every_round"),
    ],
)
def test_bad_chaos_is_one_line_naming_the_field(chaos, runtime, field):
    data = quickstart()
    data["runtime"] = {"engine": "ray", **runtime}
    data["faults"] = {"chaos": chaos}
    with pytest.raises(UserError) as error:
        load_config(base=data)
    assert error.value.field == field
    assert "\n" not in str(error.value)


def test_a_bad_chaos_config_is_refused_before_ray_starts(tmp_path):
    """The CLI in a fresh process: one line naming the field, exit status 2, and Ray never started."""
    import subprocess
    import sys

    config = tmp_path / "chaos.yaml"
    config.write_text("runtime: {engine: ray}\nfaults: {chaos: {every_s: .nan}}\n")
    script = ("import sys, ray\nfrom raygossip.cli import main\ntry:\n    code = main(['run', sys.argv[1]])\n"
              "except SystemExit as stop:\n    code = stop.code\nprint('ray started' if ray.is_initialized() else 'no ray')\n"
              "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script, str(config)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "no ray"
    lines = done.stderr.strip().splitlines()
    assert lines == ["raygossip run: error: faults.chaos.every_s: must be a finite number, got nan"], lines


def test_an_agent_listed_twice_at_one_round_is_an_error_and_at_two_rounds_dies_twice():
    data = quickstart()
    data["runtime"] = {"engine": "ray"}
    data["faults"] = {"kill": [{"agent": 1, "round": 3}, {"agent": 1, "round": 3}]}
    with pytest.raises(UserError, match="faults.kill: lists agent 1 twice at round 3"):
        load_config(base=data)
    data["faults"] = {"kill": [{"agent": 1, "round": 3}, {"agent": 1, "round": 9}]}
    assert [(k.agent, k.round) for k in load_config(base=data).faults.kill] == [(1, 3), (1, 9)]


# ------------------------------------------------------------ on Ray


def test_an_agent_killed_twice_is_restarted_twice(ray_cluster):
    """Agent 1 dies at round 7 in its first life and at round 30 in its second: two injected deaths, two restarts
    from snapshots, every record once, the CHOCO invariant at float tolerance at the end."""
    data = long_run()
    data["gossip"] = CHOCO
    data["faults"] = {"kill": [{"agent": 1, "round": 7}, {"agent": 1, "round": 30}]}
    config = load_config(base=data)
    engine, outcome = run_ray(config)
    try:
        extra = outcome["extra"]
        failures = extra["failures"]
        assert [(f["agent"], f["incarnation"], f.get("injected_round")) for f in failures] == [(1, 0, 7), (1, 1, 30)]
        assert all(f["action"] == "restarted" and 0 <= f["detection_s"] < 10.0 for f in failures), failures
        assert [f["restored_step"] for f in failures] == [5, 30]  # the snapshots after rounds 4 and 29
        assert extra["restarts"] == 2 and extra["dropped_agents"] == []
        restarted = [e for e in outcome["events"] if e["kind"] == "agent_restarted"]
        assert [(e["agent"], e["incarnation"]) for e in restarted] == [(1, 1), (1, 2)]
        steps = [r["step"] for r in outcome["records"]]
        assert steps == sorted(set(steps)) and steps[-1] == 80
        assert extra["steps_per_agent"] == [80] * 4
        assert extra["public_copy_error"] < 1e-5
    finally:
        engine.close()


def test_the_coordinator_killed_twice_mid_run_in_sync_mode_changes_nothing(ray_cluster):
    """Ray restarts the coordinator (max_restarts); it goes on from its ledger, the agents send again the reports it
    had not recorded: every record, every agent's parameters and the merged model equal the reference engine's."""
    import ray

    from conftest import assert_same_run
    from raygossip.engines.reference import ReferenceEngine

    data = small()
    data["gossip"] = CHOCO
    data["schedule"]["averaging_rate"] = {"kind": "constant"}
    data["train"].update(epochs=6, steps_per_epoch=12)
    data["runtime"]["timing"] = {"step_time_s": 0.05}
    config = load_config(base=data)
    reference = ReferenceEngine(config)
    expected = reference.run(progress=False)
    killed: list[int] = []
    engines: list = []

    def kill_coordinator(record: dict) -> None:
        killed.append(record["step"])
        if len(killed) in (1, 3):
            ray.kill(engines[0].coordinator, no_restart=False)

    from raygossip.engines.common import prepare
    from raygossip.engines.ray_engine import RayEngine
    from conftest import wait_for_idle_cluster

    wait_for_idle_cluster()
    engine = RayEngine(config, prepare(config))
    engines.append(engine)
    try:
        outcome = engine.run(kill_coordinator)
        assert outcome["extra"]["coordinator_deaths"] == 2
        restarted = [e for e in outcome["events"] if e["kind"] == "coordinator_restarted"]
        assert [e["deaths"] for e in restarted] == [1, 2]
        assert outcome["extra"]["failures"] == [] and outcome["extra"]["steps_per_agent"] == [72] * 4
        assert_same_run(engine, outcome, reference, expected)
        assert outcome["extra"]["public_copy_error"] < 1e-5
    finally:
        engine.close()


# ------------------------------------------------------------ the coordinator's parts, alone (no Ray)


def test_roster_knows_who_hosts_whom_and_survives_a_save():
    from raygossip.engines.roster import Roster

    roster = Roster(["a", "a", "b", "b", "c"], [[0, 1], [2, 3], [4]], wait_timeout_s=1.0)
    roster.dropped.add(3)
    assert roster.live() == [0, 1, 2, 4] and roster.live(exclude=[0]) == [1, 2, 4]
    assert roster.hosts([0, 1, 2, 4]) == ["a", "b", "c"] and roster.actor_mates(3) == [2, 3]
    roster.replace(1, [2], "b2", "run-g1-i1-c0")
    roster.incarnations[2] += 1
    again = Roster(["a", "a", "b", "b", "c"], [[0, 1], [2, 3], [4]], wait_timeout_s=1.0)
    saved = json.loads(json.dumps(roster.saved()))
    again.incarnations, again.restarts, again.dropped = saved["incarnations"], saved["restarts"], set(saved["dropped"])
    assert again.incarnations == [0, 0, 1, 0, 0] and again.dropped == {3}
    assert saved["host_names"] == {"1": "run-g1-i1-c0"}


def test_checkpoint_barrier_completes_once_every_live_agent_offered_and_ignores_written_steps():
    from raygossip.engines.run_checkpoints import CheckpointBarrier

    barrier = CheckpointBarrier("out")
    assert not barrier.offer(0, 9, ("s0", {}), live=[0, 1, 2])
    assert not barrier.offer(1, 9, ("s1", {}), live=[0, 1, 2])
    assert barrier.complete([0, 1]) == [9]  # agent 2 was dropped meanwhile
    assert barrier.offer(2, 9, ("s2", {}), live=[0, 1, 2])
    assert sorted(barrier.take(9)) == [0, 1, 2] and barrier.take(9) is None
    barrier.written.add(9)
    assert not barrier.offer(0, 9, ("again", {}), live=[0])  # offered again after a coordinator restart


def test_record_book_says_what_is_recorded_and_comes_back_from_its_save():
    from raygossip.engines.records import RecordBook, Report

    book = RecordBook()
    report = Report(0.5, {}, 1.0, {}, 0)
    assert book.recorded_below() == 0
    assert not book.add(0, 11, report, live=[0, 1]) and book.recorded_below() == 11
    assert book.add(1, 11, report, live=[0, 1])
    book.take(11)
    book.publish({"step": 12})
    assert book.recorded_below() == 12
    book.add(0, 23, report, live=[0, 1])
    again = RecordBook.restored(json.loads(json.dumps(book.saved())))
    assert again.records == [{"step": 12}] and again.delivered == [{"step": 12}]
    assert not again.wants(11) and again.wants(23) and again.pending == {}  # pending reports are sent again


def test_ledger_writes_whole_states_atomically_and_loads_them_back(tmp_path):
    import threading

    from raygossip.engines.ledger import Ledger

    state = {"records": [], "loss": float("nan")}
    lock = threading.Condition()
    ledger = Ledger(str(tmp_path), lambda: dict(state), lock, every_s=0.01)
    assert ledger.load() is None
    state["records"] = [{"step": 12}]
    ledger.save()
    loaded = ledger.load()
    assert loaded["records"] == [{"step": 12}] and loaded["loss"] != loaded["loss"]  # NaN stays NaN
    state["records"].append({"step": 24})
    ledger.touch()
    deadline = time.time() + 5
    while len(ledger.load()["records"]) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert len(ledger.load()["records"]) == 2
    ledger.close()
    state["records"] = []
    ledger.save()
    assert len(ledger.load()["records"]) == 2  # closed: nothing more is written
    assert [p.name for p in tmp_path.iterdir()] == ["coordinator-ledger.json"]  # no temporary file left


@pytest.mark.parametrize("target, k, placement", [("actor", 2, "PACK"), ("node", 1, "SPREAD")])
def test_time_rate_chaos_kills_actors_or_nodes_and_every_death_is_recovered(ray_cluster, target, k, placement):
    """The driver kills at seeded times (faults.chaos.every_s): a random actor (both of its agents die), or every
    agent actor on a random node of the two-node test cluster; all come back from their snapshots."""
    data = long_run()
    data["gossip"] = CHOCO
    data["runtime"].update(agents_per_actor=k, placement=placement, max_restarts=10)
    data["faults"] = {"chaos": {"every_s": 1.0, "target": target, "start": 1.0, "max_deaths": 2}}
    engine, outcome = run_ray(load_config(base=data))
    try:
        extra = outcome["extra"]
        kills = extra["chaos_kills"]
        assert len(kills) == 2 and all(kill["target"] == target for kill in kills), kills
        killed = sorted(i for kill in kills for i in kill["agents"])
        failures = extra["failures"]
        if target == "actor":  # the drawn agent and its actor mate
            assert sorted(f["agent"] for f in failures) == sorted(j for i in killed for j in (i - i % 2, i - i % 2 + 1))
        else:
            assert sorted(f["agent"] for f in failures) == killed
            nodes = {p["agent"]: p["node"] for p in engine.placement}
            assert all(len({nodes[i] for i in kill["agents"]}) == 1 for kill in kills)
        assert all(f["action"] == "restarted" and "recovery_s" in f for f in failures), failures
        assert all(0 <= f["detection_s"] < 10.0 for f in failures if f["agent"] in killed), failures
        assert extra["steps_per_agent"] == [80] * 4
        assert extra["public_copy_error"] < 1e-5
    finally:
        engine.close()
