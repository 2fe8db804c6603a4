"""Scenario timelines: config and builder, the compiled conditions per round, the plan they change, both engines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raygossip import api
from raygossip.algorithms.topology import build_topology
from raygossip.validation import load_config
from raygossip.core.plan import RunPlan
from raygossip.core.timeline import ACTIONS, LinkState, compile_timeline, cut_mixing, lost_on_link
from raygossip.engines.reference import ReferenceEngine
from raygossip.errors import UserError
from raygossip.presets import quickstart
from raygossip.timeline_builder import Timeline

HALVES = [[0, 1, 2, 3], [4, 5, 6, 7]]


def config_with(timeline: list[dict], **sections) -> object:
    base = {"agents": {"count": 8}, "train": {"epochs": 10, "steps_per_epoch": 10}, "timeline": timeline}
    base.update(sections)
    return load_config(base=base)


# ---------------------------------------------------------------- config and builder


def test_the_builder_gives_the_shapes_users_write():
    built = (Timeline().at(round=20).slow([3], 4).at(round=30).partition(HALVES).at(round=50).heal()
             .at(round=60).restore([3]).link(latency_s=0.01, edges=[[0, 1]]).topology("complete").gamma(0.5)
             .communication("probability", p=0.5).kill([2]).build())
    assert built == [
        {"round": 20, "action": "slow", "agents": [3], "factor": 4},
        {"round": 30, "action": "partition", "groups": HALVES},
        {"round": 50, "action": "heal"},
        {"round": 60, "action": "restore", "agents": [3]},
        {"round": 60, "action": "link", "latency_s": 0.01, "edges": [[0, 1]]},
        {"round": 60, "action": "topology", "topology": {"name": "complete"}},
        {"round": 60, "action": "gamma", "value": 0.5},
        {"round": 60, "action": "communication", "communication": {"kind": "probability", "p": 0.5}},
        {"round": 60, "action": "kill", "agents": [2]},
    ]
    config = config_with(built)
    assert [event.action for event in config.timeline] == [event["action"] for event in built]
    assert config.timeline[5].topology.name == "complete" and config.timeline[7].communication.p == 0.5


def test_an_event_needs_a_round_first():
    with pytest.raises(ValueError, match="at\\(round=R\\)"):
        Timeline().heal()


@pytest.mark.parametrize("timeline, field, phrase", [
    ([{"round": 1, "action": "slowe"}], "timeline[0].action",
     "unknown action 'slowe' (allowed: " + ", ".join(ACTIONS) + ")"),
    ([{"round": 1, "action": "heal", "colour": 1}], "timeline[0].colour", "unknown key"),
    ([{"round": 1, "action": "slow", "agents": [8], "factor": 2}], "timeline[0].agents[0]", "0..7, got 8"),
    ([{"round": 1, "action": "slow", "agents": [3]}], "timeline[0].factor", "slow needs factor"),
    ([{"round": 1, "action": "slow", "agents": [3], "factor": 0.5}], "timeline[0].factor", ">= 1"),
    ([{"round": 1, "action": "slow", "agents": [3, 3], "factor": 2}], "timeline[0].agents", "twice"),
    ([{"round": 1, "action": "restore", "agents": [3], "factor": 2}], "timeline[0].factor",
     "restore does not take factor (it takes: agents)"),
    ([{"round": 5, "action": "gamma", "value": 0.5}, {"round": 3, "action": "gamma", "value": 0.5}],
     "timeline[1].round", "previous event's round 5"),
    ([{"round": -1, "action": "heal"}], "timeline[0].round", ">= 0"),
    ([{"action": "heal"}], "timeline[0].round", "exactly one of round"),
    ([{"round": 2, "action": "heal"}], "timeline[0].action", "no partition in force"),
    ([{"round": 2, "action": "partition", "groups": [[0, 1], [1, 2]]}], "timeline[0].groups[1][0]", "two groups"),
    ([{"round": 2, "action": "partition", "groups": [list(range(8))]}], "timeline[0].groups", "splits nothing"),
    ([{"round": 2, "action": "link"}], "timeline[0].action", "at least one of latency_s"),
    ([{"round": 2, "action": "link", "loss": 1.0}], "timeline[0].loss", "[0, 1)"),
    ([{"round": 2, "action": "link", "latency_s": 0.1, "edges": [[1, 1]]}], "timeline[0].edges[0]", "two different"),
    ([{"round": 2, "action": "gamma", "value": 1.5}], "timeline[0].value", "(0, 1]"),
    ([{"round": 2, "action": "topology", "topology": {"name": "ringg"}}], "timeline[0].topology.name", "ringg"),
    ([{"round": 2, "action": "topology", "topology": {"name": "dyck"}}], "timeline[0].topology.name", "32"),
    ([{"round": 2, "action": "communication", "communication": {"kind": "every", "p": 0}}],
     "timeline[0].communication.p", "(0, 1]"),
    ([{"round": 2, "action": "kill", "agents": [1]}], "timeline[0].action", "runtime.engine: ray"),
    ([{"round": 2, "action": "link", "loss": 0.1}], "timeline[0].action", "runtime.engine: ray"),
])
def test_a_wrong_event_is_one_line_naming_its_field(timeline, field, phrase):
    with pytest.raises(UserError) as caught:
        config_with(timeline, runtime={"engine": "reference"})
    assert caught.value.field == field, str(caught.value)
    assert phrase in caught.value.message and "\n" not in str(caught.value)


@pytest.mark.parametrize("rule", ["choco", "adagossip"])
@pytest.mark.parametrize("event", [{"round": 3, "action": "partition", "groups": HALVES},
                                   {"round": 3, "action": "topology", "topology": {"name": "complete"}}])
def test_rules_with_public_copies_take_a_graph_change_and_keep_each_neighbours_copy(rule, event):
    config = config_with([event], gossip={"rule": rule, "compressor": {"name": "top_k", "ratio": 0.1}})
    assert compile_timeline(config).changes_graph
    with pytest.raises(UserError) as caught:  # (a graph that changes every round stays refused)
        config_with([{"round": 3, "action": "topology", "topology": {"name": "one_peer_exponential"}}],
                    gossip={"rule": rule, "compressor": {"name": "top_k", "ratio": 0.1}})
    assert caught.value.field == "timeline[0].topology.name" and "static graph" in caught.value.message


def test_an_agent_is_killed_once():
    with pytest.raises(UserError) as caught:
        config_with([{"round": 3, "action": "kill", "agents": [2]}], faults={"kill": [{"agent": 2, "round": 1}]})
    assert caught.value.field == "timeline[0].agents"


def test_an_event_past_the_run_is_an_error_before_it_starts():
    config = config_with([{"round": 100, "action": "gamma", "value": 0.5}], runtime={"engine": "reference"})
    with pytest.raises(UserError) as caught:
        api.run(config)
    assert str(caught.value) == "timeline[0].round: must be below the run's 100 rounds, got 100"


def test_batched_steps_with_a_timeline_is_one_line():
    with pytest.raises(UserError) as caught:
        config_with([{"round": 2, "action": "slow", "agents": [3], "factor": 4}],
                    runtime={"agents_per_actor": 2, "batched_steps": True})
    assert caught.value.field == "runtime.batched_steps" and "timeline" in caught.value.message


def test_a_timeline_survives_the_yaml_round_trip():
    from raygossip.config_io import dump_yaml, parse_yaml

    config = config_with(Timeline().at(round=3).topology("complete").communication("late", start=0.7).build())
    assert load_config(base=parse_yaml(dump_yaml(config))) == config


# ---------------------------------------------------------------- the compiled conditions


def test_conditions_per_round_follow_the_events():
    timeline = compile_timeline(config_with(
        Timeline().at(round=20).slow([3], 4).at(round=30).partition(HALVES).link(latency_s=0.5, edges=[[0, 1]])
        .at(round=40).link(bandwidth_mbps=10.0).at(round=50).heal().at(round=60).restore([3]).gamma(0.25).build(),
        runtime={"timing": {"latency_s": 0.01}}))
    table = [  # round, factor of agent 3, partition, link 0->1, link 1->0, link 2->3, gamma
        (0, 1.0, None, LinkState(0.01), LinkState(0.01), LinkState(0.01), None),
        (19, 1.0, None, LinkState(0.01), LinkState(0.01), LinkState(0.01), None),
        (20, 4.0, None, LinkState(0.01), LinkState(0.01), LinkState(0.01), None),
        (30, 4.0, tuple(map(tuple, HALVES)), LinkState(0.5), LinkState(0.5), LinkState(0.01), None),
        (45, 4.0, tuple(map(tuple, HALVES)), LinkState(0.5, 10.0), LinkState(0.5, 10.0), LinkState(0.01, 10.0), None),
        (50, 4.0, None, LinkState(0.5, 10.0), LinkState(0.5, 10.0), LinkState(0.01, 10.0), None),
        (99, 1.0, None, LinkState(0.5, 10.0), LinkState(0.5, 10.0), LinkState(0.01, 10.0), 0.25),
    ]
    for round_index, factor, groups, link01, link10, link23, gamma in table:
        c = timeline.at(round_index)
        assert (c.factors[3], c.groups, c.gamma) == (factor, groups, gamma), round_index
        assert (c.link_of(0, 1), c.link_of(1, 0), c.link_of(2, 3)) == (link01, link10, link23), round_index
        assert c.factors[:3] == (1.0, 1.0, 1.0)
    assert [timeline.factor(3, step, 2) for step in (39, 40, 119, 120)] == [1.0, 4.0, 4.0, 1.0]
    assert timeline.slows(3) and not timeline.slows(2)
    assert [(k, e.action) for k, e in timeline.events_at(30)] == [(1, "partition"), (2, "link")]
    assert timeline.events_at(31) == []


def test_restore_returns_to_the_configured_slowdown():
    timeline = compile_timeline(config_with(Timeline().at(round=2).slow([1, 2], 5).at(round=4).restore([1, 2]).build(),
                                            runtime={"timing": {"slowdown": [1, 2, 1, 1, 1, 1, 1, 1]}}))
    assert [timeline.at(r).factors[:3] for r in (0, 2, 4)] == [(1.0, 2.0, 1.0), (1.0, 5.0, 5.0), (1.0, 2.0, 1.0)]


def test_link_delay_is_latency_plus_bytes_over_bandwidth():
    assert LinkState(0.01, 8.0).delay(1_000_000) == pytest.approx(1.01)
    assert LinkState(0.02).delay(10**9) == 0.02


def test_lost_on_link_is_seeded_and_near_its_rate():
    draws = [lost_on_link(0.3, 0, 1, 2, r) for r in range(4000)]
    assert draws == [lost_on_link(0.3, 0, 1, 2, r) for r in range(4000)]
    assert 0.27 < np.mean(draws) < 0.33
    assert not any(lost_on_link(0.0, 0, 1, 2, r) for r in range(100))


def test_cut_mixing_moves_cut_weight_to_the_self_weight():
    w = build_topology("ring", 8).mixing(0)
    cut = cut_mixing(w, tuple(map(tuple, HALVES)))
    third = 1 / 3
    assert np.allclose(cut.sum(axis=1), 1.0)
    assert cut[0, 7] == 0 and cut[7, 0] == 0 and cut[3, 4] == 0 and cut[4, 3] == 0
    assert cut[0, 0] == pytest.approx(2 * third) and cut[1, 1] == pytest.approx(third)
    assert cut[0, 1] == pytest.approx(third)
    assert cut_mixing(w, None) is w
    # agents in no group form one more group
    rest = cut_mixing(w, ((0, 1),))
    assert rest[1, 2] == 0 and rest[2, 3] > 0 and rest[7, 6] > 0 and rest[0, 7] == 0


# ---------------------------------------------------------------- the plan every node consults


def plan_of(timeline: list[dict], **sections) -> RunPlan:
    config = config_with(timeline, **sections)
    return RunPlan(config, build_topology("ring", 8), 10)


def test_a_partition_removes_the_links_between_groups_and_heal_brings_them_back():
    plan = plan_of(Timeline().at(round=30).partition(HALVES).at(round=50).heal().build())
    ring = {(i, (i + 1) % 8) for i in range(8)} | {((i + 1) % 8, i) for i in range(8)}
    cut = {(3, 4), (4, 3), (7, 0), (0, 7)}
    for round_index, edges in ((29, ring), (30, ring - cut), (49, ring - cut), (50, ring)):
        got = plan.round_plan(round_index)
        assert set(got.edges) == edges and got.round == round_index
        for self_weight, row in got.weights.values():
            assert self_weight + sum(row.values()) == pytest.approx(1.0)
    assert plan.round_plan(30).weights[0] == (pytest.approx(2 / 3), {1: pytest.approx(1 / 3)})


def test_topology_gamma_and_communication_switch_from_their_round():
    plan = plan_of(Timeline().at(round=40).topology("complete").gamma(0.5).at(round=60)
                   .communication("none").build(), schedule={"averaging_rate": {"kind": "constant", "gamma0": 0.8}})
    assert len(plan.round_plan(39).edges) == 16 and len(plan.round_plan(40).edges) == 56
    assert plan.round_plan(40).weights[0][0] == pytest.approx(1 / 8)
    assert [plan.gamma(r) for r in (39, 40, 99)] == [0.8, 0.5, 0.5]
    assert plan.round_plan(59) is not None and plan.round_plan(60) is None
    assert plan.communication(60).kind == "none"


def test_a_random_peer_cut_off_by_a_partition_keeps_its_own_model():
    plan = plan_of(Timeline().at(round=0).partition([[0]]).build(), schedule={"communication": {"pull": "random_peer"}})
    assert plan.round_plan(3).weights[0] == (1.0, {})
    assert all(0 not in edge for edge in plan.round_plan(3).edges)


def test_agents_that_left_have_no_links_and_their_neighbours_keep_stochastic_rows():
    plan = plan_of(Timeline().at(round=10).leave([5]).at(round=20).join([5]).build())
    assert {edge for edge in plan.round_plan(10).edges if 5 in edge} == set()
    assert 5 not in plan.round_plan(10).mixers and 5 in plan.round_plan(20).mixers
    assert plan.round_plan(10).weights[4] == (pytest.approx(2 / 3), {3: pytest.approx(1 / 3)})
    assert [plan.absent(5, step) for step in (9, 10, 19, 20)] == [False, True, True, False]
    assert plan.joins(20) == {5: ("neighbour", 4)} and plan.joins(19) == {}


def test_remove_absent_and_the_sponsor_of_a_joining_agent():
    w = build_topology("ring", 8).mixing(0)
    out = cut_mixing(w, None)
    from raygossip.core.timeline import pick_sponsor, remove_absent

    gone = remove_absent(w, frozenset({5, 6}))
    assert np.allclose(gone.sum(axis=1), 1.0) and gone[5, 5] == 1.0 and gone[6, 6] == 1.0
    assert gone[4, 5] == 0 and gone[7, 6] == 0 and gone[4, 4] == pytest.approx(2 / 3)
    assert remove_absent(out, frozenset()) is out
    everyone = frozenset(range(8))
    assert pick_sponsor(w, everyone - {5}, 5) == 4
    assert pick_sponsor(w, everyone - {4, 5}, 5) == 6
    assert pick_sponsor(w, frozenset({0, 1}), 5) == 0  # no neighbour there: the lowest-numbered agent
    assert pick_sponsor(w, frozenset(), 5) is None


@pytest.mark.parametrize("timeline, field, phrase", [
    ([{"round": 1, "action": "join", "agents": [5]}], "timeline[0].agents[0]", "there already"),
    ([{"round": 1, "action": "leave", "agents": [5]}, {"round": 2, "action": "leave", "agents": [5]}],
     "timeline[1].agents[0]", "already left"),
    ([{"round": 1, "action": "leave", "agents": list(range(8))}], "timeline[0].agents", "must stay"),
    ([{"round": 1, "action": "leave", "agents": [5]}, {"round": 2, "action": "join", "agents": [5], "start": "peer"}],
     "timeline[1].start", "neighbour, scratch"),
])
def test_a_wrong_leave_or_join_is_one_line_naming_its_field(timeline, field, phrase):
    with pytest.raises(UserError) as caught:
        config_with(timeline)
    assert caught.value.field == field and phrase in caught.value.message, str(caught.value)


@pytest.mark.parametrize("start", ["neighbour", "scratch"])
def test_a_joining_agent_starts_from_its_neighbours_model_or_the_initial_one(start):
    base = quickstart()
    base["train"].update(epochs=1, steps_per_epoch=8)
    base["runtime"] = {"engine": "reference", "progress": False}
    base["timeline"] = Timeline().at(round=2).leave([7]).at(round=4).join([7], start).build()
    engine = ReferenceEngine(load_config(base=base))
    initial = engine.agents[7].initial_state()["params"]
    left_with = None
    for step in range(4):
        for node in engine.nodes:
            node.local_step()
        engine.gossip_round(step)
        if step == 1:
            left_with = engine.agents[7].parameters_vector()
    assert engine.agents[7].step == 4 and not torch.equal(left_with, initial)
    assert torch.equal(engine.agents[7].parameters_vector(), left_with)  # it took no step and mixed nothing while away
    engine.nodes[7].leave_join.timeline_step(4)
    want = engine.agents[0].parameters_vector() if start == "neighbour" else initial  # agent 0: its first neighbour
    assert torch.equal(engine.agents[7].parameters_vector(), want)
    assert engine.agents[7].optimizer.state == {}


# ---------------------------------------------------------------- both engines


def must_show_config(engine: str) -> object:
    """8 agents on a ring: agent 3 slow from round 20 to 60, the ring split into halves from 30 to 50, agent 5 away
    from 40 to 70 (back from its neighbour 4's model); a record every 5 rounds (strongly non-IID shards, so the
    halves drift apart while split)."""
    base = quickstart()
    base["model"] = {"name": "mlp", "hidden": [32]}
    base["data"]["partition"] = {"kind": "dirichlet", "alpha": 0.1}
    base["train"].update(epochs=16, steps_per_epoch=5)
    base["schedule"]["averaging_rate"] = {"kind": "constant", "gamma0": 1.0}
    base["schedule"]["final_merge"] = {"enabled": False}
    base["eval"] = {"every": 1}
    base["runtime"] = {"engine": engine, "num_cpus_per_agent": 0.5, "agents_per_actor": 2, "progress": False,
                       "wait_timeout_s": 60.0}
    base["timeline"] = (Timeline().at(round=20).slow([3], 4).at(round=30).partition(HALVES).at(round=40).leave([5])
                        .at(round=50).heal().at(round=60).restore([3]).at(round=70).join([5], "neighbour").build())
    return load_config(base=base)


MUST_SHOW = [(20, "slow"), (30, "partition"), (40, "leave"), (50, "heal"), (60, "restore"), (70, "join")]


def timeline_events(events: list[dict]) -> list[tuple[int, str]]:
    return [(e["round"], e["action"]) for e in events if e["kind"] == "timeline"]


def distance_at(records: list[dict], round_index: int) -> float:
    return next(r["consensus_distance"] for r in records if r["round"] == round_index)


def test_a_partition_drives_the_agents_apart_until_it_heals_on_both_engines_alike(ray_cluster, tmp_path, monkeypatch):
    reference = ReferenceEngine(must_show_config("reference"))
    expected = reference.run(progress=False)
    assert timeline_events(expected["events"]) == MUST_SHOW
    records = expected["records"]
    assert [r["round"] for r in records] == list(range(5, 81, 5))
    away = [r["round"] for r in records if r.get("agents") == [0, 1, 2, 3, 4, 6, 7]]
    assert away == [45, 50, 55, 60, 65, 70] and all("agents" not in r for r in records if r["round"] not in away)
    split = [distance_at(records, r) for r in (30, 35, 40, 45, 50)]
    assert split == sorted(split) and split[-1] > 3 * split[0]  # rising all through the partition
    assert distance_at(records, 55) < split[-1] / 3 and distance_at(records, 60) < distance_at(records, 55)

    captured = {}
    make_engine = api.make_engine

    def capturing(config, setup=None):
        engine = make_engine(config, setup)
        close = engine.close

        def close_after_capture():
            captured["vectors"] = engine.agent_vectors()
            close()

        engine.close = close_after_capture
        return engine

    monkeypatch.setattr(api, "make_engine", capturing)
    result = api.run(must_show_config("ray"), out_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished"
    events = [e for e in summary["events"] if e["kind"] == "timeline"]
    assert timeline_events(events) == MUST_SHOW
    assert [(e["step"], e["agent"]) for e in events] == [(20, 3), (30, 0), (40, 5), (50, 0), (60, 3), (70, 5)]
    assert events[0]["factor"] == 4 and events[1]["groups"] == HALVES and all(e["time_s"] >= 0 for e in events)
    for got, want in zip(captured["vectors"], reference.agent_vectors(), strict=True):
        assert torch.equal(got, want)
    assert len(result.records) == len(records)
    for got, want in zip(result.records, records):
        for key in ("local_test_accuracy", "merged_test_accuracy", "bytes_sent", "messages_sent",
                    "consensus_distance", "train_loss", "gamma", "round", "communication_rounds"):
            assert got[key] == want[key], key
        assert got.get("agents") == want.get("agents")
    sleep = [phases.get("sleep", 0.0) for phases in summary["phase_s_per_agent"]]
    assert sleep[3] > 0 and all(s == 0 for k, s in enumerate(sleep) if k != 3)  # only agent 3 was slowed


def test_the_same_timeline_runs_to_the_end_in_async_mode(ray_cluster, tmp_path):
    """One agent per actor on two nodes (a joining agent's model crosses processes); agents at their own pace."""
    config = must_show_config("ray")
    config.runtime.mode, config.runtime.agents_per_actor, config.runtime.finish_quorum = "async", 1, 1.0
    config.runtime.wait_timeout_s = 180.0  # (a shared machine under load: no stall abort)
    result = api.run(config, out_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_per_agent"] == [80] * 8
    events = sorted((e for e in summary["events"] if e["kind"] == "timeline"), key=lambda e: e["round"])
    assert timeline_events(events) == MUST_SHOW and [e["step"] for e in events] == [20, 30, 40, 50, 60, 70]
    assert not [e for e in summary["events"] if e["kind"] == "join_timeout"]
    records = result.records  # (agents at their own pace are further apart than in sync mode, and by chance)
    assert distance_at(records, 50) > distance_at(records, 30)  # apart while split
    assert distance_at(records, 60) < distance_at(records, 50)  # together again after the heal
    assert [r["round"] for r in records if "agents" in r] == [45, 50, 55, 60, 65, 70]


def test_link_and_kill_events_on_the_ray_engine(ray_cluster, tmp_path):
    """A lossy link and a slow edge from round 5, agent 2 killed at round 10 (then restarted from its snapshot)."""
    base = quickstart()
    base["agents"] = {"count": 4}
    base["model"] = {"name": "mlp", "hidden": [16]}
    base["train"].update(epochs=3, steps_per_epoch=10)
    base["eval"] = {"every": 1}
    base["runtime"] = {"engine": "ray", "num_cpus_per_agent": 0.5, "progress": False, "wait_timeout_s": 60.0,
                       "snapshot_every": 4, "timing": {"latency_s": 0.001}}
    base["timeline"] = (Timeline().at(round=5).link(loss=0.3).link(latency_s=0.2, edges=[[0, 1]])
                        .at(round=10).kill([2]).build())
    api.run(load_config(base=base), out_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["lost_messages"] > 0
    assert timeline_events(summary["events"]) == [(5, "link"), (5, "link"), (10, "kill")]
    assert [(e["agent"], e["round"]) for e in summary["events"] if e["kind"] == "fault_injected"] == [(2, 10)]
    assert [e["agent"] for e in summary["events"] if e["kind"] == "agent_restarted"] == [2]
    delays = {e["agent"]: e["links"] for e in summary["events"] if e["kind"] == "link_delays"}
    slow, other = delays[1]["0"], delays[1]["2"]  # what agent 1 saw of its links from 0 and 2: only 0-1 is slow
    assert slow["min_s"] < 0.1 and slow["mean_s"] > 0.15 > other["mean_s"]  # (slow from round 5 of 30 on)


# ---------------------------------------------------------------- wall-clock events (Ray engine)


def test_a_wall_clock_event_is_in_force_only_once_scheduled():
    config = config_with([{"round": 10, "action": "gamma", "value": 0.5}, {"time_s": 2.0, "action": "gamma", "value": 0.25},
                          {"time_s": 3.0, "action": "slow", "agents": [2], "factor": 3}])
    timeline = compile_timeline(config)
    assert timeline.timed == [(2.0, 1), (3.0, 2)] and [timeline.at(r).gamma for r in (9, 10, 99)] == [None, 0.5, 0.5]
    later = timeline.schedule(1, 40)
    assert [later.at(r).gamma for r in (39, 40)] == [0.5, 0.25] and later.generation == 1
    assert [(k, e.action) for k, e in later.events_at(40)] == [(1, "gamma")]
    assert not later.slows(2) and later.schedule(2, 50).slows(2)
    early = later.schedule(2, 5)  # before a round event: applied in round order
    assert early.at(5).factors[2] == 3.0 and early.at(9).gamma is None


@pytest.mark.parametrize("timeline, field, phrase", [
    ([{"time_s": 2.0, "action": "heal"}], "timeline[0].action", "no partition in force"),
    ([{"time_s": 2.0, "action": "gamma", "value": 0.5}, {"time_s": 1.0, "action": "gamma", "value": 0.5}],
     "timeline[1].time_s", "previous event's time_s 2.0"),
    ([{"time_s": -1.0, "action": "heal"}], "timeline[0].time_s", ">= 0"),
    ([{"round": 1, "time_s": 1.0, "action": "heal"}], "timeline[0].round", "exactly one"),
])
def test_a_wrong_wall_clock_event_is_one_line(timeline, field, phrase):
    with pytest.raises(UserError) as caught:
        config_with(timeline)
    assert caught.value.field == field and phrase in caught.value.message, str(caught.value)


@pytest.mark.parametrize("steps, elapsed, local, want", [
    ([10, 12, 11], 1.0, 1, 12 + 6),  # 12 rounds a second: 6 in half a second
    ([10, 12, 11], 10.0, 1, 12 + 2),  # slow agents: at least 2 rounds ahead
    ([40, 41], 1.0, 4, 10 + 5),
    ([0, 0], 0.0, 1, 2),
])
def test_a_wall_clock_event_is_scheduled_past_the_farthest_agent(steps, elapsed, local, want):
    from raygossip.core.timeline import schedule_round

    assert schedule_round(steps, elapsed, local) == want


def test_the_reference_engine_ignores_wall_clock_events_and_says_so():
    base = quickstart()
    base["train"].update(epochs=1, steps_per_epoch=4)
    base["runtime"] = {"engine": "reference", "progress": False}
    base["timeline"] = [{"time_s": 0.0, "action": "gamma", "value": 0.25}]
    outcome = ReferenceEngine(load_config(base=base)).run(progress=False)
    assert [e["index"] for e in outcome["events"] if e["kind"] == "timeline_ignored"] == [0]
    assert outcome["records"][-1]["gamma"] != 0.25


def test_the_coordinator_schedules_wall_clock_events_a_few_rounds_ahead(ray_cluster, tmp_path):
    base = quickstart()
    base["agents"] = {"count": 4}
    base["model"] = {"name": "mlp", "hidden": [16]}
    base["train"].update(epochs=10, steps_per_epoch=8)
    base["schedule"]["averaging_rate"] = {"kind": "constant", "gamma0": 1.0}
    base["eval"] = {"every": 1}
    base["runtime"] = {"engine": "ray", "num_cpus_per_agent": 0.5, "progress": False, "wait_timeout_s": 60.0,
                       "timing": {"step_time_s": 0.05}}
    base["timeline"] = [{"time_s": 1.0, "action": "gamma", "value": 0.5}, {"time_s": 1.0, "action": "slow", "agents": [1], "factor": 2}]
    result = api.run(load_config(base=base), out_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished"
    scheduled = {e["index"]: e["round"] for e in summary["events"] if e["kind"] == "timeline_scheduled"}
    assert sorted(scheduled) == [0, 1] and all(2 <= r < 80 for r in scheduled.values())
    applied = {e["index"]: (e["round"], e["agent"]) for e in summary["events"] if e["kind"] == "timeline"}
    assert applied == {0: (scheduled[0], 0), 1: (scheduled[1], 1)}
    for record in result.records:
        assert record["gamma"] == (0.5 if record["round"] - 1 >= scheduled[0] else 1.0)


def test_a_resumed_run_keeps_its_wall_clock_events_and_the_clock_runs_only_those_not_yet_due():
    """The checkpoint says which wall-clock events were scheduled (and at which round) or skipped: after a resume the
    first is in force at its round again (its round may still be ahead) and the clock passes over both; only the
    third, not yet due at the checkpoint, is scheduled, once."""
    import time
    from types import SimpleNamespace

    from raygossip.engines.timeline_clock import restore_schedule, run_clock

    config = config_with([{"time_s": 0.0, "action": "gamma", "value": 0.5},
                          {"time_s": 0.0, "action": "slow", "agents": [1], "factor": 2},
                          {"time_s": 0.0, "action": "restore", "agents": [1]}])
    plan = RunPlan(config, build_topology("ring", 8), 10)
    skipped = restore_schedule(plan, {"timeline_scheduled": {"0": 30}, "timeline_skipped": [1]})
    assert skipped == {1} and [plan.gamma(r) for r in (29, 30)] == [1.0, 0.5]
    told, events = [], []

    class Remote:
        def __init__(self, call):
            self.remote = call

    agent = SimpleNamespace(position=Remote(lambda i: 70), schedule_event=Remote(lambda k, r: told.append((k, r))))
    coordinator = SimpleNamespace(
        plan=plan, config=config, finished=None, aborted=None, started=time.time() - 5.0, timeline_skipped=skipped,
        roster=SimpleNamespace(agents=[agent] * 8, live=lambda: list(range(8)), gather=lambda refs: refs,
                               hosts=lambda live: [agent]),
        event=lambda kind, **fields: events.append((kind, fields.get("index"))))
    run_clock(coordinator)
    assert events == [("timeline_scheduled", 2)] and [k for k, _ in told] == [2]
    assert sorted(plan.timeline.scheduled) == [0, 2] and plan.timeline.scheduled[0] == 30


# ---------------------------------------------------------------- compressed gossip under a changing graph; adaptive gamma


def changing_graph_config(engine: str, rule: str = "choco") -> object:
    """6 agents on a ring, CHOCO top-10 % (or AdaGossip): split in halves at round 4, agent 4 away from 6 to 14, the
    halves healed at 10, the ring switched to the complete graph at 18; the adaptive averaging rate from 0.2 (a cosine
    learning rate, so the agents come together at the end)."""
    base = quickstart()
    base["agents"] = {"count": 6}
    base["model"] = {"name": "mlp", "hidden": [16]}
    base["data"]["partition"] = {"kind": "dirichlet", "alpha": 0.1}
    base["gossip"] = {"rule": rule, "compressor": {"name": "top_k", "ratio": 0.1}}
    base["train"].update(epochs=6, steps_per_epoch=4, lr_schedule={"kind": "cosine"})
    base["schedule"]["averaging_rate"] = {"kind": "adaptive", "gamma0": 0.2}
    base["schedule"]["final_merge"] = {"enabled": False}
    base["eval"] = {"every": 1}
    base["runtime"] = {"engine": engine, "num_cpus_per_agent": 0.5, "agents_per_actor": 2, "progress": False,
                       "wait_timeout_s": 60.0}
    base["timeline"] = (Timeline().at(round=4).partition([[0, 1, 2], [3, 4, 5]]).at(round=6).leave([4])
                        .at(round=10).heal().at(round=14).join([4], "neighbour").at(round=18).topology("complete")
                        .build())
    return load_config(base=base)


def test_adagossip_keeps_s_equal_to_the_weighted_public_copies_through_every_graph_change():
    outcome = ReferenceEngine(changing_graph_config("reference", "adagossip")).run(progress=False)
    assert outcome["extra"]["public_copy_error"] < 1e-5
    records = outcome["records"]
    assert [r.get("agents") for r in records] == [None, [0, 1, 2, 3, 5], [0, 1, 2, 3, 5], None, None, None]


def test_the_adaptive_rate_and_a_changing_graph_give_the_same_numbers_on_both_engines(ray_cluster, tmp_path):
    """CHOCO under partition, heal, leave, join and a topology switch, with the coordinator's adaptive gamma: the Ray
    engine in sync mode matches the reference engine exactly, and both keep s_i = sum_j W_ij x_hat_j."""
    reference = ReferenceEngine(changing_graph_config("reference")).run(progress=False)
    records = reference["records"]
    assert reference["extra"]["public_copy_error"] < 1e-5
    gammas = [r["gamma"] for r in records]
    assert gammas == sorted(gammas) and gammas[0] == 0.2 and gammas[-1] > 0.5  # rising as the agents agree
    set_at = {e["epoch"]: e["gamma"] for e in reference["events"] if e["kind"] == "gamma_set"}
    assert sorted(set_at) == [1, 2, 3, 4, 5] and [set_at[e] for e in range(1, 6)] == gammas[1:]
    assert distance_at(records, 12) > 3 * distance_at(records, 4) and distance_at(records, 20) < distance_at(records, 12) / 2

    result = api.run(changing_graph_config("ray"), out_dir=tmp_path)
    summary = result.summary
    assert summary["status"] == "finished" and summary["public_copy_error"] < 1e-5
    assert summary["adaptive_gamma"] == {str(e): g for e, g in set_at.items()} and summary["gamma"] == gammas[-1]
    assert timeline_events(summary["events"]) == [(4, "partition"), (6, "leave"), (10, "heal"), (14, "join"),
                                                  (18, "topology")]
    assert len(result.records) == len(records)
    for got, want in zip(result.records, records):
        for key in ("local_test_accuracy", "merged_test_accuracy", "bytes_sent", "messages_sent",
                    "consensus_distance", "train_loss", "gamma", "round"):
            assert got[key] == want[key], key
        assert got.get("agents") == want.get("agents")
