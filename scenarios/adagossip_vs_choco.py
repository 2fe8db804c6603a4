"""AdaGossip against CHOCO-SGD under compression, gamma tuned per rule x compressor x partition on validation.

The cpu scale follows the AdaGossip protocol (configs/cpu/adagossip_mnist_mlp.yaml: 16 agents on a ring, lr
0.1 Nesterov, lr x0.1 at 50% and 75%, beta 0.999, final merge), with top-k keeping 1% and 10% of every
tensor, QSGD 4 bit (CHOCO's scaling) and sign, on IID data (the code's default) and on the two-stage
Dirichlet split at alpha 0.1:
  1. tuning, one `raygossip sweep`: every partition x rule x compressor over the SAME gamma grid GAMMAS for
     both rules (AdaGossip's gamma is the numerator of gamma / rms(gossip error), capped at 1), ranked on
     the merged model's validation accuracy (10% of the training set held out; never the test set);
  2. each (partition, rule, compressor) at its picked gamma over --seeds (a seed the sweep ran is copied).
The report: mean local test accuracy (the paper's metric) and merged accuracy (after the final merge), mean
± std over seeds, and AdaGossip minus CHOCO per compressor and partition with the spread of the per-seed
differences. --graph torus|dyck moves the smaller scales onto the papers' other graphs; the paper scale
reads adagossip_cifar10_resnet20_<graph>.yaml.

    python -m scenarios adagossip_vs_choco --scale cpu --seeds 0 1 2 --tune-out runs/adagossip_vs_choco-tune
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

from scenarios import common, tuning
from scenarios.common import Outcome, Variant, Whole

SCENARIO = "adagossip_vs_choco"
CPU_CONFIG = "adagossip_mnist_mlp.yaml"
PAPER_CONFIGS = {graph: f"adagossip_cifar10_resnet20_{graph}.yaml" for graph in ("ring", "torus", "dyck")}
RULES = ("choco", "adagossip")
COMPRESSORS: dict[str, dict] = {
    "top-k 1%": {"name": "top_k", "ratio": 0.01},
    "top-k 10%": {"name": "top_k", "ratio": 0.1},
    # QSGD with CHOCO's scaling 1/(1+omega) (the code's --biased): unscaled QSGD is not a contraction
    "QSGD 4 bit": {"name": "qsgd", "bits": 4, "scaled": True},
    "sign": {"name": "sign"},
}
# None is IID (the AdaGossip code's default partition); 0.1 the two-stage Dirichlet split.
ALPHAS = {"smoke": (None,), "cpu": (None, 0.1), "paper": (None, 0.01)}
# One grid for both rules, log-spaced (a decade apart, and 0.5): AdaGossip's useful gammas are small (gamma /
# rms(gossip error) is capped at 1), CHOCO's large, so the grid spans both.
GAMMAS = {"smoke": (0.01, 0.5), "cpu": (0.001, 0.01, 0.1, 0.5), "paper": (0.001, 0.005, 0.02, 0.1, 0.5)}
TUNING_SEEDS = (0,)
DEFAULT_GAMMA = {"choco": 0.1, "adagossip": 0.005}  # without tuning (--no-tune, or variants() without picks)
GRAPHS = {  # the cpu/smoke config moved onto the papers' other graphs
    "ring": {},
    "torus": {"agents": {"count": 16}, "topology": Whole(name="circulant", weights="uniform", params={"offsets": [1, 4]})},
    "dyck": {"agents": {"count": 32}, "topology": Whole(name="adagossip_dyck", weights="uniform", params={})},
}


def alpha_suffix(alpha: float | None) -> str:
    return ", IID" if alpha is None else f", alpha={alpha:g}"


def partition(alpha: float | None) -> dict:
    return {"kind": "iid"} if alpha is None else {"kind": "dirichlet_lin", "alpha": alpha}


def base_of(scale: str, overrides: Sequence[str], graph: str) -> dict:
    if graph not in GRAPHS:
        raise common.UserError("--graph", f"must be one of {', '.join(GRAPHS)}, got {graph!r}")
    base = common.base_mapping(scale, CPU_CONFIG, PAPER_CONFIGS[graph], overrides)
    if scale != "paper":
        base = common.deep_merge(base, GRAPHS[graph])
    return common.deep_merge(base, {"schedule": {"averaging_rate": Whole(kind="constant"),
                                                 "communication": common.EVERY_ROUND}})


def tuning_grid(scale: str) -> dict[str, list]:
    return {"data.partition": [partition(alpha) for alpha in ALPHAS[scale]], "gossip.rule": list(RULES),
            "gossip.compressor": list(COMPRESSORS.values()), "gossip.gamma": list(GAMMAS[scale])}


def variants(scale: str = "cpu", overrides: Sequence[str] = (), graph: str = "ring",
             picks: dict | None = None) -> list[Variant]:
    """Every partition x rule x compressor at its gamma: picks {(alpha, rule, compressor label): gamma}."""
    base = base_of(scale, overrides, graph)
    out: list[Variant] = []
    for alpha in ALPHAS[scale]:
        for name, compressor in COMPRESSORS.items():
            for rule in RULES:
                gamma = (picks or {}).get((alpha, rule, name), DEFAULT_GAMMA[rule])
                out.append(common.variant(SCENARIO, base, f"{rule}, {name}{alpha_suffix(alpha)}", {
                    "data": {"partition": Whole(partition(alpha))},
                    "gossip": {"rule": rule, "gamma": gamma, "compressor": Whole(compressor)},
                }))
    return out


def picks_of(trials: dict) -> dict:
    """{(alpha, rule, compressor label): gamma} of the best point per group in a tuning sweep."""
    names = {tuning.key_of(spec): name for name, spec in COMPRESSORS.items()}
    best = tuning.best_per_group(trials, lambda s: (tuning.key_of(s["data.partition"]), s["gossip.rule"],
                                                    tuning.key_of(s["gossip.compressor"])))
    return {(json.loads(part).get("alpha"), rule, names[comp]): settings["gossip.gamma"]
            for (part, rule, comp), settings in best.items()}


def tuning_table(trials: dict) -> str:
    """Validation accuracy of every gamma per partition x rule x compressor (one row each, the grid across)."""
    names = {tuning.key_of(spec): name for name, spec in COMPRESSORS.items()}
    gammas = trials["grid"]["gossip.gamma"]
    cells: dict[tuple, dict] = {}
    for point in trials["points"]:
        s = point["settings"]
        part = s["data.partition"]
        key = (alpha_suffix(part.get("alpha") if part["kind"] != "iid" else None).lstrip(", "), s["gossip.rule"],
               names.get(tuning.key_of(s["gossip.compressor"]), "?"))
        cells.setdefault(key, {})[s["gossip.gamma"]] = "failed" if point["mean"] is None else \
            f"{point['mean']:.4f}" + ("" if point["finished"] else " (diverged)")
    picks = picks_of(trials)
    rows = []
    for key, by_gamma in cells.items():
        alpha = None if key[0] == "IID" else float(key[0].split("=")[1])
        chosen = picks.get((alpha, key[1], key[2]))
        rows.append([*key, *[by_gamma.get(g, "") + (" **picked**" if g == chosen else "") for g in gammas]])
    order = list(COMPRESSORS)
    rows.sort(key=lambda row: (row[0] != "IID", row[0], order.index(row[2]) if row[2] in order else 99,
                               RULES.index(row[1]) if row[1] in RULES else 99))
    return common.markdown(["partition", "rule", "compressor", *[f"gamma={g:g}" for g in gammas]], rows)


def differences(outcomes: Sequence[Outcome]) -> str:
    """AdaGossip minus CHOCO per compressor and partition: mean ± std of the per-seed differences."""
    groups = common.by_label(outcomes)
    rows = []
    for label, runs in groups.items():
        if not label.startswith("adagossip, "):
            continue
        choco = groups.get("choco, " + label.removeprefix("adagossip, "))
        if not choco:
            continue
        row = [label.removeprefix("adagossip, "), f"{choco[0].config.gossip.gamma:g} / {runs[0].config.gossip.gamma:g}"]
        for key in ("mean_local_test_accuracy", "merged_test_accuracy"):
            mine = {run.seed: run.summary.get(key) for run in runs}
            theirs = {run.seed: run.summary.get(key) for run in choco}
            row += [common.pm(list(theirs.values())), common.pm(list(mine.values())),
                    common.pm([mine[s] - theirs[s] for s in mine if s in theirs and None not in (mine[s], theirs[s])])]
        row.append(f"{common.mean_std([(r.summary.get('bytes_sent') or 0) / 1e6 for r in runs])[0]:.1f}")
        rows.append(row)
    return common.markdown(["compressor, partition", "gamma CHOCO / Ada", "CHOCO local", "AdaGossip local",
                            "diff local", "CHOCO merged", "AdaGossip merged", "diff merged", "MB sent"], rows)


def report(outcomes: Sequence[Outcome]) -> str:
    extra = [common.summary_column("consensus dist", "consensus_distance")]
    return (common.summary_table(outcomes, extra)
            + "\nAdaGossip minus CHOCO-SGD (mean ± std over seeds; diff: of the per-seed differences):\n\n"
            + differences(outcomes))


def extend(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--graph", choices=list(GRAPHS), default="ring", help="the graph (default: ring)")


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report, extend=extend, options=["graph"],
                          tuning=common.Tuning(
    base=lambda args: base_of(args.scale, args.overrides, args.graph),
    grid=lambda args, base: tuning_grid(args.scale),
    picks=lambda trials, args: picks_of(trials),
    table=tuning_table, untuned="gamma DEFAULT_GAMMA per rule", seeds=TUNING_SEEDS))
