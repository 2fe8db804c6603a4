"""When to spend a fixed communication budget, and what a single global merge at the end buys.

All variants end with the exact global merge unless they say otherwise (the single-merge paper's setting).
  - budget 25% of the rounds, spent early (a dense window over the first quarter), uniformly (every 4th
    round throughout: kind late with start 1.0 and sparse_every 4), at random (each agent with p = 0.25
    per round), or late (dense over the last quarter: kind late with start 0.75);
  - a dense window of a quarter of training at other positions (25-50%, 50-75%);
  - every round (the full budget), for reference;
  - a single global merge at the end and no communication before it, against no merge at all;
  - parallel SGD (the exact average every round).
Then the mergeability curve: the accuracy the global average of the agents' models would have at every
evaluation (merged_test_accuracy in metrics.jsonl), for every variant, merged at the end or not.

    python scenarios/late_communication.py --scale cpu --seeds 0 1 2
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scenarios import common
from scenarios.common import Outcome, Variant

SCENARIO = "late_communication"
CPU_CONFIG, PAPER_CONFIG = "single_merge_mnist_mlp.yaml", "single_merge_cifar100_resnet18.yaml"
BUDGET = 0.25  # fraction of rounds that communicate
WINDOWS = (0.25, 0.5)  # further positions of the dense window (0 and 0.75 are "early" and "late")


def schedule(kind: str, **params) -> dict:
    """A communication schedule patch that keeps the base's pull rule (random peer in the paper's setting)."""
    return {"schedule": {"communication": {"kind": kind, "p": 1.0, "sparse_every": 0, **params},
                         "final_merge": {"enabled": True}}}


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    base = common.base_mapping(scale, CPU_CONFIG, PAPER_CONFIG, overrides)
    pct = f"{BUDGET:.0%}"
    sparse_every = round(1 / BUDGET)

    def make(label: str, patch: dict) -> Variant:
        return common.variant(SCENARIO, base, label, patch)

    out = [
        make("every round (100%)", schedule("every")),
        make(f"budget {pct}: early (window 0-{pct})", schedule("window", start=0.0, width=BUDGET)),
        make(f"budget {pct}: uniform (every {sparse_every}th round)",
             schedule("late", start=1.0, sparse_every=sparse_every)),
        make(f"budget {pct}: random (p={BUDGET:g})", schedule("probability", p=BUDGET)),
        make(f"budget {pct}: late (last {pct})", schedule("late", start=1.0 - BUDGET)),
    ]
    for start in WINDOWS:
        out.append(make(f"dense window {start:.0%}-{start + BUDGET:.0%}", schedule("window", start=start, width=BUDGET)))
    out += [
        make("single global merge only", schedule("none")),
        make("no communication, no merge", common.deep_merge(schedule("none"),
                                                               {"schedule": {"final_merge": {"enabled": False}}})),
        common.parallel_sgd(SCENARIO, base),
    ]
    return out


def report(outcomes: Sequence[Outcome]) -> str:
    extra = [
        common.summary_column("merged acc before merge", "merged_test_accuracy_before_merge"),
        common.summary_column("comm rounds", "communication_rounds", 0),
    ]
    return (common.summary_table(outcomes, extra)
            + "\nMergeability: accuracy of the global average of the agents' models over training "
              "(mean over seeds; the final merge, where enabled, comes after the last column):\n\n"
            + common.curve_table(outcomes, "merged_test_accuracy")
            + "\nMean local accuracy over training:\n\n"
            + common.curve_table(outcomes, "mean_local_test_accuracy"))


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_scenario(SCENARIO, __doc__, argv, variants, report)


if __name__ == "__main__":
    sys.exit(main())
