"""`raygossip sweep`: a grid of configs x seeds as Ray Tune trials (one run folder each), ranked on seed means."""

from __future__ import annotations

import copy
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ray.tune import Callback

from raygossip.config import Config
from raygossip.config_io import dump_yaml, from_dict, to_dict
from raygossip.validation import validate
from raygossip.errors import UserError
from raygossip.results import mean_std, read_metrics, write_json_atomic, write_text_atomic
from raygossip.sweep_grid import folder_name, grid_points, label, point_data

# Record keys a sweep can rank on, and the direction each improves in.
METRICS = {
    "merged_validation_accuracy": "max", "merged_test_accuracy": "max", "mean_local_test_accuracy": "max",
    "min_local_test_accuracy": "max", "mean_local_validation_accuracy": "max", "min_local_validation_accuracy": "max",
    "train_loss": "min", "consensus_distance": "min", "bytes_sent": "min",
}
SCHEDULERS = ("fifo", "asha")
# What a sweep writes beside its trials' run folders (`raygossip compare OUT/*` skips them); TUNE_DIR: Ray Tune's own.
TUNE_DIR = ".tune"
DIVERGING_PART = 0.25  # --reject-diverging looks at this last fraction of a trial's records
SWEEP_FILES = ("best.yaml", "trials.md", "trials.json", TUNE_DIR)


def task_metrics(config: Config) -> dict[str, str]:
    """METRICS as the trials' eval.metric names its keys (merged_validation_perplexity, ...), with its direction."""
    from raygossip.engines.common import metric_info

    name, direction = metric_info(config)
    return {key.replace("accuracy", name): (direction if "accuracy" in key else way) for key, way in METRICS.items()}


@dataclass
class SweepResult:
    """What a finished sweep returns (and what it wrote under `out_dir`)."""

    best: dict  # settings, score, std, seeds of the best point
    best_config: Config
    points: list[dict]  # every grid point, ranked best first
    trials: list[dict]
    out_dir: Path


# ---------------------------------------------------------------- checks before any Ray process


def check_sweep(base: dict, grid: dict[str, list], seeds: Sequence[int], metric: str | None, mode: str | None,
                scheduler: str) -> tuple[list[list[Config]], str, str]:
    """Build and validate every trial's config; resolve the metric and mode. All errors are one-line UserErrors."""
    if not seeds:
        raise UserError("--seeds", "needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UserError("--seeds", f"lists a seed twice: {list(seeds)}")
    if scheduler not in SCHEDULERS:
        raise UserError("--scheduler", f"must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}")
    configs = []
    for settings in grid_points(grid):
        row = []
        for seed in seeds:
            try:
                config = from_dict(Config, point_data(base, settings, seed))
                validate(config)
            except UserError as error:
                where = f" (at {label(settings)})" if settings else ""
                raise UserError(error.field, f"{error.message}{where}") from None
            row.append(config)
        configs.append(row)
    flat = [config for row in configs for config in row]
    known = task_metrics(flat[0])
    if metric is None:
        if any(config.eval.validation_fraction == 0 for config in flat):
            raise UserError("--metric", "not given, and eval.validation_fraction is 0, so there is no validation "
                                        "accuracy to rank on: add --set eval.validation_fraction=0.1 (or name a "
                                        "metric, e.g. --metric merged_test_accuracy, which ranks on the test set)")
        metric = next(key for key in known if key.startswith("merged_validation_"))
    if metric not in known:
        raise UserError("--metric", f"must be one of {', '.join(known)}; got {metric!r}")
    if "validation" in metric and any(c.eval.validation_fraction == 0 for c in flat):
        raise UserError("--metric", f"{metric} needs eval.validation_fraction > 0 in every trial")
    if "local" in metric and not all(config.eval.local for config in flat):
        raise UserError("--metric", f"{metric} needs eval.local: true in every trial")
    if scheduler == "asha" and min(config.train.epochs for config in flat) < 2:
        raise UserError("--scheduler", "asha stops trials between epochs, so it needs train.epochs >= 2")
    mode = mode or known[metric]
    if mode not in ("max", "min"):
        raise UserError("--mode", f"must be max or min; got {mode!r}")
    return configs, metric, mode


# ---------------------------------------------------------------- a trial


def trial(params: dict) -> None:
    """One Tune trial: one raygossip run into its own folder, every metrics record reported to Tune."""
    from ray import tune

    from raygossip.api import run

    spec = params["trial"]
    config = from_dict(Config, spec["config"])

    def report(record: dict) -> None:
        tune.report({key: value for key, value in record.items()
                     if isinstance(value, (int, float)) and not isinstance(value, bool)})

    run(config, out_dir=spec["run_dir"], observer=report, progress=False)


def trial_resources(config: Config, cluster_cpus: float) -> tuple[Any, int | None]:
    """(Tune resources of one trial, the most trials at a time, None: as many as Tune can place). A reference
    trial takes the CPUs its torch threads use. A Ray-engine trial reserves its agents' actors through a placement
    group factory: an empty head bundle for the trial's driver and one bundle per actor, exactly the bundles
    RayEngine would ask for, which it then finds as its current placement group and uses instead of its own."""
    from ray import tune

    from raygossip.engines.common import agent_threads
    from raygossip.engines.ray_engine import agent_bundles, cpus_per_agent, with_packing

    config = with_packing(config, cluster_cpus)  # the k the trial's RayEngine will pick on this cluster
    runtime = config.runtime
    if runtime.engine == "reference":
        return {"cpu": min(float(agent_threads(runtime)), cluster_cpus)}, None
    per_agent = cpus_per_agent(config, cluster_cpus)
    need = per_agent * config.agents.count
    if need > cluster_cpus + 1e-9:
        raise UserError("runtime.num_cpus_per_agent", f"{config.agents.count} agents x {per_agent:g} CPU = "
                                                      f"{need:g} CPUs, but the cluster has {cluster_cpus:g}")
    return tune.PlacementGroupFactory([{}, *agent_bundles(config, per_agent)], strategy=runtime.placement), None


# ---------------------------------------------------------------- ranking


def growing_distance(records: list[dict], factor: float, part: float = DIVERGING_PART) -> str | None:
    """Why a trial counts as diverging (None: it does not): its consensus distance is non-finite in some record,
    or its last record's exceeds `factor` x the record's just before the last `part` of the records (at least
    the last two records are compared). The rule of `raygossip sweep --reject-diverging`."""
    distances = [record.get("consensus_distance") for record in records]
    distances = [float("nan") if d is None else float(d) for d in distances]
    bad = [k for k, d in enumerate(distances) if not math.isfinite(d)]
    if bad:
        return f"consensus distance not finite at record {bad[0] + 1} of {len(distances)}"
    if len(distances) < 2:
        return None
    start = max(0, len(distances) - 1 - math.ceil(part * len(distances)))
    first, last = distances[start], distances[-1]
    if last > factor * first:
        return (f"consensus distance grew {first:.4g} -> {last:.4g} (x{last / max(first, 1e-300):.3g} > x{factor:g}) "
                f"from record {start + 1} to {len(distances)} (epochs {records[start].get('epoch', 0):g} -> "
                f"{records[-1].get('epoch', 0):g})")
    return None


def collect(out: Path, specs: list[dict], metric: str, statuses: dict[str, str],
            reject_diverging: float | None = None) -> list[dict]:
    """One row per trial from its run folder; a trial stopped early gets a summary.json of its records so far.
    With `reject_diverging` (a factor) a row's "rejected" says why growing_distance rejects it (else None)."""
    rows = []
    for spec in specs:
        folder = Path(spec["run_dir"])
        records = read_metrics(folder / "metrics.jsonl") if (folder / "metrics.jsonl").exists() else []
        summary_path = folder / "summary.json"
        status = statuses.get(spec["name"], "error")
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            status = summary.get("status", "finished")
        elif records:
            status = "stopped" if status != "error" else "error"
            summary = _stopped_summary(spec, records, status)
            write_json_atomic(summary_path, summary)
        else:
            summary = {}
        last = records[-1] if records else {}
        rows.append({
            "name": spec["name"], "point": spec["point"], "settings": spec["settings"], "seed": spec["seed"],
            "status": status, "epochs_done": last.get("epoch", 0.0), "records": len(records),
            metric: last.get(metric), "merged_test_accuracy": summary.get("merged_test_accuracy"),
            "run_dir": str(folder),
            "rejected": None if reject_diverging is None else
            (growing_distance(records, reject_diverging) if records else "no records"),
        })
    return rows


def _stopped_summary(spec: dict, records: list[dict], status: str) -> dict:
    """summary.json of a trial that Tune stopped (or that failed): its last record's numbers, as compare reads."""
    last = records[-1]
    config = spec["config"]
    keys = ("merged_test_accuracy", "merged_validation_accuracy", "mean_local_test_accuracy",
            "std_local_test_accuracy", "local_test_accuracy", "consensus_distance", "bytes_sent", "messages_sent",
            "communication_rounds", "wall_time_s", "mean_local_validation_accuracy", "std_local_validation_accuracy",
            "min_local_validation_accuracy")
    return {"name": config.get("name", "run"), "engine": config.get("runtime", {}).get("engine", "ray"),
            "status": status, "reason": f"stopped by the sweep's scheduler at epoch {last['epoch']:g}"
            if status == "stopped" else "the trial failed", "records": len(records), "last": last,
            **{key: last.get(key) for key in keys if key in last}}


def rank(rows: list[dict], points: list[dict], metric: str, mode: str) -> list[dict]:
    """Grid points with the mean and std over seeds of each trial's last `metric`, best first. A point with
    trials that ran to the end ranks on those; points whose every trial was stopped early come after them, and a
    point with a rejected trial (row "rejected", --reject-diverging) after all others, its reasons kept."""
    ranked = []
    for index, settings in enumerate(points):
        rejected = [f"seed {row['seed']}: {row['rejected']}" for row in rows
                    if row["point"] == index and row.get("rejected")]
        mine = [row for row in rows if row["point"] == index and row[metric] is not None]
        whole = [row for row in mine if row["status"] == "finished"]
        counted = whole or mine
        mean, std = mean_std([row[metric] for row in counted])
        ranked.append({
            "point": index, "settings": settings, "label": label(settings), "finished": bool(whole),
            "mean": mean, "std": std,
            "seeds": [row["seed"] for row in counted],
            "stopped": sum(row["status"] == "stopped" for row in rows if row["point"] == index),
            "errors": sum(row["status"] not in ("finished", "stopped") for row in rows if row["point"] == index),
            "merged_test_accuracy": mean_std([row["merged_test_accuracy"] for row in counted])[0],
            "rejected": rejected,
        })
    sign = -1.0 if mode == "max" else 1.0
    return sorted(ranked, key=lambda p: (bool(p["rejected"]), p["mean"] is None, not p["finished"],
                                         sign * (p["mean"] or 0.0), p["point"]))


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def trials_markdown(ranked: list[dict], rows: list[dict], metric: str, mode: str, scheduler: str) -> str:
    lines = [f"# Sweep: {len(ranked)} configs x {len({r['seed'] for r in rows})} seeds, ranked on the mean over "
             f"seeds of {metric} ({mode}), scheduler {scheduler}", "",
             "Each trial counts with its last record; a config ranks on its trials that ran to the end (the "
             "seeds column), one whose every trial was stopped early ranks below those.", "",
             f"| rank | config | {metric} | seeds | stopped early | merged test acc. |",
             "| --- | --- | --- | --- | --- | --- |"]
    for place, point in enumerate(ranked, 1):
        score = _fmt(point["mean"]) + (f" ± {point['std']:.4f}" if point["std"] is not None else "")
        lines.append(f"| {place} | {point['label']}{' (rejected)' * bool(point.get('rejected'))} | {score} | "
                     f"{' '.join(map(str, point['seeds']))} | {point['stopped']} | "
                     f"{_fmt(point['merged_test_accuracy'])} |")
    rejected = [(point["label"], reason) for point in ranked for reason in point.get("rejected") or []]
    if rejected:
        lines += ["", "## Rejected as diverging (--reject-diverging: they rank last)", ""]
        lines += [f"- {where}, {reason}" for where, reason in rejected]
    lines += ["", "## Trials", "", f"| trial | seed | status | epochs | {metric} | merged test acc. |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['seed']} | {row['status']} | {row['epochs_done']:g} | "
                     f"{_fmt(row[metric])} | {_fmt(row['merged_test_accuracy'])} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the sweep


def sweep(base: dict | Config, grid: dict[str, list], *, out_dir: str | Path, seeds: Sequence[int] = (0,),
          metric: str | None = None, mode: str | None = None, scheduler: str = "fifo", grace_epochs: int = 1,
          max_concurrent: int | None = None, progress: bool = True,
          reject_diverging: float | None = None) -> SweepResult:
    """Run every grid point with every seed as a Ray Tune trial; write best.yaml, trials.md and trials.json.
    reject_diverging: a factor; a trial whose consensus distance grows by more over its last records
    (growing_distance) is rejected, and its grid point ranks last."""
    base = to_dict(base) if isinstance(base, Config) else copy.deepcopy(base)
    base.setdefault("runtime", {})["progress"] = False
    configs, metric, mode = check_sweep(base, grid, seeds, metric, mode, scheduler)
    if grace_epochs < 1:
        raise UserError("--grace-epochs", f"must be >= 1, got {grace_epochs}")
    if reject_diverging is not None and not (math.isfinite(reject_diverging) and reject_diverging >= 1):
        raise UserError("--reject-diverging", f"must be a factor >= 1 (default 2), got {reject_diverging}")
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError("--out", f"{out} exists and is not empty (a sweep writes a fresh folder)")
    points = grid_points(grid)
    specs = [{"name": folder_name(p, settings, seed), "point": p, "settings": settings, "seed": seed,
              "config": _portable(configs[p][s]), "run_dir": str(out / folder_name(p, settings, seed))}
             for p, settings in enumerate(points) for s, seed in enumerate(seeds)]
    _prepare_points(configs)
    statuses = _run_tune(specs, points, configs[0][0], metric, mode, scheduler, grace_epochs, max_concurrent, out,
                         progress)
    rows = collect(out, specs, metric, statuses, reject_diverging)
    ranked = rank(rows, points, metric, mode)
    best = ranked[0]
    if best["mean"] is None:
        raise UserError("sweep", f"no trial reported {metric}; see the run folders in {out}")
    if best["rejected"]:
        raise UserError("--reject-diverging", f"every config has a diverging trial (e.g. {best['label']}, "
                                              f"{best['rejected'][0]}); see {out}")
    best_config = configs[best["point"]][0]
    best_config = from_dict(Config, {**to_dict(best_config), "seed": base.get("seed", 0)})
    header = (f"# raygossip sweep: best of {len(points)} configs on {metric} ({mode}), mean over seeds "
              f"{' '.join(map(str, best['seeds']))}: {best['mean']:.4f}\n# {best['label']}\n")
    write_text_atomic(out / "best.yaml", header + dump_yaml(best_config))
    write_json_atomic(out / "trials.json", {"metric": metric, "mode": mode, "scheduler": scheduler,
                                            "seeds": list(seeds), "grid": grid, "reject_diverging": reject_diverging, "best": best, "points": ranked,
                                            "trials": rows})
    write_text_atomic(out / "trials.md", trials_markdown(ranked, rows, metric, mode, scheduler))
    return SweepResult(best=best, best_config=best_config, points=ranked, trials=rows, out_dir=out)


def _portable(config: Config) -> dict:
    """The trial's config mapping with data.root absolute: Tune runs each trial in a folder of its own."""
    data = to_dict(config)
    data["data"]["root"] = str(Path(data["data"]["root"]).expanduser().resolve())
    return data


def _prepare_points(configs: list[list[Config]]) -> None:
    """Load data and build one agent for each grid point (first seed): its errors surface before Ray starts."""
    from raygossip.engines.common import prepare

    for row in configs:
        prepare(row[0])


def _run_tune(specs: list[dict], points: list[dict], first: Config, metric: str, mode: str, scheduler: str,
              grace_epochs: int, max_concurrent: int | None, out: Path, progress: bool) -> dict[str, str]:
    """Run the trials on Ray Tune; {trial name: "finished" | "stopped" | "error"} as Tune saw them."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from raygossip.engines.cluster import ensure_ray

    started = ensure_ray(first)
    try:
        resources, fits = trial_resources(first, ray.cluster_resources().get("CPU", 1.0))
        chosen = FIFOScheduler()
        if scheduler == "asha":  # rungs before the last epoch only: a trial that gets there ends as a whole run
            last_rung = min(spec["config"]["train"]["epochs"] for spec in specs) - 1
            chosen = ASHAScheduler(time_attr="epoch", max_t=last_rung, grace_period=min(grace_epochs, last_rung),
                                   reduction_factor=2, stop_last_trials=False)
        watcher = Progress(len(specs), points, metric, mode, progress)
        order = list(specs)
        if scheduler == "asha":  # ASHA judges a trial against those that reached its rung before it: in grid order
            random.Random(first.seed).shuffle(order)  # the first values of one key would all pass unjudged
        tuner = tune.Tuner(
            tune.with_resources(trial, resources),
            param_space={"trial": tune.grid_search(order)},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=chosen,
                                        max_concurrent_trials=max_concurrent or fits,
                                        reuse_actors=first.runtime.engine == "reference",
                                        trial_dirname_creator=lambda t: t.config["trial"]["name"]),
            run_config=tune.RunConfig(name="tune", storage_path=str(out / TUNE_DIR), verbose=0,
                                      callbacks=[watcher], failure_config=tune.FailureConfig(max_failures=0)),
        )
        tuner.fit()
        return watcher.statuses
    finally:
        if started:
            ray.shutdown()


class Progress(Callback):
    """A Tune callback that prints, as each trial ends, how many are done and the best config so far."""

    def __init__(self, total: int, points: list[dict], metric: str, mode: str, show: bool) -> None:
        self.total, self.points, self.metric, self.mode, self.show = total, points, metric, mode, show
        self.statuses: dict[str, str] = {}
        self.rows: list[dict] = []

    def _ended(self, trial, status: str) -> None:
        spec = trial.config["trial"]
        result = trial.last_result or {}
        if status == "finished" and result.get("epoch", 0) < spec["config"]["train"]["epochs"]:
            status = "stopped"
        self.statuses[spec["name"]] = status
        self.rows.append({"point": spec["point"], "seed": spec["seed"], "status": status,
                          self.metric: result.get(self.metric), "merged_test_accuracy": None})
        if self.show:
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        counts = [list(self.statuses.values()).count(s) for s in ("stopped", "error")]
        extras = [f"{n} {what}" for n, what in zip(counts, ("stopped early", "failed")) if n]
        text = f"sweep: {len(self.statuses)}/{self.total} trials done" + (f" ({', '.join(extras)})" if extras else "")
        best = rank(self.rows, self.points, self.metric, self.mode)[0]
        if best["mean"] is not None:
            seeds = len(best["seeds"])
            text += f"; best so far {best['label']}: {self.metric} {best['mean']:.4f} ({seeds} seed{'s' * (seeds > 1)})"
        return text

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._ended(trial, "error")
