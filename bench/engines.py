"""Run one config on the reference engine and on the Ray engine in one process and compare their speed.

    python bench/engines.py [--agents 8] [--model lenet5] [--data mnist] [--epochs 1] [--steps N] [--repeat R]
                            [--agents-per-actor K] [--batched-steps]

Sync mode, D-PSGD every step on a ring, final merge off and one small evaluation at the end, so the
training seconds are (almost) all local steps and gossip. Start-up (data, agents, Ray, actors) is
timed separately. Prints start-up and training seconds, samples/s, the ray/reference ratio (training
only), the per-round time of each engine and, for the Ray engine, where an agent's round goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind Ray to loopback (before ray.init)

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


def bench_config(args: argparse.Namespace) -> dict:
    """The benchmark's config as a plain mapping (YAML shape)."""
    model: dict = {"name": args.model}
    if args.model == "mlp":
        model["hidden"] = [64]
    data = {"name": args.data, "partition": {"kind": "iid"}}
    if args.data != "digits":
        data["root"] = str(args.data_root)
    train = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 0.05, "momentum": 0.9}
    if args.steps is not None:
        train["steps_per_epoch"] = args.steps
    runtime = {"engine": "ray", "mode": "sync", "progress": False, "wait_timeout_s": 120.0}
    if args.num_cpus is not None:
        runtime["num_cpus"] = args.num_cpus
    if args.cpus_per_agent is not None:
        runtime["num_cpus_per_agent"] = args.cpus_per_agent
    if args.on_failure is not None:
        runtime["on_failure"] = args.on_failure
    if args.snapshot_every is not None:
        runtime["snapshot_every"] = args.snapshot_every
    runtime["transport"] = args.transport
    runtime["agents_per_actor"] = args.agents_per_actor
    runtime["batched_steps"] = args.batched_steps
    return {
        "name": "bench-engines",
        "seed": 0,
        "data": data,
        "model": model,
        "agents": {"count": args.agents},
        "topology": {"name": "ring", "weights": "uniform"},
        "train": train,
        "gossip": {"rule": "dpsgd"},
        "schedule": {"averaging_rate": {"kind": "constant", "gamma0": 1.0},
                     "communication": {"kind": "every"}, "final_merge": {"enabled": False}},
        "eval": {"every": 0, "local": False, "test_samples": args.test_samples},
        "runtime": runtime,
    }


def descendants_cpu_s() -> float:
    """CPU seconds used so far by this process's descendants still alive (the local Ray's GCS, raylet, agents
    and workers, when this process started Ray); Linux /proc only, else 0."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    parent, used = {}, {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parent[entry.name] = fields[1]
        used[entry.name] = (int(fields[11]) + int(fields[12])) / tick
    me, total = str(os.getpid()), 0.0
    for pid in parent:
        ancestor = parent.get(pid)
        while ancestor and ancestor not in (me, "0", "1"):
            ancestor = parent.get(ancestor)
        if ancestor == me:
            total += used[pid]
    return total


def run_reference(config, setup, threads: int | None) -> dict:
    """The reference engine with runtime.torch_threads `threads` (None: the config's, i.e. what a Ray agent gets);
    torch's thread count is put back afterwards."""
    import dataclasses

    import torch

    default = torch.get_num_threads()
    if threads:
        config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, torch_threads=threads))
    try:
        return _run_reference(config, setup)
    finally:
        torch.set_num_threads(default)


def _run_reference(config, setup) -> dict:
    import torch

    from raygossip.engines.reference import ReferenceEngine

    began = time.perf_counter()
    engine = ReferenceEngine(config, setup)
    startup = time.perf_counter() - began
    began, cpu = time.perf_counter(), time.process_time()
    outcome = engine.run(progress=False)
    train = time.perf_counter() - began
    return {"startup_s": startup, "train_s": train, "cpu_s": time.process_time() - cpu, "threads": torch.get_num_threads(),
            "vectors": engine.agent_vectors(), "accuracy": outcome["last"]["merged_test_accuracy"]}


def run_ray(config, setup) -> dict:
    import ray

    from raygossip.engines.ray_engine import RayEngine, ensure_ray

    began = time.perf_counter()
    started = ensure_ray(config)
    init = time.perf_counter() - began
    engine = None
    try:
        began = time.perf_counter()
        engine = RayEngine(config, setup)
        startup = time.perf_counter() - began
        began, cpu, driver_cpu = time.perf_counter(), descendants_cpu_s(), time.process_time()
        outcome = engine.run(progress=False)
        train = time.perf_counter() - began
        cpu = descendants_cpu_s() - cpu + time.process_time() - driver_cpu  # all of Ray's CPU if we started it
        extra = outcome["extra"]
        return {"init_s": init, "startup_s": startup, "train_s": train, "cpu_s": cpu,
                "engine_train_s": extra.get("train_s", train),
                "threads": [p.get("threads") for p in engine.placement], "vectors": engine.agent_vectors(),
                "accuracy": outcome["last"]["merged_test_accuracy"], "waited_s": extra.get("waited_s_per_agent"),
                "phases": extra.get("phase_s_per_agent"), "startup_phases": extra.get("startup_phases"),
                "cpu": extra.get("cpu_s_per_agent"), "transport": extra.get("transport")}
    finally:
        if engine is not None:
            engine.close()
        if started:
            ray.shutdown()


def max_difference(a: list, b: list) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--data-root", type=Path, default=DATA_ROOT)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None, help="local steps per epoch (default: one pass over the data)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--test-samples", type=int, default=1000, help="test samples of the one final evaluation")
    parser.add_argument("--num-cpus", type=int, default=None, help="runtime.num_cpus (default: all cores)")
    parser.add_argument("--cpus-per-agent", type=float, default=None, help="runtime.num_cpus_per_agent")
    parser.add_argument("--on-failure", default=None, choices=("restart", "drop", "abort"),
                        help="runtime.on_failure of the Ray run (default: the config default, restart)")
    parser.add_argument("--snapshot-every", type=int, default=None,
                        help="runtime.snapshot_every of the Ray run (default: the config default)")
    parser.add_argument("--transport", default="auto", choices=("auto", "calls"),
                        help="runtime.transport of the Ray run (auto: shared-memory channels on one node)")
    parser.add_argument("--agents-per-actor", type=int, default=1, help="runtime.agents_per_actor of the Ray run")
    parser.add_argument("--batched-steps", action="store_true",
                        help="runtime.batched_steps (both engines: an actor's agents step as one call)")
    parser.add_argument("--reference-threads", type=int, default=None,
                        help="runtime.torch_threads of the reference run (default: what a Ray agent gets, 1 here)")
    parser.add_argument("--repeat", type=int, default=1, help="run the pair R times, report medians")
    parser.add_argument("--engines", default="reference,ray", help="comma-separated subset, in run order")
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement to this file")
    args = parser.parse_args(argv)

    from raygossip.config import Config
    from raygossip.config_io import from_dict
    from raygossip.validation import validate
    from raygossip.engines.common import prepare

    config = from_dict(Config, bench_config(args))
    validate(config)
    began = time.perf_counter()
    setup = prepare(config)
    prepare_s = time.perf_counter() - began
    plan = setup.plan
    rounds = plan.total_rounds
    samples = plan.total_steps * config.train.batch_size * config.agents.count
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    print(f"reference engine torch threads: {args.reference_threads or 'as a Ray agent (runtime.torch_threads)'}")
    print(f"config: {config.agents.count} agents, {config.model.name} on {config.data.name}, ring, dpsgd every step, "
          f"sync, Ray transport {args.transport}, {args.agents_per_actor} agents per actor{', batched steps' if args.batched_steps else ''}; {plan.total_steps} steps x batch {config.train.batch_size} = {samples} samples, {rounds} rounds; "
          f"{os.cpu_count()} cores; data prepared in {prepare_s:.2f} s")
    results: dict[str, list[dict]] = {name: [] for name in engines}
    for repeat in range(args.repeat):
        for name in engines:
            gc.collect()
            load_before = os.getloadavg()[0]
            result = run_reference(config, setup, args.reference_threads) if name == "reference" else run_ray(config, setup)
            result["load_1min"] = (load_before + os.getloadavg()[0]) / 2  # a shared machine's load moves every figure
            results[name].append(result)
            shown = {k: round(v, 3) for k, v in result.items() if isinstance(v, float)}
            print(f"  [{repeat + 1}/{args.repeat}] {name}: {shown}", flush=True)
        if "reference" in results and "ray" in results:
            diff = max_difference(results["reference"][-1]["vectors"], results["ray"][-1]["vectors"])
            print(f"  [{repeat + 1}/{args.repeat}] max |x_ray - x_reference| = {diff:.2e}")

    summary: dict = {"agents": config.agents.count, "model": config.model.name, "data": config.data.name,
                     "steps": plan.total_steps, "rounds": rounds, "samples": samples, "cores": os.cpu_count(),
                     "prepare_s": prepare_s, "repeat": args.repeat, "command": " ".join(sys.argv)}
    print(f"\n{'engine':<10} {'start-up s':>11} {'train s':>9} {'samples/s':>10} {'ms/round':>9} {'CPU ms/round':>13}"
          f" {'load':>5}   (medians of {args.repeat}; load: 1-min load average, mean of before and after)")
    for name, runs in results.items():
        startup = median([r["startup_s"] + r.get("init_s", 0.0) for r in runs])
        train = median([r["train_s"] for r in runs])
        cpu = median([r["cpu_s"] for r in runs])
        load = median([r["load_1min"] for r in runs])
        summary[name] = {"startup_s": startup, "train_s": train, "samples_per_s": samples / train,
                         "ms_per_round": 1e3 * train / max(1, rounds), "cpu_ms_per_round": 1e3 * cpu / max(1, rounds),
                         "load_1min": load,
                         "runs": [{k: v for k, v in r.items() if k != "vectors"} for r in runs]}
        print(f"{name:<10} {startup:>11.2f} {train:>9.2f} {samples / train:>10.0f} {1e3 * train / max(1, rounds):>9.2f}"
              f" {1e3 * cpu / max(1, rounds):>13.2f} {load:>5.1f}")
    if "ray" in results:
        runs = results["ray"]
        print(f"ray start-up: ray.init {median([r['init_s'] for r in runs]):.2f} s (0 when already connected), "
              f"actors {median([r['startup_s'] for r in runs]):.2f} s")
        stages = [r["startup_phases"] for r in runs if r.get("startup_phases")]
        if stages:
            print("ray actor start-up, seconds since it began: " + ", ".join(
                f"{k.removesuffix('_s')} {median([st[k] for st in stages]):.2f}" for k in stages[-1]))
        phases = [r["phases"] for r in runs if r.get("phases")]
        if phases:
            names = list(phases[-1][0])
            per_round = {p: median([statistics.fmean(a[p] for a in run) for run in phases]) * 1e3 / max(1, rounds)
                         for p in names}
            summary["ray"]["agent_ms_per_round"] = per_round
            print("ray agent wall time per round (ms, mean over agents): "
                  + ", ".join(f"{p} {v:.2f}" for p, v in per_round.items()))
        cpus = [r["cpu"] for r in runs if r.get("cpu")]
        if cpus:
            names = list(cpus[-1][0])
            per_round = {p: median([statistics.fmean(a[p] for a in run) for run in cpus]) * 1e3 / max(1, rounds)
                         for p in names}
            summary["ray"]["agent_cpu_ms_per_round"] = per_round
            print("ray agent CPU per round (ms, mean over agents): "
                  + ", ".join(f"{p} {v:.2f}" for p, v in per_round.items() if p not in ("loop", "process")))
            print(f"  training thread {per_round['loop']:.2f}, whole agent process {per_round['process']:.2f}: "
                  f"Ray and messaging cost {per_round['process'] - per_round['train']:.2f} ms per agent per round")
    if "reference" in results and "ray" in results:
        ratio = summary["ray"]["train_s"] / summary["reference"]["train_s"]
        overhead = (summary["ray"]["train_s"] - summary["reference"]["train_s"]) * 1e3 / max(1, rounds)
        paired = [b["train_s"] / a["train_s"] for a, b in zip(results["reference"], results["ray"])]
        summary.update(ratio_ray_over_reference=ratio, paired_ratios=paired, ray_overhead_ms_per_round=overhead)
        print(f"ratio ray/reference (training only): {ratio:.3f}   ray - reference per round: {overhead:+.2f} ms")
        print("  per-run ratios (each Ray run against the reference run just before it): "
              + ", ".join(f"{r:.3f}" for r in paired) + f"; median {median(paired):.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
