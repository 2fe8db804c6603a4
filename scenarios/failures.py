"""Failures on the Ray engine: accuracy with and without them, side by side, and how fast the run recovers.

Same data, model, graph and seed in every variant; synchronous rounds on the Ray engine, for each gossip rule
(D-PSGD with full models; CHOCO-SGD with top-k 10%):
  - no failures: the reference point;
  - kill 25%, restart: a quarter of the agents (seeded: faults.kill_fraction 0.25) exit at the start of the
    middle round (faults.kill_round); runtime.on_failure restart brings each back from the latest snapshot it
    sent the coordinator (runtime.snapshot_every rounds) and its neighbours resend their public copies;
  - kill 25%, drop: the same kills, runtime.on_failure drop: the survivors carry on without them (their mixing
    weight goes to the self weight; on a ring, dropping two agents can cut the graph in pieces);
  - 10% lost: every message is lost with probability 0.1 (faults.drop_messages; the receiver gets a "lost"
    marker, so sync rounds do not stall). D-PSGD just mixes with fewer neighbours that round; CHOCO runs it
    twice: with faults.recovery resync (the receiver asks for the sender's whole public copy, and the link heals)
    and with none (its neighbour sums drift from the sender's public copy: a lost update is never made up).
Every local step is stretched to at least runtime.timing.step_time_s so that training outlasts a restart: at
the cpu scale a killed agent is back while the others still train. The table puts, beside merged and mean
local accuracy, the wall time, the failures (summary.json "failures"), the mean detection time (from the
injected kill to the coordinator noticing the dead actor), the mean recovery time (from detection until the
new actor runs again from its snapshot), the rounds lost (from the snapshot to the kill) and the lost messages.

    python -m scenarios failures --scale cpu --seeds 0
    python -m scenarios failures --scale cpu --seeds 0 1 2 --rules dpsgd
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Sequence

from raygossip.algorithms.consensus import sends_whole_models
from raygossip.core.plan import steps_per_epoch
from scenarios import common
from scenarios.common import Outcome, Variant, Whole

SCENARIO = "failures"
CPU_CONFIG, PAPER_CONFIG = "failures_mnist_mlp.yaml", "ars_fashionmnist_lenet5.yaml"
KILL_FRACTION = 0.25
LOST_FRACTION = 0.1
SNAPSHOT_EVERY = {"smoke": 2, "cpu": 10, "paper": 50}
STEP_TIME_S = {"smoke": 0.05, "cpu": 0.4, "paper": 0.0}  # paper: real GPU step times
RULES = {
    "dpsgd": ("D-PSGD", {"rule": "dpsgd", "gamma": 1.0, "compressor": Whole(name="identity")}),
    "choco": ("CHOCO top-k 10%", {"rule": "choco", "gamma": 0.1, "compressor": Whole(name="top_k", ratio=0.1)}),
}
DEFAULT_RULES = {"smoke": ["dpsgd"], "cpu": ["dpsgd", "choco"], "paper": ["dpsgd", "choco"]}

# The smoke scale: 3 agents on a ring at 0.5 CPU each (round(0.25 * 3) = 1 of them killed), 2 epochs of 8
# steps of 50 ms. Seconds of training; Ray's actor start-up (and a restarted agent's) dominates.
SMOKE = {
    "agents": {"count": 3},
    "train": {"epochs": 2, "steps_per_epoch": 8},
    "runtime": {"engine": "ray", "num_cpus_per_agent": 0.5, "wait_timeout_s": 60.0},
}


TRAIN_SIZES = {"mnist": 60000, "fashionmnist": 60000, "cifar10": 50000, "cifar100": 50000}


def total_rounds(base: dict) -> int:
    """Communication rounds of the base run (steps_per_epoch unset: one pass over the training set per epoch)."""
    config = common.load_config(base=base)
    steps = config.train.steps_per_epoch or steps_per_epoch(config, TRAIN_SIZES.get(config.data.name, 60000))
    return config.train.epochs * steps // config.train.local_steps


def variants(scale: str = "cpu", overrides: Sequence[str] = (), rules: Sequence[str] | None = None) -> list[Variant]:
    base = common.base_mapping(scale, CPU_CONFIG, PAPER_CONFIG, overrides, smoke=SMOKE)
    base = common.deep_merge(base, {
        "runtime": {"engine": "ray", "mode": "sync", "snapshot_every": SNAPSHOT_EVERY[scale], "max_restarts": 3,
                    "timing": {"step_time_s": STEP_TIME_S[scale], "slow_fraction": 0.0, "slow_factor": 1.0,
                               "slowdown": None}},
        "schedule": {"averaging_rate": Whole(kind="constant"), "communication": common.EVERY_ROUND},
        "faults": Whole(),
    })
    base = common.apply_overrides(base, list(overrides))  # --set wins over the scale's defaults above too
    middle = total_rounds(base) // 2
    kills = {"kill_fraction": KILL_FRACTION, "kill_round": middle}
    out = []
    for rule in rules or DEFAULT_RULES[scale]:
        if rule not in RULES:
            raise common.UserError("--rules", f"must be among {', '.join(RULES)}, got {rule!r}")
        name, gossip = RULES[rule]

        def make(label: str, faults: dict, on_failure: str = "restart") -> Variant:
            return common.variant(SCENARIO, base, f"{name}, {label}", {
                "gossip": gossip, "faults": Whole(faults), "runtime": {"on_failure": on_failure}})

        out += [
            make("no failures", {}),
            make(f"kill 25% at round {middle}, restart", kills, "restart"),
            make(f"kill 25% at round {middle}, drop", kills, "drop"),
        ]
        if sends_whole_models(gossip["rule"]):  # the next whole model replaces a lost one: nothing to recover
            out.append(make("10% messages lost", {"drop_messages": LOST_FRACTION}))
        else:  # public copies: a lost update healed by a resync of the link, or left lost (faults.recovery)
            out += [make("10% messages lost, resync", {"drop_messages": LOST_FRACTION, "recovery": "resync"}),
                    make("10% messages lost, no recovery", {"drop_messages": LOST_FRACTION, "recovery": "none"})]
    return out


# ---------------------------------------------------------------- the table


def failures_of(outcome: Outcome) -> list[dict]:
    return list(outcome.summary.get("failures") or [])


def mean_over_failures(runs: list[Outcome], key: str, digits: int = 1) -> str:
    """Mean (± std over all failures of all seeds) of one number of summary.json's failure records."""
    values = [f[key] for run in runs for f in failures_of(run) if f.get(key) is not None]
    return common.pm(values, digits) if values else "-"


def report(outcomes: Sequence[Outcome]) -> str:
    """The summary table with the failure columns, then one line per failure (what happened and when)."""

    def rounds_lost(runs: list[Outcome]) -> str:
        lost = [sum(f.get("rounds_lost", 0) for f in failures_of(run)) for run in runs]
        return common.pm([float(x) for x in lost], 1) if any(failures_of(run) for run in runs) else "-"

    extra: list[common.Column] = [
        common.summary_column("wall s", "wall_time_s", 1),
        common.summary_column("train s", "train_s", 1),
        ("failures", lambda runs: common.pm([float(len(failures_of(run))) for run in runs], 1)),
        ("detection s", lambda runs: mean_over_failures(runs, "detection_s", 2)),
        ("recovery s", lambda runs: mean_over_failures(runs, "recovery_s", 1)),
        ("rounds lost (sum)", rounds_lost),
        ("dropped", lambda runs: common.pm([float(len(run.summary.get("dropped_agents") or [])) for run in runs], 1)),
        common.summary_column("lost msgs", "lost_messages", 0),
        ("steps / agent", steps),
    ]
    text = common.summary_table(outcomes, extra)
    lines = []
    for outcome in outcomes:
        for f in failures_of(outcome):
            detail = ", ".join(f"{key} {fmt_value(f.get(key))}" for key in
                               ("injected_round", "detected_at_s", "detection_s", "action", "recovery_s",
                                "restored_step", "rounds_lost", "rounds_behind") if key in f)
            lines.append(f"- {outcome.label}, seed {outcome.seed}: agent {f['agent']} ({f.get('error')}): {detail}")
    if lines:
        text += "\nFailures (summary.json `failures`; times in seconds of the run's clock):\n\n" + "\n".join(lines) + "\n"
    return text


def steps(runs: list[Outcome]) -> str:
    counts = [n for run in runs for n in run.summary.get("steps_per_agent", [])]
    return f"{min(counts)}-{max(counts)}" if counts else "n/a"


def fmt_value(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def csv_rows(outcomes: Sequence[Outcome]) -> str:
    """One CSV line per run (variant, seed): accuracies, times and the failure numbers."""
    header = ["label", "seed", "merged_acc", "mean_local_acc", "wall_s", "train_s", "failures", "restarts",
              "dropped", "mean_detection_s", "mean_recovery_s", "rounds_lost", "lost_messages", "resyncs", "status"]
    lines = [",".join(header)]
    for o in outcomes:
        s, fs = o.summary, failures_of(o)
        detections = [f["detection_s"] for f in fs if f.get("detection_s") is not None]
        recoveries = [f["recovery_s"] for f in fs if f.get("recovery_s") is not None]
        row = [f'"{o.label}"', o.seed, s.get("merged_test_accuracy"), s.get("mean_local_test_accuracy"),
               s.get("wall_time_s"), s.get("train_s"), len(fs), s.get("restarts", 0),
               len(s.get("dropped_agents") or []),
               statistics.fmean(detections) if detections else "", statistics.fmean(recoveries) if recoveries else "",
               sum(f.get("rounds_lost", 0) for f in fs), s.get("lost_messages", 0), s.get("resyncs", 0),
               s.get("status", "")]
        lines.append(",".join("" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def ray_only(args: argparse.Namespace) -> str:
    """Every run on the Ray engine; --engine reference is refused (a UserError)."""
    if args.engine == "reference":
        raise common.UserError("--engine", "failures needs the Ray engine: the reference engine has no processes "
                                           "to kill and no messages to lose (leave --engine unset or use ray)")
    return "ray"


def extend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=None,
                        help="gossip rules to compare (default: dpsgd at the smoke scale, dpsgd and choco otherwise)")


_STATE: dict = {}  # the --out of this process's run, for the CSV beside the report


def _report_with_csv(outcomes: Sequence[Outcome]) -> str:
    text = report(outcomes)
    out = _STATE.get("out")
    if out is not None:  # the CSV beside the Markdown report: runs/failures.csv
        csv = out.parent / f"{out.name}.csv"
        csv.parent.mkdir(parents=True, exist_ok=True)
        csv.write_text(csv_rows(outcomes))
        text += f"\nOne line per run: {csv}\n"
    return text


def _engine_keeping_out(args: argparse.Namespace) -> str:
    _STATE["out"] = Path(args.out)
    return ray_only(args)


COMMAND = common.Scenario(SCENARIO, __doc__, variants, _report_with_csv, extend=extend, options=["rules"],
                          engine=_engine_keeping_out)
