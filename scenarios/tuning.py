"""Step sizes chosen by `raygossip sweep` on validation accuracy, and final runs that reuse the sweep's trials."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from raygossip.config import Config
from raygossip.config_io import dump_yaml, to_dict
from raygossip.validation import load_config
from raygossip.errors import UserError
from raygossip.results import read_metrics, write_text_atomic

METRIC = "merged_validation_accuracy"  # the held-out part of the training set: never the test set
IGNORED = ("name", "label", "runtime", "data.root", "data.download", "eval.tensorboard")


def tune(base: dict, grid: dict[str, list], out: str | Path, seeds: Sequence[int] = (0,),
         metric: str = METRIC, reject_diverging: float | None = None) -> dict:
    """trials.json of the sweep of `grid` over `base` in `out`: read when `out` already holds that sweep, else run.

    Trials run one at a time (reference engine, one Ray actor reused), ranked on the mean over `seeds` of
    `metric`. A folder holding a sweep of another grid or seeds is refused (one-line UserError).
    """
    out = Path(out)
    done = out / "trials.json"
    if done.is_file():
        trials = json.loads(done.read_text())
        if _canonical(trials["grid"]) != _canonical(grid) or list(trials["seeds"]) != list(seeds) \
                or trials["metric"] != metric or trials.get("reject_diverging") != reject_diverging:
            raise UserError("--tune-out", f"{out} holds a sweep of another grid, seeds or metric: "
                                          "give an empty folder (or delete it) to tune again")
        print(f"tuning: reusing the sweep in {out} ({len(trials['trials'])} trials)")
        return trials
    from raygossip.sweep import sweep

    sweep(base, grid, out_dir=out, seeds=list(seeds), metric=metric, max_concurrent=1, progress=True,
          reject_diverging=reject_diverging)
    return json.loads(done.read_text())


def sweep_command(config: str, grid: dict[str, list], seeds: Sequence[int], out: str | Path,
                  overrides: Sequence[str] = (), metric: str = METRIC, reject_diverging: float | None = None) -> str:
    """The `raygossip sweep` command line that runs the same sweep as tune()."""
    parts = [f"raygossip sweep {config}"]
    parts += [f"--grid '{key}={json.dumps(values, separators=(', ', ': '))}'" for key, values in grid.items()]
    parts += [f"--set {item}" for item in overrides]
    parts += [f"--seeds {' '.join(map(str, seeds))}", "--max-concurrent 1", f"--metric {metric}"]
    parts += [] if reject_diverging is None else [f"--reject-diverging {reject_diverging:g}"]
    parts += [f"--out {out}"]
    return " \\\n    ".join(parts)


def best_per_group(trials: dict, group: Callable[[dict], Any]) -> dict[Any, dict]:
    """{group(settings): the settings of the best grid point in that group} from a sweep's ranked points.

    Only points whose trials ran to the end (status finished) and none of which was rejected as diverging
    (`--reject-diverging`) count; a group with none is left out.
    """
    best: dict[Any, dict] = {}
    for point in trials["points"]:  # ranked best first
        if not point["finished"] or point["mean"] is None or point.get("rejected"):
            continue
        best.setdefault(group(point["settings"]), point)
    return {key: point["settings"] for key, point in best.items()}


def key_of(value: Any) -> str:
    """A hashable, order-free form of a grid value (mappings included)."""
    return json.dumps(value, sort_keys=True)


def fingerprint(config: Config) -> str:
    """What decides a run's numbers: the config less its name, label, runtime and data location (seed kept)."""
    data = to_dict(config)
    for dotted in IGNORED:
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    return _canonical(data)


def reusable_runs(trials: dict) -> dict[str, Path]:
    """{fingerprint: run folder} of the sweep's trials that finished, for run_variants to copy instead of rerun."""
    runs = {}
    for row in trials["trials"]:
        folder = Path(row["run_dir"])
        if row["status"] == "finished" and (folder / "config.yaml").is_file():
            runs[fingerprint(load_config(folder / "config.yaml"))] = folder
    return runs


def copy_run(source: Path, target: Path, config: Config) -> tuple[dict, list[dict]]:
    """Copy a finished run folder to `target`, its config.yaml rewritten with `config`'s name and label."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    write_text_atomic(target / "config.yaml", dump_yaml(config))
    summary = json.loads((target / "summary.json").read_text())
    return summary, read_metrics(target / "metrics.jsonl")



def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
