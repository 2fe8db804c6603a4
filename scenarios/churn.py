"""Churn on the Ray engine: a quarter of the agents leave mid-run and rejoin later; sync, bounded and async.

At 30 % of the rounds a quarter of the agents (side by side: 1 and 2 of 8 on the ring, so the others stay
connected, on a path) go away (timeline `leave`): they take no steps and exchange nothing, their neighbours' weights
on them go to the self weight, and records and the merge leave them out. At 60 % they come back (`join`):
  - start: neighbour (sync, bounded staleness 2, async): from the current model of a neighbour, which sends it;
  - start: scratch (sync): from the initial model every agent started from, with fresh optimizer state.
The table shows merged accuracy against the training clock and the consensus distance before the leave,
while the agents are away, in the first record after the join and at the end (the scratch joiners pull it up).

    python -m scenarios churn --scale cpu --seeds 0 1
"""

from __future__ import annotations

from typing import Sequence

from raygossip.timeline_builder import Timeline
from scenarios import common, timeline_common
from scenarios.common import Outcome, Variant

SCENARIO = "churn"


def leavers(count: int) -> list[int]:
    """A quarter of the agents (at least one), side by side from agent 1: the others stay connected on a ring
    (a path); two that are not neighbours would cut the ring in two, a partition rather than churn."""
    return list(range(1, 1 + max(1, count // 4)))


def timeline(agents: list[int], window: timeline_common.Window, start: str) -> list[dict]:
    return Timeline().at(round=window.start).leave(agents).at(round=window.end).join(agents, start=start).build()


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    data, window = timeline_common.base(scale, overrides)
    agents = leavers(timeline_common.agents_of(data))
    return [
        *timeline_common.mode_variants(SCENARIO, data, timeline(agents, window, "neighbour"), ", join from neighbour"),
        *timeline_common.mode_variants(SCENARIO, data, timeline(agents, window, "scratch"), ", join from scratch",
                                      modes=timeline_common.MODES[:1]),
    ]


def report(outcomes: Sequence[Outcome]) -> str:
    start, end = timeline_common.window_of(outcomes)
    extra = [
        timeline_common.consensus_column(f"consensus at r{start} (leave)", -1, start, how="last"),
        timeline_common.consensus_column(f"consensus away (r{start}-{end}), mean", start, end),
        timeline_common.consensus_column("consensus first after join", end, None, how="first"),
        timeline_common.record_column(f"merged at r{end} (join)", "merged_test_accuracy", -1, end, how="last", digits=4),
        timeline_common.record_column("merged first after join", "merged_test_accuracy", end, None, how="first",
                                     digits=4),
        timeline_common.consensus_column("consensus at end", end, None, how="last"),
    ]
    return timeline_common.report(outcomes, extra) + "\n" + timeline_common.events_note(outcomes)


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report, engine=timeline_common.ray_only)
