"""Agents packed into actors by graph locality (runtime.agents_per_actor)."""

from __future__ import annotations

import pytest

from raygossip.algorithms.topology import build_topology
from raygossip.core.placement import agent_groups, edges_inside


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
