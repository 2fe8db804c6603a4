"""What the four timeline scenarios share: the base run, sync/bounded/async variants, event rounds, the table.

Each family (churn, partition_heal, straggler_recovery, bandwidth_collapse) puts a timeline on the same base
run (configs/cpu/timeline_mnist_mlp.yaml at the cpu scale) and compares runtime.mode sync, bounded
(staleness 2) and async on the Ray engine. Its events sit at round boundaries (`round: R`), so a sync run
stays deterministic: the condition starts at `start` (30 % of the rounds) and ends at `end` (60 %).
The table puts merged accuracy at a few points of the training clock (records' wall_time_s) and at the end
beside the wall time, and the family adds its own columns (consensus distance before, during, after).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from scenarios import common
from scenarios.common import Outcome, Variant, Whole

CPU_CONFIG, PAPER_CONFIG = "timeline_mnist_mlp.yaml", "ars_fashionmnist_lenet5.yaml"
STALENESS = 2
MODES = (("sync", "sync"), (f"bounded (staleness {STALENESS})", "bounded"), ("async", "async"))
STEP_TIME_S = {"smoke": 0.01, "cpu": 0.05, "paper": 0.0}  # paper: real GPU step times
START, END = 0.3, 0.6  # the event window, as fractions of the run's rounds

# The smoke scale: 4 agents on a ring at 0.5 CPU each, 4 epochs of 3 steps (12 rounds, events at 4 and 7, a
# record every 3 rounds: one of them, at round 6, inside the window).
SMOKE = {
    "train": {"epochs": 4, "steps_per_epoch": 3},
    "runtime": {"engine": "ray", "num_cpus_per_agent": 0.5, "wait_timeout_s": 60.0},
}


@dataclass(frozen=True)
class Window:
    """When a family's condition is in force: from round `start` up to round `end` (its second event)."""

    start: int
    end: int
    rounds: int


def base(scale: str, overrides: Sequence[str] = (), patch: dict | None = None) -> tuple[dict, Window]:
    """The scale's base mapping on the Ray engine (no straggler, no faults, no timeline) and its event window."""
    from scenarios.failures import total_rounds

    data = common.base_mapping(scale, CPU_CONFIG, PAPER_CONFIG, overrides, smoke=SMOKE)
    data = common.deep_merge(data, {
        "runtime": {"engine": "ray", "mode": "sync", "staleness": STALENESS,
                    "timing": {"step_time_s": STEP_TIME_S[scale], "slow_fraction": 0.0, "slow_factor": 1.0,
                               "slowdown": None}},
        "faults": Whole(),
        "timeline": [],
    })
    data = common.deep_merge(data, patch or {})
    data = common.apply_overrides(data, list(overrides))  # --set wins over the scale's defaults above too
    rounds = total_rounds(data)
    start, end = max(1, round(START * rounds)), max(2, round(END * rounds))
    return data, Window(start, end, rounds)


def agents_of(data: dict) -> int:
    return int(data.get("agents", {}).get("count", 8))


def mode_variants(scenario: str, data: dict, timeline: list[dict] | None, suffix: str = "",
                  patch: dict | None = None, modes: Sequence[tuple[str, str]] = MODES) -> list[Variant]:
    """One variant per runtime.mode, labelled '<mode><suffix>', with `timeline` (None: none) and `patch`."""
    out = []
    for label, mode in modes:
        extra = common.deep_merge(patch or {}, {"runtime": {"mode": mode}, "timeline": list(timeline or [])})
        out.append(common.variant(scenario, data, f"{label}{suffix}", extra))
    return out


# ---------------------------------------------------------------- the table


def records_between(run: Outcome, low: int, high: int | None) -> list[dict]:
    """Metrics records taken after round `low` and up to round `high` (None: to the end)."""
    return [r for r in run.records if r["round"] > low and (high is None or r["round"] <= high)]


def record_column(header: str, key: str, low: int, high: int | None, how: str = "mean", digits: int = 3) -> common.Column:
    """A metrics key over the records after round `low` up to `high`: their mean, max, first or last value."""
    pick: dict[str, Callable[[list[float]], float]] = {"mean": statistics.fmean, "max": max,
                                                       "first": lambda v: v[0], "last": lambda v: v[-1]}

    def cell(runs: list[Outcome]) -> str:
        values = []
        for run in runs:
            found = [r[key] for r in records_between(run, low, high) if r.get(key) is not None]
            values.append(pick[how](found) if found else None)
        return common.pm(values, digits)

    return header, cell


def consensus_column(header: str, low: int, high: int | None, how: str = "mean") -> common.Column:
    """Consensus distance over the records after round `low` up to `high` (see record_column)."""
    return record_column(header, "consensus_distance", low, high, how)


def window_of(outcomes: Sequence[Outcome]) -> tuple[int, int]:
    """The rounds of the first two timeline events of the first run (where its condition starts and ends)."""
    events = outcomes[0].config.timeline
    return events[0].round, events[-1].round


def accuracy_at(run: Outcome, seconds: float) -> float | None:
    """Merged accuracy of the last record taken by `seconds` of the training clock (None: none yet)."""
    found = [r for r in run.records if r["wall_time_s"] <= seconds + 1e-9]
    return max(found, key=lambda r: r["wall_time_s"])["merged_test_accuracy"] if found else None


def clock_points(outcomes: Sequence[Outcome], count: int = 3) -> list[float]:
    """`count` points of the training clock shared by every row: fractions 1/(count+1) .. of the longest run."""
    longest = max((r["wall_time_s"] for run in outcomes for r in run.records), default=0.0)
    return [float(f"{longest * (k + 1) / (count + 1):.2g}") for k in range(count)]


def report(outcomes: Sequence[Outcome], extra: Sequence[common.Column] = ()) -> str:
    """One row per variant: merged accuracy at points of the training clock and at the end (after the final
    merge), the merged accuracy before the merge, wall time (Ray start-up included), training time, and `extra`."""
    points = clock_points(outcomes)

    def at(seconds: float) -> common.Column:
        return f"merged @ {seconds:g} s", lambda runs: common.pm([accuracy_at(run, seconds) for run in runs])

    headers = ["label", "seeds"]
    columns: list[common.Column] = [at(s) for s in points]
    columns += [common.summary_column("merged at end", "merged_test_accuracy"),
                common.summary_column("before merge", "merged_test_accuracy_before_merge"),
                common.summary_column("wall s", "wall_time_s", 1),
                common.summary_column("train s", "train_s", 1), *extra]
    rows = []
    for label, runs in common.by_label(outcomes).items():
        rows.append([label, ",".join(str(run.seed) for run in runs), *[cell(runs) for _, cell in columns]])
    text = common.markdown(headers + [h for h, _ in columns], rows)
    return text + "\n" + "merged @ T s: the merged model's test accuracy in the last record taken by T s of training " \
                        "(mean ± std over seeds); 'merged at end' is after the final merge.\n"


def events_note(outcomes: Sequence[Outcome]) -> str:
    """Where each run's timeline events took effect (summary.json events of kind timeline), one line per run."""
    lines = []
    for run in outcomes:
        events = [e for e in run.summary.get("events", []) if e.get("kind") == "timeline"]
        shown = ", ".join(f"{e['action']}@{e['round']}" for e in events) or "none"
        lines.append(f"- {run.label} seed {run.seed}: {run.summary.get('status')}; timeline {shown}")
    return "Timeline events (summary.json):\n" + "\n".join(lines) + "\n"


def ray_only(args: argparse.Namespace) -> str:
    """Every run on the Ray engine; --engine reference is refused (a UserError)."""
    if args.engine == "reference":
        raise common.UserError("--engine", "the timeline scenarios compare sync, bounded and async modes, which "
                                           "exist only on the Ray engine (leave --engine unset or use ray)")
    return "ray"


def load_outcomes(folder: str | Path, order: Sequence[str] = ()) -> list[Outcome]:
    """The outcomes of a scenario's run folders (out/<label>-seed<k>), to redo its table without rerunning;
    in the order of the labels in `order` (then by label), seeds ascending."""
    from raygossip.validation import load_config
    from raygossip.results import read_metrics

    outcomes = []
    for run in sorted(Path(folder).iterdir()):
        if not (run / "summary.json").is_file():
            continue
        config = load_config(run / "config.yaml")
        summary = json.loads((run / "summary.json").read_text())
        outcomes.append(Outcome(config.label, config.seed, config, summary, read_metrics(run / "metrics.jsonl"), run,
                                float(summary.get("wall_time_s", 0.0))))
    rank = {label: k for k, label in enumerate(order)}
    return sorted(outcomes, key=lambda o: (rank.get(o.label, len(rank)), o.label, o.seed))


def print_table(argv: Sequence[str] | None = None) -> int:
    """`python -m scenarios timeline_table FAMILY FOLDER`: print a timeline family's table from its run folders."""
    import importlib

    parser = argparse.ArgumentParser(prog="python -m scenarios timeline_table", description=print_table.__doc__)
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    module = importlib.import_module(f"scenarios.{args.family}")
    labels = [label for label, _ in module.variants("cpu")]
    print(module.report(load_outcomes(args.folder, labels)), end="")
    return 0


FAMILIES = ("churn", "partition_heal", "straggler_recovery", "bandwidth_collapse")
COMMAND = print_table
