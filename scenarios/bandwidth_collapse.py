"""Bandwidth collapse on the Ray engine: every link slows 10x mid-run and recovers; CHOCO top-k 10% against D-PSGD.

Timing is simulated (runtime.timing): every local step takes at least step_time_s, and a message of B bytes
arrives latency_s + 8B / bandwidth after it was sent (100 Mbit/s and 5 ms to start with). At 30 % of the
rounds every link's bandwidth collapses to 10 Mbit/s (timeline `link`), at 60 % it is back at 100 Mbit/s.
D-PSGD sends full models (4 bytes per parameter); CHOCO-SGD with top-k 10% sends a tenth of the entries
with their indices, about a fifth of the bytes, so it should lose less time while the links are slow.
Each rule in sync, bounded (staleness 2) and async mode; the table adds the MB sent, the training time spent
inside the collapse (training clock of the first record after recovery minus that of the last before it, an
upper bound) and the consensus distance at the end.

    python -m scenarios bandwidth_collapse --scale cpu --seeds 0 1
"""

from __future__ import annotations

from typing import Sequence

from raygossip.timeline_builder import Timeline
from scenarios import common, timeline_common
from scenarios.common import Outcome, Variant, Whole

SCENARIO = "bandwidth_collapse"
LATENCY_S, BANDWIDTH_MBPS, COLLAPSED_MBPS = 0.005, 100.0, 10.0
RULES = {  # CHOCO's gamma is the failures scenario's (top-k 10%), not tuned here
    "D-PSGD": {"rule": "dpsgd", "gamma": 1.0, "compressor": Whole(name="identity")},
    "CHOCO top-k 10%": {"rule": "choco", "gamma": 0.1, "compressor": Whole(name="top_k", ratio=0.1)},
}


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    data, window = timeline_common.base(scale, overrides, patch={
        "runtime": {"timing": {"latency_s": LATENCY_S, "bandwidth_mbps": BANDWIDTH_MBPS}}})
    events = Timeline().at(round=window.start).link(bandwidth_mbps=COLLAPSED_MBPS) \
        .at(round=window.end).link(bandwidth_mbps=BANDWIDTH_MBPS).build()
    out: list[Variant] = []
    for name, gossip in RULES.items():
        out += timeline_common.mode_variants(SCENARIO, data, events, f", {name}", patch={
            "gossip": gossip, "schedule": {"averaging_rate": Whole(kind="constant")}})
    return out


def collapse_seconds(runs: list[Outcome], start: int, end: int) -> str:
    """Training clock from the last record at or before `start` to the first record at or after `end`."""
    values = []
    for run in runs:
        before = [r["wall_time_s"] for r in run.records if r["round"] <= start]
        after = [r["wall_time_s"] for r in run.records if r["round"] >= end]
        values.append(min(after) - max(before) if before and after else None)
    return common.pm(values, 1)


def report(outcomes: Sequence[Outcome]) -> str:
    start, end = timeline_common.window_of(outcomes)
    extra: list[common.Column] = [
        ("MB sent", lambda runs: common.pm([run.summary["bytes_sent"] / 1e6 for run in runs], 1)),
        (f"train s r{start}-{end} (collapsed)", lambda runs: collapse_seconds(runs, start, end)),
        timeline_common.consensus_column("consensus at end", end, None, how="last"),
    ]
    return timeline_common.report(outcomes, extra) + "\n" + timeline_common.events_note(outcomes)


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report, engine=timeline_common.ray_only)
