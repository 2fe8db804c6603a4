"""Claim (b), top-k 10%: the sweeps of raygossip sweep, run trial by trial in this one process (reference engine, one
torch thread, no Ray Tune: its worker runs at nice 15 on a machine shared by five), folders and trials.json/md as
`raygossip sweep --reject-diverging --metric mean_local_validation_accuracy` writes them."""
import json, shutil, sys, time
from pathlib import Path
from raygossip.api import run
from raygossip.config import Config
from raygossip.config_io import apply_overrides, read_yaml, dump_yaml, from_dict, to_dict
from raygossip import sweep as sw
from raygossip.results import write_json_atomic, write_text_atomic

OUT = Path(sys.argv[1])
EPOCHS = int(sys.argv[2])
PARTS = sys.argv[3].split(",")
METRIC, FACTOR, SEEDS = "mean_local_validation_accuracy", 2.0, [0, 1]
GRID = {"gossip.rule": ["choco", "adagossip"],
        "gossip.gamma@gossip.rule=choco": [0.02, 0.05, 0.1, 0.2, 0.5],
        "gossip.gamma@gossip.rule=adagossip": [0.001, 0.002, 0.005, 0.01, 0.02]}
PART = {"iid": "{kind: iid}", "alpha0.1": "{kind: dirichlet_lin, alpha: 0.1}"}


def one(config, folder):
    if (folder / "summary.json").is_file():
        return
    if folder.exists():
        shutil.rmtree(folder)
    t = time.time()
    run(config, out_dir=folder, progress=False)
    print(f"{time.strftime('%H:%M:%S')} {folder.name} {time.time() - t:.0f}s", flush=True)


for part in PARTS:
    base = apply_overrides(read_yaml("configs/cpu/adagossip_mnist_mlp.yaml"), [
        "gossip.compressor.ratio=0.1", f"data.partition={PART[part]}", f"train.epochs={EPOCHS}",
        "runtime.torch_threads=1", "runtime.progress=false"])
    out = OUT / part
    configs, metric, mode = sw.check_sweep(base, GRID, SEEDS, METRIC, None, "fifo")
    points = sw.grid_points(GRID)
    specs = [{"name": sw._folder_name(p, s_, seed), "point": p, "settings": s_, "seed": seed,
              "config": sw._portable(configs[p][k]), "run_dir": str(out / sw._folder_name(p, s_, seed))}
             for p, s_ in enumerate(points) for k, seed in enumerate(SEEDS)]
    for spec in specs:
        one(from_dict(Config, spec["config"]), Path(spec["run_dir"]))
    rows = sw.collect(out, specs, metric, {spec["name"]: "finished" for spec in specs}, FACTOR)
    ranked = sw.rank(rows, points, metric, mode)
    write_json_atomic(out / "trials.json", {"metric": metric, "mode": mode, "scheduler": "fifo", "seeds": SEEDS,
                                            "grid": GRID, "reject_diverging": FACTOR, "best": ranked[0],
                                            "points": ranked, "trials": rows})
    write_text_atomic(out / "trials.md", sw.trials_markdown(ranked, rows, metric, mode, "fifo"))
    for rule in ("choco", "adagossip"):  # the pick per rule: best non-rejected point, then seed 2 there
        pick = next(p for p in ranked if p["settings"]["gossip.rule"] == rule and not p["rejected"] and p["finished"])
        config = from_dict(Config, {**specs[2 * pick["point"]]["config"], "seed": 2})
        print(f"{part} {rule}: pick {pick['label']} {pick['mean']:.4f}", flush=True)
        one(config, out / f"pick-{rule}-s2")
print("done", flush=True)
