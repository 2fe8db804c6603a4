"""ARS against a constant averaging rate, each tuned on validation with the same budget, at two heterogeneity levels.

The cpu scale follows the ARS protocol (configs/cpu/ars_mnist_mlp.yaml: 16 agents on a ring, lr 0.1 Nesterov,
lr x0.1 at 50% and 60%, 20 real epochs, final merge). Per heterogeneity level (two-stage Dirichlet alpha 0.01
as the paper, and alpha 1):
  1. tuning, one `raygossip sweep` over both levels: ARS with gamma0 in GAMMA0S (growing per epoch so that
     gamma reaches 1 at 80% of training) and a constant rate over CONSTANTS, a grid of the same size, ranked
     on the merged model's validation accuracy (10% of the training set held out; never the test set);
  2. the best ARS and the best constant per level, over --seeds (a seed the sweep ran is copied, not rerun).
The report: mean local test accuracy (the paper's metric: each agent's own model, before the merge) and
the merged accuracy (after the final merge), mean ± std over seeds, and the difference ARS minus constant.

    python -m scenarios ars_vs_constant --scale cpu --seeds 0 1 2 --tune-out runs/ars_vs_constant-tune
"""

from __future__ import annotations

import json
from typing import Sequence

from scenarios import common, tuning
from scenarios.common import Outcome, Variant, Whole

SCENARIO = "ars_vs_constant"
CPU_CONFIG, PAPER_CONFIG = "ars_mnist_mlp.yaml", "ars_cifar10_resnet20.yaml"

# None is IID.
ALPHAS = {"smoke": (0.1, None), "cpu": (0.01, 1.0), "paper": (0.01, 1.0)}
GAMMA0S = {"smoke": (0.09, 0.3), "cpu": (0.03, 0.09, 0.3), "paper": (0.03, 0.09, 0.3)}
CONSTANTS = {"smoke": (0.5, 1.0), "cpu": (0.25, 0.5, 1.0), "paper": (0.25, 0.5, 1.0)}
REACH = 0.8  # fraction of training at which ARS reaches gamma 1
TUNING_SEEDS = (0,)
# What the cpu sweep picked (docs/RESULTS.md, claim a): used by --no-tune and by variants() without picks.
PICKED = {"cpu": {(0.01, "ars"): 0.09, (0.01, "constant"): 1.0, (1.0, "ars"): 0.09, (1.0, "constant"): 1.0}}


def alpha_suffix(alpha: float | None) -> str:
    return ", IID" if alpha is None else f", alpha={alpha:g}"


def partition(base: dict, alpha: float | None) -> dict:
    """The partition mapping at this level: the base's Dirichlet kind at `alpha`, or IID."""
    kind = base["data"]["partition"].get("kind", "dirichlet_lin")
    return {"kind": "iid"} if alpha is None else {"kind": kind, "alpha": alpha}


def rate(kind: str, value: float, epochs: int) -> dict:
    """The averaging-rate mapping of ARS from gamma0 `value` (1 at REACH of training) or of a constant rate."""
    if kind == "ars":
        return {"kind": "ars", "gamma0": value, "growth": round(common.ars_growth(value, epochs, REACH), 4)}
    return {"kind": "constant", "gamma0": value}


def tuning_grid(base: dict, scale: str) -> dict[str, list]:
    """The sweep: every level x (ARS gamma0s and constants); both families get grids of the same size.

    The two families alternate, the paper's values first (constant 1 = D-PSGD, ARS 0.09), so a sweep cut
    short still compares them."""
    epochs = common.epochs_of(base)
    ars = [rate("ars", g, epochs) for g in sorted(GAMMA0S[scale], key=lambda g: abs(g - 0.09))]
    const = [rate("constant", g, epochs) for g in sorted(CONSTANTS[scale], reverse=True)]
    return {"data.partition": [partition(base, alpha) for alpha in ALPHAS[scale]],
            "schedule.averaging_rate": [r for pair in zip(const, ars) for r in pair]}


def base_of(scale: str, overrides: Sequence[str]) -> dict:
    base = common.base_mapping(scale, CPU_CONFIG, PAPER_CONFIG, overrides)
    return common.deep_merge(base, {"gossip": {"rule": "dpsgd", "gamma": 1.0, "compressor": Whole(name="identity")},
                                    "schedule": {"communication": common.EVERY_ROUND}})


def label_of(kind: str, value: float, growth: float | None, suffix: str) -> str:
    if kind == "ars":
        return f"ARS gamma0={value:g} (x{growth:.4g}/epoch){suffix}"
    return f"constant gamma={value:g}{suffix}"


def variants(scale: str = "cpu", overrides: Sequence[str] = (), picks: dict | None = None) -> list[Variant]:
    """The best ARS and the best constant per level: picks {(alpha, 'ars'|'constant'): value}; default PICKED
    (the scale's last tuning), or for a scale without one the middle of each grid."""
    base = base_of(scale, overrides)
    epochs = common.epochs_of(base)
    picks = picks or PICKED.get(scale, {})
    out: list[Variant] = []
    for alpha in ALPHAS[scale]:
        suffix = alpha_suffix(alpha)
        for kind, grid in (("ars", GAMMA0S[scale]), ("constant", CONSTANTS[scale])):
            value = picks.get((alpha, kind), grid[len(grid) // 2])
            spec = rate(kind, value, epochs)
            out.append(common.variant(SCENARIO, base, label_of(kind, value, spec.get("growth"), suffix), {
                "data": {"partition": Whole(partition(base, alpha))},
                "schedule": {"averaging_rate": Whole(spec)}}))
    return out


def picks_of(trials: dict, scale: str) -> dict:
    """{(alpha, 'ars'|'constant'): gamma0} of the best point per level and family in a tuning sweep."""
    best = tuning.best_per_group(trials, lambda s: (tuning.key_of(s["data.partition"]),
                                                    s["schedule.averaging_rate"]["kind"]))
    out = {}
    for (part, kind), settings in best.items():
        alpha = json.loads(part).get("alpha")
        out[(alpha, kind)] = settings["schedule.averaging_rate"]["gamma0"]
    return out


def tuning_table(trials: dict) -> str:
    """Every grid point's validation score (the sweep's ranking), grouped by level, best first."""
    rows = []
    for point in trials["points"]:
        s = point["settings"]
        rate_ = s["schedule.averaging_rate"]
        mean = point["mean"]
        rows.append([json.dumps(s["data.partition"]).replace('"', ""), rate_["kind"], f"{rate_['gamma0']:g}",
                     "diverged/failed" if mean is None else f"{mean:.4f}",
                     common.fmt(point.get("merged_test_accuracy"))])
    rows.sort(key=lambda r: (r[0], r[1]))
    return common.markdown(["partition", "rate", "gamma0", "merged val acc (tuning)", "merged test acc"], rows)


def comparison(outcomes: Sequence[Outcome]) -> str:
    """Per level: best ARS minus best constant, mean local and merged accuracy, with the seeds' spread."""
    groups = common.by_label(outcomes)
    lines = []
    levels = []
    for label in groups:
        suffix = label[label.rfind(", "):]
        if suffix not in levels:
            levels.append(suffix)
    for suffix in levels:
        ars = [runs for label, runs in groups.items() if label.startswith("ARS") and label.endswith(suffix)]
        const = [runs for label, runs in groups.items() if label.startswith("constant") and label.endswith(suffix)]
        if not ars or not const:
            continue
        cells = []
        for key, name in (("mean_local_test_accuracy", "local"), ("merged_test_accuracy", "merged")):
            by_seed_ars = {run.seed: run.summary.get(key) for run in ars[0]}
            by_seed_c = {run.seed: run.summary.get(key) for run in const[0]}
            diffs = [by_seed_ars[s] - by_seed_c[s] for s in by_seed_ars
                     if s in by_seed_c and None not in (by_seed_ars[s], by_seed_c[s])]
            cells.append(f"{name} {common.pm(diffs)}")
        lines.append(f"- {suffix.lstrip(', ')}: {ars[0][0].label.removesuffix(suffix)} minus "
                     f"{const[0][0].label.removesuffix(suffix)}: " + ", ".join(cells) + " (per-seed differences)")
    return "ARS minus the constant rate (both tuned), mean ± std over seeds:\n\n" + "\n".join(lines) + "\n"


def report(outcomes: Sequence[Outcome]) -> str:
    return common.summary_table(outcomes, [common.summary_column("consensus dist", "consensus_distance")]) \
        + "\n" + comparison(outcomes)


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report,
                          tuning=common.Tuning(
    base=lambda args: base_of(args.scale, args.overrides),
    grid=lambda args, base: tuning_grid(base, args.scale),
    picks=lambda trials, args: picks_of(trials, args.scale),
    table=tuning_table, untuned="use the last picks (PICKED)", seeds=TUNING_SEEDS))
