"""ARS against the best constant averaging rate, across data heterogeneity, with the baselines.

For each Dirichlet alpha (0.1, 1.0 and IID at the cpu scale; 0.01, 0.1, 1.0 and IID at the paper scale):
  - ARS, exponential: gamma0 0.09 growing per epoch so that gamma reaches 1 at 80% of training
    (the paper's 0.09 x 1.01 per epoch over 300 epochs is exactly that; the paper scale uses the YAML's growth),
  - linear and cosine ramps from 0.09 to 1 over the same 80% of training,
  - constant gamma, a small sweep (the best of them is the fair competitor; gamma 1 is plain D-PSGD),
  - parallel SGD (exact average every round) and local training with and without the final merge.
The table is followed by, per alpha, the best constant rate and each ARS variant's difference to it.

    python scenarios/ars_vs_constant.py --scale cpu --seeds 0 1 2
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import common
from scenarios.common import Outcome, Variant, Whole

SCENARIO = "ars_vs_constant"
CPU_CONFIG, PAPER_CONFIG = "ars_mnist_mlp.yaml", "ars_cifar10_resnet20.yaml"

# None is IID. The constant sweep always holds 1.0 (= D-PSGD, so no separate D-PSGD baseline).
ALPHAS = {"smoke": (0.1, None), "cpu": (0.1, 1.0, None), "paper": (0.01, 0.1, 1.0, None)}
CONSTANTS = {"smoke": (0.3, 1.0), "cpu": (0.1, 0.3, 0.6, 1.0), "paper": (0.1, 0.3, 0.6, 1.0)}
GAMMA0 = 0.09
REACH = 0.8  # fraction of training at which the ramps reach gamma 1


def alpha_suffix(alpha: float | None) -> str:
    return ", IID" if alpha is None else f", alpha={alpha:g}"


def heterogeneity(base: dict, alpha: float | None) -> dict:
    """The base with its partition set to Dirichlet `alpha` (keeping the base's Dirichlet kind) or IID."""
    kind = base["data"]["partition"].get("kind", "dirichlet")
    partition = Whole(kind="iid") if alpha is None else Whole(kind=kind, alpha=alpha)
    return common.deep_merge(base, {"data": {"partition": partition}})


def rate_variants(base: dict, scale: str, suffix: str) -> list[Variant]:
    """The ARS ramps and the constant sweep on one data split."""
    epochs = common.epochs_of(base)
    ramp = max(1, round(REACH * epochs))
    yaml_rate = base["schedule"]["averaging_rate"]
    if scale == "paper" and yaml_rate.get("kind") == "ars":
        gamma0, growth = yaml_rate["gamma0"], yaml_rate["growth"]
    else:
        gamma0, growth = GAMMA0, common.ars_growth(GAMMA0, epochs, REACH)
    dpsgd = {"rule": "dpsgd", "gamma": 1.0, "compressor": Whole(name="identity")}

    def rate(label: str, spec: dict) -> Variant:
        return common.variant(SCENARIO, base, label + suffix,
                              {"gossip": dpsgd, "schedule": {"averaging_rate": Whole(spec),
                                                             "communication": common.EVERY_ROUND}})

    out = [
        rate(f"ARS exp ({gamma0:g} x{growth:.4g}/epoch)", {"kind": "ars", "gamma0": gamma0, "growth": growth}),
        rate(f"ARS linear ({gamma0:g} -> 1)", {"kind": "linear", "gamma0": gamma0, "ramp_epochs": ramp}),
        rate(f"ARS cosine ({gamma0:g} -> 1)", {"kind": "cosine", "gamma0": gamma0, "ramp_epochs": ramp}),
    ]
    for gamma in CONSTANTS[scale]:
        name = f"constant gamma={gamma:g}" + (" (D-PSGD)" if gamma == 1.0 else "")
        out.append(rate(name, {"kind": "constant", "gamma0": gamma}))
    return out


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    """Every (label, Config) of the scenario at this scale, grouped by alpha."""
    base = common.base_mapping(scale, CPU_CONFIG, PAPER_CONFIG, overrides)
    out: list[Variant] = []
    for alpha in ALPHAS[scale]:
        split = heterogeneity(base, alpha)
        suffix = alpha_suffix(alpha)
        out += rate_variants(split, scale, suffix)
        out += common.baselines(SCENARIO, split, suffix, dpsgd=False)
    return out


def best_constant_report(outcomes: Sequence[Outcome]) -> str:
    """Per alpha: the best constant rate (by mean local accuracy) and each ARS ramp's difference to it."""
    groups = common.by_label(outcomes)
    lines = []
    suffixes = []
    for label in groups:
        suffix = label[label.rfind(", "):] if ", " in label else ""
        if suffix not in suffixes:
            suffixes.append(suffix)
    for suffix in suffixes:
        def score(label: str, key: str) -> float | None:
            return common.mean_std([run.summary.get(key) for run in groups[label]])[0]

        constants = [label for label in groups if label.startswith("constant") and label.endswith(suffix)]
        ramps = [label for label in groups if label.startswith("ARS") and label.endswith(suffix)]
        if not constants or not ramps:
            continue
        best = max(constants, key=lambda label: score(label, "mean_local_test_accuracy") or 0.0)
        best_local, best_merged = score(best, "mean_local_test_accuracy"), score(best, "merged_test_accuracy")
        lines.append(f"- {suffix.lstrip(', ')}: best constant is {best.removesuffix(suffix)} "
                     f"(local {common.fmt(best_local)}, merged {common.fmt(best_merged)})")
        for ramp in ramps:
            local, merged = score(ramp, "mean_local_test_accuracy"), score(ramp, "merged_test_accuracy")
            if None in (local, merged, best_local, best_merged):
                continue
            lines.append(f"  - {ramp.removesuffix(suffix)}: local {local - best_local:+.4f}, "
                         f"merged {merged - best_merged:+.4f}")
    return "ARS against the best constant rate (mean over seeds):\n\n" + "\n".join(lines) + "\n"


def report(outcomes: Sequence[Outcome]) -> str:
    return common.summary_table(outcomes, [common.summary_column("consensus dist", "consensus_distance")]) \
        + "\n" + best_constant_report(outcomes)


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_scenario(SCENARIO, __doc__, argv, variants, report)


if __name__ == "__main__":
    sys.exit(main())
