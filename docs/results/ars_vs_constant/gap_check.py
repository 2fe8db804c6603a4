"""Claim (a), first step: does a constant averaging rate leave a gap to parallel SGD on LeNet-5, MNIST, Dirichlet
alpha 0.01, 16 agents? D-PSGD on the ring (constant gamma) against the complete graph with uniform weights
(exact averaging after every step, which is parallel SGD with momentum). One seed each, reference engine,
one run at a time. Usage: gap_check.py OUT EPOCHS LR VARIANT[,VARIANT...]; variants: ring1, ring0.5, complete."""
import sys, time
from pathlib import Path
from raygossip.api import run
from raygossip.config import Config
from raygossip.config_io import apply_overrides, read_yaml, from_dict

OUT, EPOCHS, LR = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
VARIANTS = {"ring1": ["topology.name=ring", "schedule.averaging_rate={kind: constant, gamma0: 1.0}"],
            "ring0.5": ["topology.name=ring", "schedule.averaging_rate={kind: constant, gamma0: 0.5}"],
            "complete": ["topology.name=complete", "schedule.averaging_rate={kind: constant, gamma0: 1.0}"]}
for name in sys.argv[4].split(","):
    folder = OUT / f"{name}-lr{LR:g}-e{EPOCHS}"
    if (folder / "summary.json").is_file():
        continue
    data = read_yaml("configs/cpu/ars_mnist_mlp.yaml")
    data["model"] = {"name": "lenet5"}
    config = from_dict(Config, apply_overrides(data, VARIANTS[name] + [
        f"train.epochs={EPOCHS}", f"train.lr={LR}", "eval.every=1", "runtime.torch_threads=1", "runtime.progress=false"]))
    t = time.time()
    result = run(config, out_dir=folder, progress=False)
    print(f"{time.strftime('%H:%M:%S')} {folder.name} {time.time() - t:.0f}s", flush=True)
