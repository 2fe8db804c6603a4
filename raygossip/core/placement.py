"""Which agents share an actor: groups of k by graph locality, so that most edges stay inside an actor."""

from __future__ import annotations

import networkx as nx
import numpy as np


def edges_inside(groups: list[list[int]], mixing: np.ndarray) -> tuple[int, int]:
    """(directed links i -> j with W_ji > 0 whose ends share a group, all such links)."""
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    senders, receivers = np.nonzero(mixing.T)
    links = [(int(i), int(j)) for i, j in zip(senders, receivers) if i != j]
    return sum(group_of[i] == group_of[j] for i, j in links), len(links)


def agent_groups(mixing: np.ndarray, k: int) -> list[list[int]]:
    """Agents cut into consecutive groups of k (the last may be smaller) along the agent order or the graph's
    reverse Cuthill-McKee order, whichever keeps more links inside groups (on a ring: contiguous segments)."""
    n = len(mixing)
    if k <= 1:
        return [[i] for i in range(n)]
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((int(i), int(j)) for i, j in zip(*np.nonzero(mixing)) if i != j)
    orders = [list(range(n)), [int(i) for i in nx.utils.reverse_cuthill_mckee_ordering(graph)]]
    candidates = [[sorted(order[s : s + k]) for s in range(0, n, k)] for order in orders]
    return max(candidates, key=lambda groups: edges_inside(groups, mixing)[0])


def auto_agents_per_actor(agents: int, cpus: float, gpus_per_agent: float = 0.0) -> int:
    """runtime.agents_per_actor: auto. One actor per whole CPU the cluster has (an actor steps its agents on one
    core; each more costs a process, ~300 MB and ~2 s of start-up), the agents shared evenly among them; at most as
    many agents as fit one device when they take GPU shares (an actor uses one device)."""
    actors = max(1, min(agents, int(cpus + 1e-9)))
    k = -(-agents // actors)
    if gpus_per_agent > 0:
        k = max(1, min(k, int(1 / gpus_per_agent + 1e-9)))
    return k
