"""Memory, start-up and time per round of the Ray engine against agent count and agents per actor.

    python bench/scale.py [--agents 16 64 128 256] [--per-actor 1 8 32] [--model lenet5] [--data mnist]
                          [--steps 20] [--reference]

Each point runs in a fresh process with its own local Ray; this process samples, every 0.2 s, the
proportional set size (PSS: shared pages split among the processes that map them) summed over that
process and all its descendants (Ray's GCS, raylet, workers, the agent actors), and reports the peak.
Other work on the machine does not count in it. Sync
mode, D-PSGD every step on a ring, evaluation only at the end, final merge off. --reference also runs the
reference engine on the same config, for the train time per round. Points that need more memory than the
machine has are skipped and said so (k = 1 costs about 330 MB an agent).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def tree_pss_bytes(root: int) -> int:
    """PSS of process `root` and all its descendants (Linux /proc)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, ppid in parent.items() if ppid in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    total = 0
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def total_memory_bytes() -> int:
    return int(Path("/proc/meminfo").read_text().split()[1]) * 1024


def config_of(args: argparse.Namespace, agents: int, per_actor: int, engine: str) -> dict:
    model = {"name": args.model, **({"hidden": [64]} if args.model == "mlp" else {})}
    data = {"name": args.data, "partition": {"kind": "iid"}}
    if args.data != "digits":
        data["root"] = str(args.data_root)
    return {
        "name": "bench-scale", "seed": 0, "data": data, "model": model, "agents": {"count": agents},
        "topology": {"name": "ring"},
        "train": {"epochs": 1, "steps_per_epoch": args.steps, "batch_size": args.batch_size, "lr": 0.05,
                  "momentum": 0.9},
        "gossip": {"rule": "dpsgd"},
        "schedule": {"averaging_rate": {"kind": "constant", "gamma0": 1.0}, "communication": {"kind": "every"},
                     "final_merge": {"enabled": False}},
        "eval": {"every": 0, "local": False, "test_samples": 1000},
        "runtime": {"engine": engine, "mode": "sync", "progress": False, "wait_timeout_s": 300.0,
                    "agents_per_actor": per_actor, "on_failure": "abort"},
    }


def one_point(spec: dict) -> dict:
    """Run one config in this process; return its timings."""
    from raygossip.config import Config
    from raygossip.config_io import from_dict
    from raygossip.validation import validate
    from raygossip.engines.common import prepare

    config = from_dict(Config, spec)
    validate(config)
    setup = prepare(config)
    began = time.perf_counter()
    if config.runtime.engine == "reference":
        from raygossip.engines.reference import ReferenceEngine

        engine = ReferenceEngine(config, setup)
        startup = time.perf_counter() - began
        began = time.perf_counter()
        engine.run(progress=False)
        return {"startup_s": startup, "train_s": time.perf_counter() - began, "rounds": setup.plan.total_rounds}
    import ray

    from raygossip.engines.ray_engine import RayEngine

    engine = RayEngine(config, setup)
    startup = time.perf_counter() - began
    try:
        outcome = engine.run(progress=False)
        return {"startup_s": startup, "train_s": outcome["extra"]["train_s"], "rounds": setup.plan.total_rounds,
                "actors": outcome["extra"]["placement"]["actors"],
                "share_inside_actors": outcome["extra"]["placement"]["share_inside_actors"],
                "steps": sorted(set(outcome["extra"]["steps_per_agent"]))}
    finally:
        engine.close()
        ray.shutdown()


def measure(spec: dict, timeout_s: float) -> dict:
    """One point in a child process, with the peak PSS of its process tree."""
    began = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--one", json.dumps(spec)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], tree_pss_bytes(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = child.communicate(timeout=timeout_s)
    finally:
        done.set()
        sampler.join()
    wall = time.perf_counter() - began
    if child.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}"}
    result = json.loads(out.strip().splitlines()[-1])
    result.update(memory_gb=peak[0] / 1e9, wall_s=wall)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--agents", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--per-actor", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--steps", type=int, default=20, help="local steps per agent (one round each)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reference", action="store_true", help="also time the reference engine per point")
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="a PNG of memory and start-up against agents, per k")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_point(json.loads(args.one))))
        return 0
    rows = []
    print(f"{args.model} on {args.data}, ring, D-PSGD every step, sync, {args.steps} rounds, batch {args.batch_size}; "
          f"{os.cpu_count()} cores, {total_memory_bytes() / 2**30:.0f} GiB")
    print(f"{'agents':>6} {'k':>4} {'actors':>6} {'inside':>6} {'start-up s':>10} {'train s':>8} {'ms/round':>9} "
          f"{'memory GB':>9} {'reference ms/round':>18}")
    for agents in args.agents:
        reference = None
        if args.reference:
            reference = measure(config_of(args, agents, 1, "reference"), args.timeout_s)
        for k in args.per_actor:
            if k > agents:
                continue
            actors = -(-agents // k)
            if actors * 0.4e9 > total_memory_bytes() * 0.8:
                print(f"{agents:>6} {k:>4} {actors:>6}  skipped: {actors} actor processes need about "
                      f"{actors * 0.33:.0f} GB")
                continue
            point = measure(config_of(args, agents, k, "ray"), args.timeout_s)
            row = {"agents": agents, "k": k, **point}
            if reference is not None and "error" not in reference:
                row["reference_ms_per_round"] = 1e3 * reference["train_s"] / reference["rounds"]
            rows.append(row)
            if "error" in point:
                print(f"{agents:>6} {k:>4} {actors:>6}  failed: {point['error']}")
                continue
            ref = f"{row['reference_ms_per_round']:>18.1f}" if "reference_ms_per_round" in row else f"{'':>18}"
            print(f"{agents:>6} {k:>4} {point['actors']:>6} {point['share_inside_actors']:>6.2f} "
                  f"{point['startup_s']:>10.1f} {point['train_s']:>8.1f} {1e3 * point['train_s'] / point['rounds']:>9.1f} "
                  f"{point['memory_gb']:>9.2f} {ref}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    if args.plot is not None:
        plot(rows, args.plot, f"{args.model} on {args.data}, {args.steps} rounds")
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for k in sorted({r["k"] for r in rows}):
        done = [r for r in rows if r["k"] == k and "error" not in r]
        if not done:
            continue
        agents = [r["agents"] for r in done]
        axes[0].plot(agents, [r["memory_gb"] for r in done], marker="o", label=f"k = {k}")
        axes[1].plot(agents, [r["startup_s"] for r in done], marker="o", label=f"k = {k}")
        axes[2].plot(agents, [1e3 * r["train_s"] / r["rounds"] for r in done], marker="o", label=f"k = {k}")
    reference = sorted({(r["agents"], r["reference_ms_per_round"]) for r in rows if "reference_ms_per_round" in r})
    if reference:
        axes[2].plot(*zip(*reference), marker="s", color="black", linestyle="--", label="reference engine")
    for axis, label in zip(axes, ("memory (GB, PSS of the run's processes)", "start-up (s)", "train ms per round")):
        axis.set_xlabel("agents")
        axis.set_ylabel(label)
        axis.set_xscale("log", base=2)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(f"Ray engine against agent count, k agents per actor ({title})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    sys.exit(main())
