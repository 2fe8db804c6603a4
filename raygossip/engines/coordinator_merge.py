"""The coordinator's merges of the live agents' models: the final merge (sent back) and the average alone."""

from __future__ import annotations

import numpy as np
import ray
import torch

from raygossip.algorithms.merge import global_average
from raygossip.core.plan import RunPlan
from raygossip.engines.agent_states import split_state
from raygossip.engines.common import MergedModel, average_buffers, merge_all
from raygossip.engines.roster import Roster


def there_at_end(roster: Roster, plan: RunPlan) -> list[int]:
    """The live agents that are not away at the end (after a timeline's leave): what the merge averages."""
    return [i for i in roster.live() if not plan.absent(i, plan.total_steps - 1)]


def gather_states(roster: Roster, plan: RunPlan) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    agents = roster.agents
    return [split_state(s) for s in ray.get([agents[i].get_state.remote(i) for i in there_at_end(roster, plan)])]


def average_only(roster: Roster, plan: RunPlan, merged: MergedModel) -> dict[str, np.ndarray]:
    """The exact average of the live agents' models, without sending it back (final merge off)."""
    states = gather_states(roster, plan)
    merged.load(global_average([p for p, _ in states]), average_buffers([b for _, b in states]))
    return {k: v.numpy() for k, v in merged.state_dict().items()}


def final_merge(roster: Roster, plan: RunPlan, merged: MergedModel) -> float:
    """Gather every live agent's parameters, average exactly, send the average back, re-estimate batch norm;
    returns the merged model's accuracy."""
    live = roster.live()

    def broadcast(params: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        ref = ray.put({"params": params.numpy(), **{f"buffer.{k}": v.cpu().numpy() for k, v in buffers.items()}})
        ray.get([host.load_state.remote([ref]) for host in roster.hosts(live)])

    def reestimate_local(batches: int) -> list[dict[str, torch.Tensor]]:
        agents = roster.agents
        estimates = ray.get([agents[i].reestimate_batchnorm.remote(i, batches) for i in there_at_end(roster, plan)])
        return [{k[len("buffer."):]: torch.from_numpy(np.array(v)) for k, v in e.items()} for e in estimates]

    return merge_all(merged, gather_states(roster, plan), broadcast, reestimate_local)
