"""A network split that heals, on the Ray engine: the ring cut into two halves and joined again; sync, bounded, async.

At 30 % of the rounds the ring is split into two halves (timeline `partition`, agents 0..n/2-1 and n/2..n-1:
the two links between them are cut, their weight going to the self weight); at 60 % it heals (`heal`).
With non-IID shards each half drifts toward its own classes, so the consensus distance (the agents' spread
around their average) should rise during the partition and fall after the heal. Variants: sync without a
partition (the reference), then sync, bounded (staleness 2) and async with it.

    python -m scenarios partition_heal --scale cpu --seeds 0 1
"""

from __future__ import annotations

from typing import Sequence

from raygossip.timeline_builder import Timeline
from scenarios import common, timeline_common
from scenarios.common import Outcome, Variant

SCENARIO = "partition_heal"


def halves(count: int) -> list[list[int]]:
    return [list(range(count // 2)), list(range(count // 2, count))]


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    data, window = timeline_common.base(scale, overrides)
    events = Timeline().at(round=window.start).partition(halves(timeline_common.agents_of(data))) \
        .at(round=window.end).heal().build()
    return [
        *timeline_common.mode_variants(SCENARIO, data, None, ", no partition", modes=timeline_common.MODES[:1]),
        *timeline_common.mode_variants(SCENARIO, data, events, ", partition"),
    ]


def report(outcomes: Sequence[Outcome]) -> str:
    timed = [o for o in outcomes if o.config.timeline]
    start, end = timeline_common.window_of(timed)
    extra = [
        timeline_common.consensus_column(f"consensus before (<= r{start})", -1, start, how="last"),
        timeline_common.consensus_column(f"consensus split (r{start}-{end}), mean", start, end),
        timeline_common.consensus_column("max", start, end, how="max"),
        timeline_common.consensus_column("first after heal", end, None, how="first"),
        timeline_common.consensus_column("at end", end, None, how="last"),
    ]
    return timeline_common.report(outcomes, extra) + "\n" + timeline_common.events_note(timed)


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report, engine=timeline_common.ray_only)
