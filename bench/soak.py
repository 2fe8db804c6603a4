"""The soak of issue 27: one long async CHOCO run under chaos (agents dying again and again, the coordinator dying,
messages lost) beside the same run without faults, and the table that compares them.

    python bench/soak.py                      # 32 agents packed 2 per actor, >= 200 agent deaths (long: ~1 h on 2 CPUs)
    python bench/soak.py --quick              # 8 agents, a few minutes: a check that it all works
    python bench/soak.py --quick --set faults.chaos.every_rounds=3 --out runs/soak

With link healing (faults.recovery: resync, issue 27) in the config tree the faulty run uses it; without, lost
CHOCO messages stay lost and public_copy_error shows it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raygossip.api import run  # noqa: E402
from raygossip.config import FaultsConfig  # noqa: E402
from raygossip.config_io import apply_overrides  # noqa: E402
from raygossip.presets import quickstart  # noqa: E402
from raygossip.validation import load_config  # noqa: E402

SIZES = {  # agents, epochs, steps per epoch, mean rounds between deaths, coordinator kills (s), step time (s)
    "full": {"agents": 32, "epochs": 30, "steps_per_epoch": 12, "every_rounds": 1.5, "coordinator_at_s": [20.0, 60.0],
             "step_time_s": 0.05},
    "quick": {"agents": 8, "epochs": 8, "steps_per_epoch": 12, "every_rounds": 6.0, "coordinator_at_s": [6.0, 14.0],
              "step_time_s": 0.05},
}


def soak_config(size: str, seed: int) -> tuple[dict, dict]:
    """(faulty, clean): the quickstart MLP on digits, async CHOCO top-10 % at a constant gamma of 0.1, 2 agents per
    actor; the faulty one with round-rate chaos for the whole run, two coordinator kills and 10 % message loss."""
    s = SIZES[size]
    clean = quickstart()
    clean.update(name=f"soak-{size}-clean", seed=seed)
    clean["agents"] = {"count": s["agents"]}
    clean["train"].update(epochs=s["epochs"], steps_per_epoch=s["steps_per_epoch"])
    clean["gossip"] = {"rule": "choco", "gamma": 0.1, "compressor": {"name": "top_k", "ratio": 0.1}}
    clean["schedule"]["averaging_rate"] = {"kind": "constant"}
    clean["eval"] = {"every": max(1, s["epochs"] // 5)}
    clean["runtime"] = {"engine": "ray", "mode": "async", "agents_per_actor": 2, "finish_quorum": 1.0,
                        "on_failure": "restart", "max_restarts": 10_000, "snapshot_every": 5, "progress": False,
                        "wait_timeout_s": 120.0, "timing": {"step_time_s": s["step_time_s"]}}
    faulty = copy.deepcopy(clean)
    faulty["name"] = f"soak-{size}-chaos"
    faulty["faults"] = {"drop_messages": 0.1,
                        "chaos": {"every_rounds": s["every_rounds"], "start": 2,
                                  "coordinator_at_s": s["coordinator_at_s"]}}
    if "recovery" in {f.name for f in dataclasses.fields(FaultsConfig)}:  # link healing, once it is there
        faulty["faults"]["recovery"] = "resync"
    return faulty, clean


def row(name: str, summary: dict) -> dict:
    failures = summary.get("failures", [])
    return {
        "run": name, "status": summary.get("status"), "agent_deaths": len(failures),
        "restarted": sum(f.get("action") == "restarted" for f in failures),
        "with_detection_and_recovery": sum("detection_s" in f and "recovery_s" in f for f in failures),
        "coordinator_kills": sum(k["target"] == "coordinator" for k in summary.get("chaos_kills", [])),
        "coordinator_deaths": summary.get("coordinator_deaths", 0),
        "lost_messages": summary.get("lost_messages", 0), "resyncs": summary.get("resyncs", 0),
        "public_copy_error": summary.get("public_copy_error"),
        "mean_local_accuracy": summary.get("mean_local_test_accuracy"),
        "merged_accuracy": summary.get("merged_test_accuracy"),
        "wall_s": summary.get("wall_time_s"), "MB_sent": (summary.get("bytes_sent") or 0) / 1e6,
        "median_detection_s": statistics.median([f["detection_s"] for f in failures if "detection_s" in f] or [0.0]),
        "median_recovery_s": statistics.median([f["recovery_s"] for f in failures if "recovery_s" in f] or [0.0]),
    }


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    cells = [[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [" | ".join(k.ljust(w) for k, w in zip(keys, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 agents, a few minutes (a check)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the faulty run (as raygossip run --set)")
    parser.add_argument("--out", type=Path, default=None, help="write both runs' folders and soak.json here")
    parser.add_argument("--skip-clean", action="store_true", help="only the faulty run")
    args = parser.parse_args(argv)
    faulty, clean = soak_config("quick" if args.quick else "full", args.seed)
    faulty = apply_overrides(faulty, args.set)
    runs = [("chaos", faulty)] + ([] if args.skip_clean else [("no faults", clean)])
    rows = []
    for name, data in runs:
        config = load_config(base=data)
        began = time.perf_counter()
        result = run(config, None if args.out is None else args.out / name.replace(" ", "_"), progress=False)
        summary = dict(result.summary)
        summary.setdefault("wall_time_s", time.perf_counter() - began)
        rows.append(row(name, summary))
        print(table(rows[-1:]), flush=True)
    print()
    print(table(rows))
    if args.out is not None:
        (args.out / "soak.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
