"""The single-merge paper's Fig. 2: where one dense window of exact all-reduce helps the final merged model most.

Every variant runs the paper's protocol (configs/cpu/single_merge_mnist_mlp.yaml at the cpu scale: random
topology r = 0.2 over all agents, H local steps per round, constant lr, SGD momentum, label smoothing,
gradient clamp, preference data redrawn every batch) and ends with the exact global merge:
  - r = 0.2 all the way plus ONE window of exact all-reduce over a tenth of training, at 10 positions
    (0-10%, 10-20%, ..., 90-100%): the window holds the tenth of the rounds whose communication falls in it
    (rounds 1-3 of 30 for 0-10%, ..., 28-30 for 90-100% at the cpu scale);
  - r = 0.2 without a window; no communication before the merge; all-reduce every round (parallel SGD with
    H local steps between averages).
Claim (c): later windows give a better merged model. Claim (d): under high heterogeneity the single merge
recovers most of the gap between the agents' own models and parallel SGD; the report gives the fraction
(merged - mean local) / (parallel SGD - mean local) for no communication + merge and for r = 0.2 + merge.

    python -m scenarios late_communication --scale cpu --seeds 0 1 2
    python -m scenarios plot_window_position runs/late_communication --out window_position.png
"""

from __future__ import annotations

import statistics
from typing import Sequence

from scenarios import common
from scenarios.common import Outcome, Variant

SCENARIO = "late_communication"
CPU_CONFIG, PAPER_CONFIG = "single_merge_mnist_mlp.yaml", "single_merge_cifar100_resnet18_window.yaml"
WIDTH = 0.1  # the window's share of training (the paper: 1/10 or 1/20)
POSITIONS = tuple(k / 10 for k in range(10))  # window starts
R02 = {"kind": "every"}  # on topology random r = 0.2: each agent pulls one random other with probability 0.2
# What smoke needs beyond SMOKE_PATCH: 10 rounds, so each tenth of training is one round.
SMOKE = {"train": {"epochs": 5, "steps_per_epoch": 2, "local_steps": 1, "batch_size": 16},
         "runtime": {"agents_per_actor": 4}}

NO_WINDOW, NO_COMMUNICATION, EVERY_ROUND = "r=0.2, no window", "no communication", "all-reduce every round"


def window_label(start: float) -> str:
    return f"r=0.2 + all-reduce {start:.0%}-{start + WIDTH:.0%}"


def rounds_of(base: dict) -> int:
    """The run's communication rounds: epochs x steps_per_epoch / local_steps."""
    train = base["train"]
    return int(train["epochs"]) * int(train["steps_per_epoch"]) // int(train.get("local_steps", 1))


def window_phases(start: float, width: float, rounds: int) -> list[dict]:
    """r = 0.2 phases around one all-reduce phase holding the rounds k (1-based) with start < k/rounds <= start+width.

    A round communicates after its last local step, at progress k/rounds; the phase bounds sit half a round
    past the window's edges, so every position holds the same round(width * rounds) rounds.
    """
    half = 0.5 / rounds
    lo, hi = start + half, start + width + half
    phases = [{"until": round(lo, 9), **R02}] if start > 0 else []
    if hi < 1:
        return [*phases, {"until": round(hi, 9), "kind": "allreduce"}, {"until": 1.0, **R02}]
    return [*phases, {"until": 1.0, "kind": "allreduce"}]


def communication(**spec) -> dict:
    """A schedule patch: this communication (kind or phases), the exact merge at the end."""
    return {"schedule": {"communication": common.Whole(spec), "final_merge": {"enabled": True}}}


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    base = common.base_mapping(scale, CPU_CONFIG, PAPER_CONFIG, overrides, smoke=SMOKE)
    base = common.deep_merge(base, {"topology": common.Whole(name="random", weights="uniform",
                                                              params={"r": 0.2, "base": None}),
                                    "gossip": common.EXACT_GOSSIP,
                                    "schedule": {"averaging_rate": common.Whole(kind="constant", gamma0=1.0)}})
    rounds = rounds_of(base)

    def make(label: str, patch: dict) -> Variant:
        return common.variant(SCENARIO, base, label, patch)

    out = [make(window_label(start), communication(phases=window_phases(start, WIDTH, rounds)))
           for start in POSITIONS]
    out += [make(NO_WINDOW, communication(**R02)),
            make(NO_COMMUNICATION, communication(kind="none")),
            make(EVERY_ROUND, communication(kind="allreduce"))]
    return out


def gap_recovered(outcomes: Sequence[Outcome], label: str) -> tuple[float | None, float | None]:
    """Fraction of the gap between the variant's own models and parallel SGD that its final merge closes,
    (merged - mean local) / (all-reduce every round - mean local), per seed; mean and std over the seeds."""
    groups = common.by_label(outcomes)
    parallel = {run.seed: run.summary["merged_test_accuracy"] for run in groups.get(EVERY_ROUND, [])}
    values = []
    for run in groups.get(label, []):
        local, merged = run.summary.get("mean_local_test_accuracy"), run.summary["merged_test_accuracy"]
        if run.seed in parallel and local is not None and parallel[run.seed] > local:
            values.append((merged - local) / (parallel[run.seed] - local))
    return common.mean_std(values)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys against xs."""
    return statistics.covariance(xs, ys) / statistics.variance(xs)


def spearman(ys: Sequence[float]) -> float:
    """Rank correlation of ys with their order (Pearson on the ranks; ties rank low), 0 when all are equal."""
    ranks = [sorted(ys).index(y) for y in ys]
    return statistics.correlation(range(len(ys)), ranks) if len(set(ys)) > 1 else 0.0


def window_trend(outcomes: Sequence[Outcome]) -> str:
    """Merged accuracy against the window's position: slope and rank correlation of the seed means, and per seed."""
    groups = common.by_label(outcomes)
    windows = [(s, {r.seed: r.summary["merged_test_accuracy"] for r in groups.get(window_label(s), [])})
               for s in POSITIONS]
    windows = [(s, v) for s, v in windows if v]
    seeds = sorted(set.intersection(*[set(v) for _, v in windows])) if windows else []
    if len(windows) < 3 or not seeds:
        return ""
    xs, ys = [s for s, _ in windows], [statistics.fmean(v[seed] for seed in seeds) for _, v in windows]
    best = max(zip(xs, ys), key=lambda w: w[1])[0]
    text = (f"\nWindow position against merged acc (means over the seeds every window has, "
            f"{', '.join(map(str, seeds))}): slope {slope(xs, ys) / 10:+.4f} per tenth of training, "
            f"Spearman {spearman(ys):+.2f}; best window {window_label(best)}")
    per_seed = [[v[seed] for _, v in windows] for seed in seeds] if len(windows) == len(POSITIONS) else []
    if per_seed:
        slopes = [slope(xs, seed_ys) / 10 for seed_ys in per_seed]
        ranks = [spearman(seed_ys) for seed_ys in per_seed]
        last_minus_first = [seed_ys[-1] - seed_ys[0] for seed_ys in per_seed]
        text += (f". Per seed: slope per tenth {common.pm(slopes)}, Spearman "
                 f"{', '.join(f'{r:+.2f}' for r in ranks)}, last window - first {common.pm(last_minus_first)}")
    return text + ".\n"


def report(outcomes: Sequence[Outcome]) -> str:
    extra = [common.summary_column("merged val acc", "merged_validation_accuracy"),
             common.summary_column("comm rounds", "communication_rounds", 0)]
    groups = common.by_label(outcomes)
    parallel = [r.summary["merged_test_accuracy"] for r in groups.get(EVERY_ROUND, [])]
    rows = []
    for label in (NO_COMMUNICATION, NO_WINDOW):
        if label in groups:
            mean, std = gap_recovered(outcomes, label)
            runs = groups[label]
            rows.append([label, common.pm([r.summary.get("mean_local_test_accuracy") for r in runs]),
                         common.pm([r.summary["merged_test_accuracy"] for r in runs]), common.pm(parallel),
                         common.plus_minus(mean, std, ".1%")])
    return (common.summary_table(outcomes, extra) + window_trend(outcomes)
            + "\nGap to parallel SGD closed by the final merge, (merged - mean local) / (all-reduce every round "
              "- mean local), per seed:\n\n"
            + common.markdown(["variant", "mean local (no merge)", "merged", "all-reduce every round",
                               "gap recovered"], rows)
            + "\nMergeability: accuracy of the global average of the agents' models over training "
              "(mean over seeds; the final merge comes after the last column):\n\n"
            + common.curve_table(outcomes, "merged_test_accuracy")
            + "\nMean local accuracy over training:\n\n"
            + common.curve_table(outcomes, "mean_local_test_accuracy"))


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report)
