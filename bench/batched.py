"""Samples/s of k agents' local steps: one by one, batched (core/batched.py), and one model at k x the batch."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from raygossip.validation import load_config
from raygossip.core.agent import AgentCore
from raygossip.core.batched import BatchedSteps
from raygossip.data import load_dataset, partition

DATA_ROOT = str(Path(__file__).resolve().parents[2] / "shared" / "data")
WORKLOADS = {  # name: (dataset, model section, per-agent batch)
    "lenet5-mnist": ("mnist", {"name": "lenet5"}, 32),
    "mlp-digits": ("digits", {"name": "mlp", "hidden": [64]}, 16),
}


def cores(dataset, data_name: str, model: dict, k: int, batch: int, steps: int, build: int | None = None) -> list[AgentCore]:
    """The first `build` (default all) of k agents of one config (IID shards, SGD with momentum as the quickstart)."""
    config = load_config(base={"seed": 0, "data": {"name": data_name, "partition": {"kind": "iid"}}, "model": model,
                               "agents": {"count": k}, "train": {"batch_size": batch, "lr": 0.05, "momentum": 0.9}})
    shards = partition("iid", dataset.train.y.numpy(), k, 0, {})
    return [AgentCore(i, config, dataset, shards[i], steps) for i in range(k if build is None else build)]


def timed(step, steps: int, clock=time.perf_counter) -> float:
    """Seconds per call of step() over `steps` calls, by `clock` (wall, or this thread's CPU time)."""
    began = clock()
    for _ in range(steps):
        step()
    return (clock() - began) / steps


def channels_last_step(core: AgentCore) -> None:
    """AgentCore.train_step with its minibatch in channels-last order (the layout the batched convolutions use)."""
    x, y = core.next_batch()
    loss = F.cross_entropy(core.model(x.contiguous(memory_format=torch.channels_last)), y)
    core.flat.zero_grad()
    loss.backward()
    core.optimizer.step()


def measure(workload: str, k: int, steps: int, warmup: int, repeat: int, clock) -> dict:
    data_name, model, batch = WORKLOADS[workload]
    dataset = load_dataset(data_name, DATA_ROOT, False)
    total = (steps + warmup) * repeat + 1
    one_by_one = cores(dataset, data_name, model, k, batch, total)
    batched = BatchedSteps(cores(dataset, data_name, model, k, batch, total))
    assert batched.reason is None, batched.reason
    (big,) = cores(dataset, data_name, model, k, k * batch, total, build=1)
    big.shard = torch.arange(len(dataset.train.y))
    modes = {"one_by_one": lambda: [c.train_step() for c in one_by_one], "batched": batched.step,
             "physical": big.train_step}
    if len(dataset.input_shape) == 3:
        modes["physical_cl"] = lambda: channels_last_step(big)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(repeat):  # interleaved, so that a change of load hits every mode alike
        for mode, step in modes.items():
            timed(step, warmup)
            seconds[mode].append(timed(step, steps, clock))
    rates = {mode: k * batch / statistics.median(s) for mode, s in seconds.items()}
    return {"workload": workload, "k": k, "batch": batch, **rates,
            "spread": {mode: (k * batch / max(s), k * batch / min(s)) for mode, s in seconds.items()}}


def reference_runs(agents: int, k: int, steps: int, repeat: int) -> None:
    """The reference engine, LeNet-5 on MNIST, D-PSGD on a ring: train time with and without batched_steps."""
    from raygossip.engines.common import prepare
    from raygossip.engines.reference import ReferenceEngine

    def config(batched: bool):
        return load_config(base={
            "seed": 0, "data": {"name": "mnist", "root": DATA_ROOT, "partition": {"kind": "iid"}},
            "model": {"name": "lenet5"}, "agents": {"count": agents}, "topology": {"name": "ring"},
            "train": {"epochs": 1, "steps_per_epoch": steps, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
            "schedule": {"final_merge": {"enabled": False}}, "eval": {"every": 0, "test_samples": 1000, "local": False},
            "runtime": {"engine": "reference", "progress": False, "agents_per_actor": k, "batched_steps": batched}})

    setup = prepare(config(False))
    for _ in range(repeat):
        for batched in (False, True):
            engine = ReferenceEngine(config(batched), setup)
            wall, cpu = time.perf_counter(), time.process_time()
            outcome = engine.run(progress=False)
            print(f"reference engine, {agents} agents, groups of {k}, {steps} steps, batched_steps {batched}: "
                  f"{time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} s CPU, "
                  f"merged accuracy {outcome['merged_accuracy']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--k", default="4,8,16")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="measurements per mode (median shown)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (an agent's, by default)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: samples per second of this thread's CPU time (steadier on a busy machine)")
    parser.add_argument("--reference-agents", type=int, default=0,
                        help="then also a reference-engine run of this many LeNet-5 agents in groups of the last k")
    parser.add_argument("--reference-steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    print(f"torch {torch.__version__}, {args.threads} thread(s), load before {os.getloadavg()[0]:.1f}")
    print("| workload | k | batch/agent | one by one | batched | one model, k x batch | batched / physical | "
          "one by one / physical | one model, channels-last | batched / it |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for workload in args.workloads.split(","):
        for k in (int(v) for v in args.k.split(",")):
            r = measure(workload, k, args.steps, args.warmup, args.repeat, clock)
            print(f"| {workload} | {k} | {r['batch']} | {r['one_by_one']:,.0f} | {r['batched']:,.0f} | "
                  f"{r['physical']:,.0f} | {r['batched'] / r['physical']:.2f} | "
                  f"{r['one_by_one'] / r['physical']:.2f} | " + (
                      f"{r['physical_cl']:,.0f} | {r['batched'] / r['physical_cl']:.2f} |" if "physical_cl" in r
                      else "- | - |"), flush=True)
    print(f"samples/s ({args.clock} clock), medians of {args.repeat} x {args.steps} steps; "
          f"load after {os.getloadavg()[0]:.1f}")
    if args.reference_agents:
        reference_runs(args.reference_agents, int(args.k.split(",")[-1]), args.reference_steps, args.repeat)
        print(f"load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
