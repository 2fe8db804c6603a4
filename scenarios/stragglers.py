"""Slow agents on the Ray engine: synchronous rounds against bounded staleness and asynchronous gossip.

A quarter of the agents compute 3x slower (runtime.timing.slow_fraction 0.25, slow_factor 3; every step is
stretched to at least runtime.timing.step_time_s so the simulated compute sets the pace, not the machine).
  - sync, no slow agents: the reference point for wall time (not at the smoke scale);
  - sync: every round waits for all neighbours, so everyone runs at the slowest agent's pace;
  - bounded (staleness 2): an agent may run at most 2 rounds ahead of any neighbour;
  - async: absorb whatever has arrived and never wait (the run ends when a quorum of agents has finished).
The runs are driven through the Python API (raygossip.api.run) with an observer callback that prints every
metrics record as it arrives and notes when it arrived; the table puts wall time beside accuracy.

    python -m scenarios stragglers --scale cpu --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Sequence

from scenarios import common
from scenarios.common import Outcome, Variant

SCENARIO = "stragglers"
CPU_CONFIG, PAPER_CONFIG = "stragglers_mnist_mlp.yaml", "ars_fashionmnist_lenet5.yaml"
SLOW = {"slow_fraction": 0.25, "slow_factor": 3.0}
STEP_TIME_S = {"smoke": 0.01, "cpu": 0.05, "paper": 0.0}  # paper: real GPU step times, stretched only by the slow factor
STALENESS = 2

# The smoke scale keeps Ray's start-up cost (a worker process per actor) small: 3 agents (one of them slow)
# at 0.5 CPU each, and no "no slow agents" reference run.
SMOKE = {"agents": {"count": 3}, "runtime": {"engine": "ray", "num_cpus_per_agent": 0.5, "wait_timeout_s": 60.0}}


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    base = common.base_mapping(scale, CPU_CONFIG, PAPER_CONFIG, overrides, smoke=SMOKE)
    base = common.deep_merge(base, {"runtime": {"engine": "ray", "timing": {"step_time_s": STEP_TIME_S[scale]}}})

    def make(label: str, mode: str, slow: bool = True, staleness: int | None = None) -> Variant:
        timing = SLOW if slow else {"slow_fraction": 0.0, "slow_factor": 1.0}
        runtime = {"mode": mode, "timing": {**timing, "slowdown": None}}
        if staleness is not None:
            runtime["staleness"] = staleness
        return common.variant(SCENARIO, base, label, {"runtime": runtime})

    reference = [make("sync, no slow agents", "sync", slow=False)] if scale != "smoke" else []
    return reference + [
        make("sync", "sync"),
        make(f"bounded (staleness {STALENESS})", "bounded", staleness=STALENESS),
        make("async", "async"),
    ]


class Watch:
    """An observer factory: for each run, a callback that prints records as they arrive and keeps them."""

    def __init__(self, echo: Callable[[str], None] | None = print) -> None:
        self.echo = echo
        self.arrivals: dict[tuple[str, int], list[tuple[float, dict]]] = {}

    def __call__(self, label: str, seed: int) -> Callable[[dict], None]:
        started = time.perf_counter()
        arrivals = self.arrivals.setdefault((label, seed), [])

        def observe(record: dict) -> None:
            elapsed = time.perf_counter() - started  # since the run was asked for: Ray start-up included
            arrivals.append((elapsed, record))
            if self.echo is not None:
                self.echo(f"  [{label} s{seed}] {elapsed:6.1f} s  epoch {record['epoch']:5.2f}  "
                          f"round {record['round']:4d}  train clock {record['wall_time_s']:6.1f} s  "
                          f"merged {record['merged_test_accuracy']:.4f}  "
                          f"local {common.fmt(record.get('mean_local_test_accuracy'))}")

        return observe

    def time_to(self, label: str, seed: int, accuracy: float) -> float | None:
        """Training seconds until a record first showed merged accuracy >= `accuracy` (None: never)."""
        for _, record in self.arrivals.get((label, seed), []):
            if record["merged_test_accuracy"] >= accuracy:
                return record["wall_time_s"]
        return None


def report(outcomes: Sequence[Outcome], watch: Watch | None = None) -> str:
    """The summary table with timing beside accuracy: wall time (Ray start-up included), training time,
    mean seconds an agent waited for neighbours, stale messages absorbed, steps each agent took, and (with
    the observer's records) the training time until the merged model first reached a common target."""

    def waited(runs: list[Outcome]) -> str:
        return common.pm([statistics.fmean(run.summary["waited_s_per_agent"]) for run in runs
                          if run.summary.get("waited_s_per_agent")], 1)

    def steps(runs: list[Outcome]) -> str:
        counts = [n for run in runs for n in run.summary.get("steps_per_agent", [])]
        return f"{min(counts)}-{max(counts)}" if counts else "n/a"

    extra: list[common.Column] = [
        common.summary_column("wall s", "wall_time_s", 1),
        common.summary_column("train s", "train_s", 1),
        ("waited s / agent", waited),
        common.summary_column("stale msgs", "stale_messages", 0),
        ("steps / agent", steps),
    ]
    if watch is not None:
        finals = [run.summary["merged_test_accuracy_before_merge"] for run in outcomes]
        target = 0.95 * min(finals) if finals else 0.0

        def time_to_target(runs: list[Outcome]) -> str:
            values = [watch.time_to(run.label, run.seed, target) for run in runs]
            return common.pm([v for v in values if v is not None], 1)

        extra.append((f"train s to merged acc {target:.3f}", time_to_target))
    return common.summary_table(outcomes, extra)


def ray_only(args: argparse.Namespace) -> str:
    """Every run on the Ray engine; --engine reference is refused (a UserError)."""
    if args.engine == "reference":
        raise common.UserError("--engine", "stragglers needs the Ray engine: bounded and async modes and the "
                                           "timing simulation exist only there (leave --engine unset or use ray)")
    return "ray"


WATCH = Watch()  # one scenario run per process: the table reads what it saw
COMMAND = common.Scenario(SCENARIO, __doc__, variants, lambda outcomes: report(outcomes, WATCH), engine=ray_only,
                          observer=WATCH)
