"""The Ray engine against the reference engine (sync), and its async, timing and multi-node behaviour."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from raygossip.validation import load_config
from raygossip.engines.common import agent_threads
from raygossip.engines.reference import ReferenceEngine

from conftest import assert_same_run, run_ray, small, wait_for_idle_cluster


CHOCO_TOPK = {"rule": "choco", "gamma": 0.5, "compressor": {"name": "top_k", "ratio": 0.1}}


ADAGOSSIP_QSGD = {"rule": "adagossip", "gamma": 0.5, "compressor": {"name": "qsgd", "bits": 4}}


@pytest.mark.parametrize(
    "gossip, transport, inline_bytes, agents_per_actor",
    [
        ({"rule": "dpsgd"}, "auto", 1 << 20, 1),
        (CHOCO_TOPK, "auto", 1 << 20, 1),
        (ADAGOSSIP_QSGD, "auto", 1 << 20, 1),
        (CHOCO_TOPK, "calls", 1 << 20, 1),
        (CHOCO_TOPK, "calls", 0, 1),
        ({"rule": "dpsgd"}, "auto", 1 << 20, 2),
        (ADAGOSSIP_QSGD, "auto", 1 << 20, 3),
        (CHOCO_TOPK, "calls", 0, 4),
    ],
    ids=["dpsgd", "choco-topk", "adagossip-qsgd", "choco-topk-calls", "choco-topk-calls-object-store",
         "dpsgd-2-per-actor", "adagossip-qsgd-3-per-actor", "choco-topk-4-per-actor"],
)
def test_sync_mode_reproduces_the_reference_engine_exactly(ray_cluster, gossip, transport, inline_bytes,
                                                           agents_per_actor):
    """auto: the agents (all on the head node: PACK) gossip through shared-memory channels; calls: by actor calls,
    with each message inside its call or (inline_bytes 0) put into the object store once. With k agents per actor
    the links inside an actor stay in memory (k = 3 of 4 agents: actors of 3 and 1; k = 4: no Ray message)."""
    data = small()
    data["runtime"].update(transport=transport, inline_bytes=inline_bytes, agents_per_actor=agents_per_actor)
    data["gossip"] = gossip
    if gossip["rule"] != "dpsgd":
        data["schedule"]["averaging_rate"] = {"kind": "constant"}
    config = load_config(base=data)
    reference = ReferenceEngine(config)
    expected = reference.run(progress=False)
    engine, outcome = run_ray(config)
    try:
        assert_same_run(engine, outcome, reference, expected)
        placement = outcome["extra"]["placement"]
        groups = {1: [[0], [1], [2], [3]], 2: [[0, 1], [2, 3]], 3: [[0, 1, 2], [3]], 4: [[0, 1, 2, 3]]}
        assert placement["groups"] == groups[agents_per_actor]
        assert placement["links_inside_actors"] == {1: 0, 2: 4, 3: 4, 4: 8}[agents_per_actor]
        assert len({p["pid"] for p in engine.placement}) == len(placement["groups"])
        crossing = agents_per_actor < 4
        assert outcome["extra"]["transport"] == ("channels" if transport == "auto" else "calls")
        by_reference = outcome["extra"]["sent_by_reference"]
        assert by_reference > 0 if inline_bytes == 0 and crossing else by_reference == 0
    finally:
        engine.close()


def straggler_config(mode: str):
    data = small(runtime__mode=mode)
    data["gossip"] = {"rule": "choco", "gamma": 0.5, "compressor": {"name": "top_k", "ratio": 0.2}}
    data["schedule"]["averaging_rate"] = {"kind": "constant"}
    data["train"].update(epochs=3, steps_per_epoch=15)
    data["eval"] = {"every": 0}
    data["runtime"]["timing"] = {"slowdown": [1.0, 1.0, 1.0, 4.0], "step_time_s": 0.03}
    return load_config(base=data)


@pytest.mark.parametrize(
    "torch_threads, num_cpus_per_agent, threads",
    [(None, None, 1), (None, 0.25, 1), (None, 1.0, 1), (None, 2.5, 2), (3, None, 3), (3, 0.5, 3)],
)
def test_both_engines_step_an_agent_with_the_same_torch_threads(torch_threads, num_cpus_per_agent, threads):
    data = small()
    data["runtime"].update(torch_threads=torch_threads, num_cpus_per_agent=num_cpus_per_agent)
    config = load_config(base=data)
    assert agent_threads(config.runtime) == threads
    before = torch.get_num_threads()
    try:
        ReferenceEngine(config)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_the_reference_engine_gives_the_same_numbers_whatever_the_callers_torch_threads():
    """AdaGossip with stochastic QSGD turns a last-bit difference into a visible one: on an AVX-512 CPU a run stepped
    with two torch threads differed from one stepped with one by 1.4e-5, as the Ray engine's agents (one thread) did
    from the reference engine left at torch's default."""
    data = small()
    data["gossip"] = {"rule": "adagossip", "gamma": 0.5, "compressor": {"name": "qsgd", "bits": 4}}
    data["schedule"]["averaging_rate"] = {"kind": "constant"}
    config = load_config(base=data)
    before = torch.get_num_threads()
    vectors = []
    try:
        for caller_threads in (2, 1):
            torch.set_num_threads(caller_threads)
            engine = ReferenceEngine(config)
            engine.run(progress=False)
            vectors.append(engine.agent_vectors())
    finally:
        torch.set_num_threads(before)
    for first, second in zip(*vectors):
        assert torch.equal(first, second)


def test_async_with_a_straggler_is_faster_and_stays_consistent(ray_cluster):
    timings = {}
    for mode in ("sync", "async"):
        engine, outcome = run_ray(straggler_config(mode))
        try:
            timings[mode] = (engine.train_s, outcome["merged_accuracy"], outcome["extra"]["steps_per_agent"])
            if mode == "async":
                error = engine.choco_consistency_error()
                assert error < 1e-5, f"s_i != sum_j W_ij x_hat_j after an async run (max error {error})"
        finally:
            engine.close()
    sync_s, sync_acc, sync_steps = timings["sync"]
    async_s, async_acc, async_steps = timings["async"]
    assert sync_steps == [45] * 4
    assert async_steps[3] < 45 and max(async_steps) == 45  # the straggler was stopped early
    # sync waits for the 4x slower agent every round: 45 steps x 0.12 s; async runs at the fast agents' pace
    assert sync_s > 45 * 0.12 * 0.9
    assert async_s < 0.6 * sync_s, timings
    assert async_acc > 0.6, timings


def test_async_dpsgd_keeps_mixing_with_the_last_model_of_a_neighbour_that_sent_nothing_new(ray_cluster):
    """A straggler whose neighbours have finished still mixes, with their last models, in every round. Without
    that it took its last ~3/4 of the steps alone: final consensus distance 1.89 against sync's 0.0036 (with
    it: 0.023, measured)."""
    distances, reused = {}, {}
    for mode in ("sync", "async"):
        data = small(runtime__mode=mode, runtime__finish_quorum=1.0)
        data["schedule"]["averaging_rate"] = {"kind": "constant", "gamma0": 1.0}
        data["train"].update(epochs=3, steps_per_epoch=15)
        data["eval"] = {"every": 0}
        data["runtime"]["timing"] = {"slowdown": [1.0, 1.0, 1.0, 4.0], "step_time_s": 0.03}
        engine, outcome = run_ray(load_config(base=data))
        try:
            assert outcome["extra"]["steps_per_agent"] == [45] * 4
            distances[mode] = outcome["last"]["consensus_distance"]
            reused[mode] = outcome["extra"]["reused_models"]
        finally:
            engine.close()
    assert reused["sync"] == 0  # sync mode always has this round's model from every neighbour
    assert reused["async"] > 0
    assert distances["async"] < 25 * distances["sync"], distances


def test_link_latency_and_bandwidth_set_delivery_times(ray_cluster):
    data = small()
    data["train"].update(epochs=1, steps_per_epoch=6)
    data["gossip"] = {"rule": "dpsgd"}
    data["runtime"]["timing"] = {"latency_s": 0.05, "bandwidth_mbps": 8.0}
    config = load_config(base=data)
    engine, outcome = run_ray(config)
    try:
        message_bytes = outcome["last"]["bytes_sent"] / outcome["last"]["messages_sent"]
        expected_delay = 0.05 + message_bytes * 8 / 8e6
        delays = [link for event in outcome["events"] if event["kind"] == "link_delays"
                  for link in event["links"].values()]
        assert len(delays) == 8  # 4 agents x 2 ring neighbours
        for link in delays:
            assert link["min_s"] >= expected_delay - 1e-3
            assert link["mean_s"] < expected_delay + 0.25  # not much later than configured
    finally:
        engine.close()
    # with no latency the same messages are readable far sooner
    data["runtime"]["timing"] = {}
    engine, outcome = run_ray(load_config(base=data))
    try:
        fast = [link["mean_s"] for e in outcome["events"] if e["kind"] == "link_delays" for link in e["links"].values()]
        assert np.mean(fast) < expected_delay
    finally:
        engine.close()


def test_agents_spread_over_two_nodes_train_to_the_end(ray_cluster):
    data = small(runtime__placement="SPREAD")
    config = load_config(base=data)
    engine, outcome = run_ray(config)
    try:
        assert len(ray_cluster.list_all_nodes()) == 2
        assert len(outcome["extra"]["nodes"]) == 2, "SPREAD should use both nodes"
        assert outcome["extra"]["transport"] == "calls"  # a channel's reader must be on its writer's node
        assert outcome["extra"]["steps_per_agent"] == [24] * 4
        assert outcome["merged_accuracy"] > 0.6
    finally:
        engine.close()


def test_bounded_mode_never_waits_past_the_staleness_bound(ray_cluster):
    config = straggler_config("bounded")
    config.runtime.staleness = 1
    config.runtime.wait_timeout_s = 20.0
    engine, outcome = run_ray(config)
    try:
        assert outcome["extra"]["wait_timeouts"] == 0, "an agent waited for a message that had already been taken"
        assert engine.choco_consistency_error() < 1e-5
        assert outcome["merged_accuracy"] > 0.6
    finally:
        engine.close()


def test_a_run_may_last_far_longer_than_its_wait_timeout(ray_cluster):
    # 110 steps of 0.1 s each: over 11 s, ten times runtime.wait_timeout_s; only a stall is an error
    data = small(runtime__wait_timeout_s=1.0)
    data["train"].update(epochs=1, steps_per_epoch=110)
    data["eval"] = {"every": 0}
    data["runtime"]["timing"] = {"step_time_s": 0.1}
    engine, outcome = run_ray(load_config(base=data))
    try:
        assert engine.train_s > 10 * 1.0
        assert outcome["extra"]["steps_per_agent"] == [110] * 4
    finally:
        engine.close()


def test_a_stalled_run_stops_with_one_line_exit_status_3_and_its_outputs(ray_cluster, tmp_path, capsys):
    """No agent takes a step within runtime.wait_timeout_s (every step takes 3 s, the window is 1 s)."""
    from raygossip.cli import main

    out = tmp_path / "run"
    wait_for_idle_cluster()
    code = main(["run", "--no-progress", "--out", str(out), "--address", ray_cluster.address,
                 "--set", "agents.count=4", "--set", "model.hidden=[32]", "--set", "runtime.num_cpus_per_agent=0.5",
                 "--set", "train.epochs=1", "--set", "train.steps_per_epoch=4", "--set", "runtime.wait_timeout_s=1.0",
                 "--set", "runtime.timing.step_time_s=3.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("raygossip run: runtime.wait_timeout_s: run aborted: the run stalled"), err
    assert "Traceback" not in "\n".join(err)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "aborted"
    stalled = [e for e in summary["events"] if e["kind"] == "run_stalled"]
    assert len(stalled) == 1 and stalled[0]["agents"] == [0, 1, 2, 3]
