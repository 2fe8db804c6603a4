"""Claim (b): the per-rule sweeps of raygossip sweep, run trial by trial in this one process (reference engine, one
torch thread, no Ray Tune: its worker runs at nice 15 on a shared machine), folders and trials.json/md as
`raygossip sweep --reject-diverging 2 --metric mean_local_validation_accuracy` writes them; then seed 2 at each
rule's pick. Usage: run_trials.py OUT EPOCHS PARTS [--compressor YAML] [--choco G,..] [--adagossip G,..]."""
import argparse, shutil, time
from pathlib import Path
from raygossip.api import run
from raygossip.config import Config
from raygossip.config_io import apply_overrides, read_yaml, from_dict
from raygossip import sweep as sw
from raygossip.sweep_grid import folder_name, grid_points
from raygossip.results import write_json_atomic, write_text_atomic

PART = {"iid": "{kind: iid}", "alpha0.1": "{kind: dirichlet_lin, alpha: 0.1}"}
METRIC, FACTOR, SEEDS = "mean_local_validation_accuracy", 2.0, [0, 1]


def gammas(text):
    return sorted(float(g) for g in text.split(","))


parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("epochs", type=int)
parser.add_argument("parts", help=f"comma-separated, of {', '.join(PART)}")
parser.add_argument("--compressor", default="{name: top_k, ratio: 0.1, scope: tensor}", help="gossip.compressor")
parser.add_argument("--choco", type=gammas, default=gammas("0.02,0.05,0.1,0.2,0.5"), help="CHOCO-SGD's gammas")
parser.add_argument("--adagossip", type=gammas, default=gammas("0.001,0.002,0.005,0.01,0.02"),
                    help="AdaGossip's gammas")
args = parser.parse_args()
GRID = {"gossip.rule": ["choco", "adagossip"], "gossip.gamma@gossip.rule=choco": args.choco,
        "gossip.gamma@gossip.rule=adagossip": args.adagossip}


def one(config, folder):
    """Run one trial into `folder`, unless it finished there, or under another point number (a widened grid)."""
    if (folder / "summary.json").is_file():
        return
    same = [f for f in folder.parent.glob("p[0-9][0-9]-" + folder.name.split("-", 1)[1])
            if (f / "summary.json").is_file()] if folder.name[1:3].isdigit() else []
    if folder.exists():
        shutil.rmtree(folder)
    if same:
        same[0].rename(folder)
        return
    t = time.time()
    run(config, out_dir=folder, progress=False)
    print(f"{time.strftime('%H:%M:%S')} {folder.name} {time.time() - t:.0f}s", flush=True)


for part in args.parts.split(","):
    base = apply_overrides(read_yaml("configs/cpu/adagossip_mnist_mlp.yaml"), [
        f"gossip.compressor={args.compressor}", f"data.partition={PART[part]}", f"train.epochs={args.epochs}",
        "runtime.torch_threads=1", "runtime.progress=false"])
    out = args.out / part
    configs, metric, mode = sw.check_sweep(base, GRID, SEEDS, METRIC, None, "fifo")
    points = grid_points(GRID)
    specs = [{"name": folder_name(p, s_, seed), "point": p, "settings": s_, "seed": seed,
              "config": sw._portable(configs[p][k]), "run_dir": str(out / folder_name(p, s_, seed))}
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
        grid = GRID[f"gossip.gamma@gossip.rule={rule}"]
        edge = " (AT THE GRID'S EDGE)" if pick["settings"]["gossip.gamma"] in (grid[0], grid[-1]) else ""
        print(f"{part} {rule}: pick {pick['label']} {pick['mean']:.4f}{edge}", flush=True)
        config = from_dict(Config, {**specs[len(SEEDS) * pick["point"]]["config"], "seed": 2})
        folder = out / f"pick-{rule}-s2"
        if folder.exists() and (folder / "config.yaml").is_file() and \
                read_yaml(folder / "config.yaml")["gossip"]["gamma"] != pick["settings"]["gossip.gamma"]:
            shutil.rmtree(folder)  # a widened grid moved the pick
        one(config, folder)
print("done", flush=True)
