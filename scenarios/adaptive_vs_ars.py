"""The adaptive averaging rate (gamma from the consensus distance, set by the coordinator each epoch) against ARS.

One heterogeneity level (the cpu config's Dirichlet alpha 0.1), D-PSGD on a ring, 10% of the training set held
out for validation. The same tuning budget for both schedules, picked on the validation accuracy:
  - ARS, exponential: gamma0 in {0.09, 0.3}, growing so that gamma reaches 1 at 50% or 80% of training,
  - adaptive: gamma0 in {0.09, 0.3}, exponent in {1, 2} (gamma = gamma0 (largest distance / distance)^exponent,
    ratcheted, in [gamma0, 1]: algorithms.schedules.adaptive_gamma),
  - constant gamma 1 (plain D-PSGD), untuned.
The table is followed by each family's pick (best mean merged validation accuracy over the seeds) with its test
accuracy, and the adaptive pick's gamma per epoch.

    python -m scenarios adaptive_vs_ars --scale cpu --seeds 0 1 2
"""

from __future__ import annotations

import statistics
from typing import Sequence

from scenarios import common
from scenarios.common import Outcome, Variant, Whole

SCENARIO = "adaptive_vs_ars"
CPU_CONFIG, PAPER_CONFIG = "ars_mnist_mlp.yaml", "ars_cifar10_resnet20.yaml"
GAMMA0S = {"smoke": (0.09,), "cpu": (0.09, 0.3), "paper": (0.09, 0.3)}
REACHES = {"smoke": (0.8,), "cpu": (0.5, 0.8), "paper": (0.5, 0.8)}  # ARS: fraction of training at which gamma is 1
EXPONENTS = {"smoke": (1.0,), "cpu": (1.0, 2.0), "paper": (1.0, 2.0)}  # adaptive
FAMILIES = ("ARS", "adaptive", "constant")


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    """Every (label, Config) of the scenario at this scale: the ARS grid, the adaptive grid, constant 1."""
    base = common.base_mapping(scale, CPU_CONFIG, PAPER_CONFIG, overrides)
    base = common.deep_merge(base, {"eval": {"every": 1, "validation_fraction": 0.1},  # adaptive: a record each epoch
                                    "schedule": {"communication": common.EVERY_ROUND},
                                    "gossip": {"rule": "dpsgd", "gamma": 1.0, "compressor": Whole(name="identity")}})
    epochs = common.epochs_of(base)

    def rate(label: str, spec: dict) -> Variant:
        return common.variant(SCENARIO, base, label, {"schedule": {"averaging_rate": Whole(spec)}})

    out = []
    for gamma0 in GAMMA0S[scale]:
        for reach in REACHES[scale]:
            growth = common.ars_growth(gamma0, epochs, reach)
            out.append(rate(f"ARS gamma0={gamma0:g} reach={reach:g}", {"kind": "ars", "gamma0": gamma0, "growth": growth}))
    for gamma0 in GAMMA0S[scale]:
        for exponent in EXPONENTS[scale]:
            out.append(rate(f"adaptive gamma0={gamma0:g} exponent={exponent:g}",
                            {"kind": "adaptive", "gamma0": gamma0, "exponent": exponent}))
    out.append(rate("constant gamma=1 (D-PSGD)", {"kind": "constant", "gamma0": 1.0}))
    return out


def picks_report(outcomes: Sequence[Outcome]) -> str:
    """Each family's variant with the best mean merged validation accuracy, its test accuracies, and the adaptive
    pick's gamma per epoch (mean over seeds)."""
    groups = common.by_label(outcomes)

    def mean(label: str, key: str) -> float | None:
        return common.mean_std([run.summary.get(key) for run in groups[label]])[0]

    lines = ["Picked on the held-out validation accuracy (mean over seeds), then tested:", ""]
    rows = []
    for family in FAMILIES:
        members = [label for label in groups if label.startswith(family)]
        if not members:
            continue
        best = max(members, key=lambda label: mean(label, "merged_validation_accuracy") or 0.0)
        runs = groups[best]
        rows.append([family, best, common.pm([r.summary.get("merged_validation_accuracy") for r in runs]),
                     common.pm([r.summary["merged_test_accuracy"] for r in runs]),
                     common.pm([r.summary.get("mean_local_test_accuracy") for r in runs]),
                     common.pm([r.summary.get("consensus_distance") for r in runs])])
        if family == "adaptive":
            epochs = sorted({int(e) for r in runs for e in r.summary.get("adaptive_gamma", {})})
            gammas = [statistics.fmean(r.summary["adaptive_gamma"][str(e)] for r in runs
                                       if str(e) in r.summary.get("adaptive_gamma", {})) for e in epochs]
            adaptive_line = (f"{best}: gamma from epoch 1 on (mean over seeds): "
                             + ", ".join(f"{g:.3f}" for g in gammas))
    lines.append(common.markdown(["family", "pick", "merged val acc", "merged test acc", "mean local acc",
                                  "consensus dist"], rows))
    if any(row[0] == "adaptive" for row in rows):
        lines += ["", adaptive_line]
    return "\n".join(lines) + "\n"


def report(outcomes: Sequence[Outcome]) -> str:
    return common.summary_table(outcomes, [common.summary_column("val acc", "merged_validation_accuracy"),
                                           common.summary_column("consensus dist", "consensus_distance")]) \
        + "\n" + picks_report(outcomes)


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report)
