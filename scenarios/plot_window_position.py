"""Final merged accuracy against the position of the all-reduce window (the single-merge paper's Fig. 2), as a PNG.

Reads the run folders scenarios/late_communication.py wrote (summary.json and config.yaml's label in each):
one point per window position (mean over seeds, bars min-max), the baselines as horizontal lines.

    python -m scenarios plot_window_position runs/late_communication --out window_position.png
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path
from typing import Sequence

from raygossip.config_io import read_yaml
from raygossip.errors import UserError
from scenarios import common, late_communication as lc

WINDOW = re.compile(r"all-reduce (\d+)%-(\d+)%")
BASELINES = {lc.EVERY_ROUND: "tab:green", lc.NO_WINDOW: "tab:blue", lc.NO_COMMUNICATION: "tab:red"}


def collect(root: Path) -> dict[str, list[dict]]:
    """summary.json of every run folder below root, grouped by the run's label."""
    groups: dict[str, list[dict]] = {}
    for summary in sorted(root.glob("*/summary.json")):
        label = read_yaml(summary.parent / "config.yaml").get("label") or summary.parent.name
        groups.setdefault(label, []).append(json.loads(summary.read_text()))
    if not groups:
        raise UserError("RUNS", f"no run folders with a summary.json under {root}")
    return groups


def plot(groups: dict[str, list[dict]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    points = sorted((int(m.group(1)) + int(m.group(2))) / 200 for label in groups
                    if (m := WINDOW.search(label)))
    for key, style, name in (("merged_test_accuracy", "o-", "merged (after the final merge)"),
                             ("mean_local_test_accuracy", "s--", "mean local (before the merge)")):
        xs, ys, lo, hi = [], [], [], []
        for label, runs in groups.items():
            m = WINDOW.search(label)
            values = [run[key] for run in runs if run.get(key) is not None]
            if m and values:
                xs.append((int(m.group(1)) + int(m.group(2))) / 200)
                ys.append(statistics.fmean(values))
                lo.append(ys[-1] - min(values))
                hi.append(max(values) - ys[-1])
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.errorbar([xs[i] for i in order], [ys[i] for i in order], yerr=[[lo[i] for i in order], [hi[i] for i in order]],
                    fmt=style, color="black", capsize=3, label=f"r=0.2 + window: {name}")
    for label, color in BASELINES.items():
        values = [run["merged_test_accuracy"] for run in groups.get(label, [])]
        if values:
            mean = statistics.fmean(values)
            ax.axhline(mean, color=color, linestyle=":", label=f"{label} + merge: {mean:.3f}")
            ax.axhspan(min(values), max(values), color=color, alpha=0.12)
    ax.set_xlabel("position of the all-reduce window (its centre, fraction of training)")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(points or [0.05 + k / 10 for k in range(10)])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.png")
    fig.savefig(partial, dpi=120)
    plt.close(fig)
    partial.replace(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scenarios plot_window_position", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="the folder scenarios/late_communication.py --out wrote into")
    parser.add_argument("--out", type=Path, default=Path("window_position.png"), help="PNG to write")
    parser.add_argument("--title", default="one all-reduce window (1/10 of training) at 10 positions, r = 0.2 elsewhere")
    args = parser.parse_args(argv)

    def body() -> int:
        groups = collect(args.runs)
        plot(groups, args.out, args.title)
        seeds = max(len(runs) for runs in groups.values())
        print(f"{args.out}: {len(groups)} variants, up to {seeds} seeds each")
        return 0

    return common.main_guard(body)


COMMAND = main
