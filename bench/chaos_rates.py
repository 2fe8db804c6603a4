"""Accuracy, wall time and bytes against the rate of agent deaths and against the message-loss rate (resync vs none).

    python bench/chaos_rates.py --out runs/chaos_rates             # the soak's quick size: 8 agents, 96 rounds
    python bench/chaos_rates.py --size full --out runs/chaos_rates # the soak's size: 32 agents, 360 rounds (long)

Two sweeps on the soak's base run (bench/soak.py: async CHOCO top-10 %, packed 2 per actor, the quickstart MLP on
digits): round-rate chaos at no deaths and three mean gaps (the last the soak's own), no message loss; then message
loss at three rates, each with `faults.recovery: resync` and `none`, no deaths. Prints one table, writes
`rates.md`, `rates.json` and `rates.png` (accuracy and MB sent against each rate) under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from raygossip.api import run  # noqa: E402
from raygossip.validation import load_config  # noqa: E402
from soak import SIZES, row, soak_config, table  # noqa: E402

DEATH_GAPS = {"quick": [24.0, 12.0, 6.0], "full": [6.0, 3.0, 1.5]}  # mean rounds between deaths; last = the soak's
LOSSES = [0.05, 0.1, 0.2]


def variants(size: str, seed: int) -> list[tuple[str, str, float, dict]]:
    """(sweep, recovery, rate, config mapping): the chaos-rate sweep, then the loss sweep, from the soak's clean run."""
    _, clean = soak_config(size, seed)
    out = [("deaths", "resync", 0.0, clean)]
    for gap in DEATH_GAPS[size]:
        config = copy.deepcopy(clean)
        config["name"] = f"rates-deaths-every-{gap:g}"
        config["faults"] = {"chaos": {"every_rounds": gap, "start": 2}}
        out.append(("deaths", "resync", 1.0 / gap, config))
    for loss in LOSSES:
        for recovery in ("resync", "none"):
            config = copy.deepcopy(clean)
            config["name"] = f"rates-loss-{loss:g}-{recovery}"
            config["faults"] = {"drop_messages": loss, "recovery": recovery}
            out.append(("loss", recovery, loss, config))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    deaths = [r for r in rows if r["sweep"] == "deaths"]
    ax = axes[0]
    ax.plot([r["rate"] for r in deaths], [r["mean_local_accuracy"] for r in deaths], "o-", label="mean local")
    ax.plot([r["rate"] for r in deaths], [r["merged_accuracy"] for r in deaths], "s--", label="merged")
    ax.set_xlabel("agent deaths per round (chaos, every life)")
    ax.set_ylabel("test accuracy")
    ax.legend()
    ax = axes[1]
    for recovery, style in (("resync", "o-"), ("none", "x--")):
        lossy = [r for r in rows if r["sweep"] == "loss" and r["recovery"] == recovery]
        base = [r for r in deaths if r["rate"] == 0.0]
        points = base + lossy
        ax.plot([r["rate"] for r in points], [r["mean_local_accuracy"] for r in points], style,
                label=f"recovery {recovery}")
    ax.set_xlabel("fraction of messages lost")
    ax.set_ylabel("mean local test accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True, help="run folders, rates.md, rates.json, rates.png")
    args = parser.parse_args(argv)
    rows = []
    for sweep, recovery, rate, data in variants(args.size, args.seed):
        config = load_config(base=data)
        began = time.perf_counter()
        result = run(config, args.out / config.name, progress=False)
        summary = dict(result.summary)
        summary.setdefault("wall_time_s", time.perf_counter() - began)
        rows.append({"sweep": sweep, "rate": rate, "recovery": recovery, **row(config.name, summary),
                     "resync_MB": (summary.get("resync_bytes") or 0) / 1e6})
        print(table(rows[-1:]), flush=True)
    text = table(rows)
    print()
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rates.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "rates.md").write_text(text + "\n")
    plot(rows, args.out / "rates.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
