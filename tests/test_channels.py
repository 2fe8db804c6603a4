"""Shared-memory links between two real actors on one node: order, back-pressure, closing, doorbells."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raygossip.engines.channels import BUFFERS, SEMAPHORE_DIR, ChannelLinks, named_semaphores


@ray.remote(num_cpus=0.1, max_concurrency=2)
class End:
    """One end of a link: the ChannelLinks an agent holds, driven step by step by the test (two threads, as
    an agent's training and control threads: one may close a link while the other waits on it)."""

    def __init__(self) -> None:
        self.links = ChannelLinks()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def open(self, reader, node: str) -> dict:
        return self.links.open(ray.get_runtime_context().current_actor, {1: (reader, node)}, 8192)

    def attach(self, made: dict) -> None:
        self.links.attach({0: made[1]})

    def write(self, letters: list[tuple], timeout_s: float) -> list[bool]:
        return [self.links.write(1, letter, time.time() + timeout_s) for letter in letters]

    def pull(self, until_round: int, timeout_s: float) -> list[tuple]:
        got: list[tuple] = []
        satisfied = lambda: bool(got) and got[-1][3] >= until_round  # noqa: E731
        got.extend(self.links.pull(0, satisfied, time.time() + timeout_s))
        return got

    def close(self, peer: int) -> None:
        self.links.close(peer)

    def seal(self) -> None:
        self.links.seal()


def letter(round_index: int, size: int = 1000) -> tuple:
    arrays = {"values": np.arange(size, dtype=np.float32) + round_index}
    return (0, 0, round_index, round_index, "q", ("value", size, arrays), time.time(), 0.0)


def wired_link() -> tuple:
    """A writer (0) and a reader (1) on the head node, wired by a channel and its doorbell, sealed."""
    head = ray.get_runtime_context().get_node_id()
    here = NodeAffinitySchedulingStrategy(head, soft=False)
    writer, reader = End.options(scheduling_strategy=here).remote(), End.options(scheduling_strategy=here).remote()
    made = ray.get(writer.open.remote(reader, ray.get(reader.node.remote())))
    ray.get(reader.attach.remote(made))
    ray.get(writer.seal.remote())
    return writer, reader


@pytest.fixture()
def link(ray_cluster):
    writer, reader = wired_link()
    yield writer, reader
    ray.kill(writer)
    ray.kill(reader)


def test_a_sealed_link_leaves_no_semaphore_names_behind_and_still_carries_letters(ray_cluster):
    """Ray's channels make two named semaphores per buffer and remove them only when a process that opened them
    exits by itself; agents are killed, so the writer unlinks their names once the reader has opened them."""
    before = named_semaphores()
    head = ray.get_runtime_context().get_node_id()
    here = NodeAffinitySchedulingStrategy(head, soft=False)
    writer, reader = End.options(scheduling_strategy=here).remote(), End.options(scheduling_strategy=here).remote()
    made = ray.get(writer.open.remote(reader, ray.get(reader.node.remote())))
    ray.get(reader.attach.remote(made))
    if os.path.isdir(SEMAPHORE_DIR):  # Linux: named semaphores are files there
        assert len(named_semaphores() - before) == 2 * BUFFERS
    ray.get(writer.seal.remote())
    pulled = reader.pull.remote(BUFFERS, 30.0)
    assert ray.get(writer.write.remote([letter(r, 100) for r in range(BUFFERS + 1)], 30.0)) == [True] * (BUFFERS + 1)
    assert [g[3] for g in ray.get(pulled)] == list(range(BUFFERS + 1))
    ray.kill(writer)
    ray.kill(reader)
    assert named_semaphores() - before == set()


def test_letters_arrive_whole_and_in_order_and_larger_ones_resize_the_channel(link):
    writer, reader = link
    sizes = [1000, 1000, 50_000, 1000]  # 200 KB: larger than the 8 KB channel was made for
    pulled = reader.pull.remote(len(sizes) - 1, 30.0)
    for r, size in enumerate(sizes):
        assert ray.get(writer.write.remote([letter(r, size)], 30.0)) == [True]
    got = ray.get(pulled)
    assert [g[3] for g in got] == [0, 1, 2, 3]
    for r, (g, size) in enumerate(zip(got, sizes)):
        assert g[5][1] == size
        np.testing.assert_array_equal(g[5][2]["values"], np.arange(size, dtype=np.float32) + r)


def test_a_writer_stops_when_its_reader_is_buffers_behind_and_then_falls_back(link):
    writer, reader = link
    written = ray.get(writer.write.remote([letter(r) for r in range(BUFFERS + 1)], 0.5))
    assert written == [True] * BUFFERS + [False]  # the reader read nothing: the next write timed out
    # the link is given up: every later letter goes by call (write says False at once)
    began = time.time()
    assert ray.get(writer.write.remote([letter(BUFFERS + 1)], 30.0)) == [False]
    assert time.time() - began < 5.0
    assert [g[3] for g in ray.get(reader.pull.remote(BUFFERS - 1, 10.0))] == list(range(BUFFERS))


def test_a_closed_link_ends_a_blocked_read_and_refuses_writes(link):
    writer, reader = link
    began = time.time()
    pulled = reader.pull.remote(0, 60.0)  # nothing was written: it waits on the doorbell
    time.sleep(0.5)
    ray.get(reader.close.remote(0))
    assert ray.get(pulled) == []
    assert time.time() - began < 10.0  # it stopped when closed, long before its 60 s deadline
    ray.get(writer.close.remote(1))
    assert ray.get(writer.write.remote([letter(0)], 30.0)) == [False]


def test_a_read_waits_without_spinning(link):
    """Ray's channel read spins while it waits; the doorbell wait must not (it would take a core from the
    agents that compute)."""
    writer, reader = link

    pid = ray.get(reader.__ray_call__.remote(lambda self: os.getpid()))
    before = cpu_seconds(pid)
    pulled = reader.pull.remote(0, 60.0)
    time.sleep(2.0)
    ray.get(writer.write.remote([letter(0)], 30.0))
    assert [g[3] for g in ray.get(pulled)] == [0]
    assert cpu_seconds(pid) - before < 0.5, "the reader burnt CPU while it waited 2 s"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def config_with(**runtime):
    from raygossip.validation import load_config
    from raygossip.presets import quickstart

    data = quickstart()
    data["runtime"] = {"engine": "ray", **runtime}
    return load_config(base=data)


ONE_NODE = [{"node": "a", "message_bytes": 1_000_000}] * 4
TWO_NODES = [{"node": "a", "message_bytes": 1_000_000}] * 2 + [{"node": "b", "message_bytes": 1_000_000}] * 2


@pytest.mark.parametrize(
    "runtime, placement, store_bytes, want, why",
    [
        ({}, ONE_NODE, 2**30, "channels", "a sync run on one node"),
        ({"transport": "calls"}, ONE_NODE, 2**30, "calls", "runtime.transport is calls"),
        ({"mode": "async"}, ONE_NODE, 2**30, "calls", "runtime.mode is async"),
        ({"mode": "bounded"}, ONE_NODE, 2**30, "calls", "runtime.mode is bounded"),
        ({}, TWO_NODES, 2**30, "calls", "more than one node"),
        # 8 links x 3 letters x (1 MB + envelope) = 25.6 MB: more than half of a 40 MB store
        ({}, ONE_NODE, 40 * 2**20, "calls", "more than half of the node's 40 MiB object store"),
    ],
)
def test_auto_picks_channels_only_for_sync_runs_on_one_node_that_fit(runtime, placement, store_bytes, want, why):
    from raygossip.engines.ray_engine import pick_transport

    transport, reason = pick_transport(config_with(**runtime), placement, 8, store_bytes)
    assert transport == want
    assert why in reason
