"""A straggler that appears and recovers, on the Ray engine: sync, bounded staleness 2 and async.

At 30 % of the rounds agent 3 becomes 8x slower (timeline `slow`, factor 8 on its simulated step time,
runtime.timing.step_time_s); at 60 % it recovers (`restore`). Sync waits for it every round while it is
slow; bounded may run `staleness` rounds ahead and then waits too; async never waits. Variants: sync with
no straggler (the pace the machine allows), then sync, bounded and async with it. The table adds the
steps each agent took (async ends at runtime.finish_quorum), the seconds an agent waited for neighbours,
and the stale messages absorbed.

    python -m scenarios straggler_recovery --scale cpu --seeds 0 1
"""

from __future__ import annotations

import statistics
from typing import Sequence

from raygossip.timeline_builder import Timeline
from scenarios import common, timeline_common
from scenarios.common import Outcome, Variant

SCENARIO = "straggler_recovery"
FACTOR = 8.0


def straggler(count: int) -> int:
    return min(3, count - 1)


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    data, window = timeline_common.base(scale, overrides)
    agent = straggler(timeline_common.agents_of(data))
    events = Timeline().at(round=window.start).slow([agent], FACTOR).at(round=window.end).restore([agent]).build()
    return [
        *timeline_common.mode_variants(SCENARIO, data, None, ", no straggler", modes=timeline_common.MODES[:1]),
        *timeline_common.mode_variants(SCENARIO, data, events, f", straggler x{FACTOR:g}"),
    ]


def report(outcomes: Sequence[Outcome]) -> str:
    def waited(runs: list[Outcome]) -> str:
        return common.pm([statistics.fmean(run.summary["waited_s_per_agent"]) for run in runs
                          if run.summary.get("waited_s_per_agent")], 1)

    def steps(runs: list[Outcome]) -> str:
        counts = [n for run in runs for n in run.summary.get("steps_per_agent", [])]
        return f"{min(counts)}-{max(counts)}" if counts else "n/a"

    timed = [o for o in outcomes if o.config.timeline]
    start, end = timeline_common.window_of(timed)
    extra: list[common.Column] = [
        ("waited s / agent", waited),
        common.summary_column("stale msgs", "stale_messages", 0),
        ("steps / agent", steps),
        timeline_common.consensus_column(f"consensus slow (r{start}-{end})", start, end),
        timeline_common.consensus_column("consensus at end", end, None, how="last"),
    ]
    return timeline_common.report(outcomes, extra) + "\n" + timeline_common.events_note(timed)


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report, engine=timeline_common.ray_only)
