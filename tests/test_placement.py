"""Agents packed into actors by graph locality (runtime.agents_per_actor)."""

from __future__ import annotations

import pytest

from raygossip.algorithms.topology import build_topology
from raygossip.core.placement import agent_groups, auto_agents_per_actor, edges_inside


@pytest.mark.parametrize(
    "name, n, k, groups, inside",
    [
        ("ring", 8, 1, [[i] for i in range(8)], 0),
        ("ring", 8, 4, [[0, 1, 2, 3], [4, 5, 6, 7]], 12),  # 2 x 3 edges inside, both directions
        ("ring", 10, 4, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], 14),
        ("ring", 6, 6, [[0, 1, 2, 3, 4, 5]], 12),
        ("complete", 4, 2, [[0, 1], [2, 3]], 4),
    ],
)
def test_agents_are_grouped_in_contiguous_segments_that_keep_links_inside(name, n, k, groups, inside):
    mixing = build_topology(name, n, "uniform", {}).mixing(0)
    got = agent_groups(mixing, k)
    assert got == groups
    assert edges_inside(got, mixing) == (inside, int((mixing > 0).sum()) - n)


def test_a_scrambled_ring_is_grouped_along_the_graph_not_the_agent_order():
    """Agents numbered so that consecutive ids are never neighbours: reverse Cuthill-McKee finds the segments."""
    order = [0, 4, 1, 5, 2, 6, 3, 7]  # ring edges between consecutive entries (and 7 -> 0)
    edges = [[order[i], order[(i + 1) % 8]] for i in range(8)]
    mixing = build_topology("edges", 8, "uniform", {"edges": edges}).mixing(0)
    assert edges_inside([[0, 1, 2, 3], [4, 5, 6, 7]], mixing) == (0, 16)  # the agent order: no link inside
    groups = agent_groups(mixing, 4)
    assert groups == [[0, 3, 4, 7], [1, 2, 5, 6]]  # the ring's arcs 3-7-0-4 and 1-5-2-6: 3 edges each
    assert edges_inside(groups, mixing) == (12, 16)


@pytest.mark.parametrize("agents, cpus, gpus, k", [
    (8, 2, 0.0, 4),         # this laptop: one actor per CPU
    (16, 2, 0.0, 8),
    (1024, 2, 0.0, 512),
    (4, 4, 0.0, 1),         # as many CPUs as agents: one agent per actor
    (16, 64, 0.0, 1),       # a cluster bigger than the run
    (10, 4, 0.0, 3),        # uneven: 4 actors of 3, 3, 3, 1
    (8, 0.5, 0.0, 8),       # less than one CPU: one actor
    (16, 2, 0.25, 4),       # 4 quarter-GPU agents fill one device
    (16, 2, 0.5, 2),
    (16, 2, 1.0, 1),
    (16, 2, 0.3, 3),
])
def test_auto_packing_takes_one_actor_per_cpu_and_one_device_per_actor(agents, cpus, gpus, k):
    assert auto_agents_per_actor(agents, cpus, gpus) == k
    assert k * gpus <= 1 + 1e-9
