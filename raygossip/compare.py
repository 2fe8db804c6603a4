"""`raygossip compare`: group finished runs by their config differences; write a seed-averaged table and plots."""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from raygossip.config_io import to_dict
from raygossip.validation import load_config
from raygossip.errors import UserError
from raygossip.plots import PLOTS
from raygossip.results import Group, Run, mean_std, metric_of, named, read_metrics, write_text_atomic

# Keys that never separate groups: the seed is what a group averages over; the rest do not change results
# (a run's label names its group instead).
IGNORED_KEYS = ("seed", "name", "label", "runtime.progress", "data.root", "data.download")

# (column, summary key, scale): the headline numbers a table row averages over seeds.
METRICS: tuple[tuple[str, str, float], ...] = (
    ("merged_test_accuracy", "merged_test_accuracy", 1.0),
    ("mean_local_test_accuracy", "mean_local_test_accuracy", 1.0),
    ("consensus_distance", "consensus_distance", 1.0),
    ("bytes_sent_mb", "bytes_sent", 1e-6),
    ("communication_rounds", "communication_rounds", 1.0),
    ("wall_time_s", "wall_time_s", 1.0),
)



class _Unset:
    """The value of a config key a run does not have (e.g. topology.params.k in only some runs)."""

    def __repr__(self) -> str:
        return "unset"


_MISSING = _Unset()


# ---------------------------------------------------------------- loading


def load_run(path: str | Path) -> Run:
    """Read a run folder (config.yaml, summary.json, metrics.jsonl); anything missing or corrupt is a UserError."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError("RUN_DIR", f"no such folder: {str(folder)!r}")
    for name in ("summary.json", "config.yaml", "metrics.jsonl"):
        if not (folder / name).is_file():
            raise UserError("RUN_DIR", f"{folder} has no {name} (not a finished run folder)")
    summary = _read_summary(folder / "summary.json")
    try:
        config = load_config(folder / "config.yaml")
    except UserError as error:
        raise UserError("RUN_DIR", f"{folder / 'config.yaml'}: {error}") from None
    try:
        records = read_metrics(folder / "metrics.jsonl")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError("RUN_DIR", f"cannot read {folder / 'metrics.jsonl'}: {error}") from None
    return Run(path=folder, config=config, flat=flatten(to_dict(config)), summary=summary, records=records)


def _read_summary(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError("RUN_DIR", f"{path} is not valid JSON: {error}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError("RUN_DIR", f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise UserError("RUN_DIR", f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Each path is a run folder, or a folder with run folders somewhere below it; duplicates are dropped."""
    from raygossip.sweep import SWEEP_FILES  # here, not at the top: sweep imports Ray Tune, which compare needs not

    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.name in SWEEP_FILES and (path.parent / "trials.json").is_file():
            continue  # `raygossip compare SWEEP/*` also names the sweep's own best.yaml and tables
        if not path.is_dir():
            what = "not a folder" if path.exists() else "no such folder"
            raise UserError("RUN_DIR", f"{what}: {str(path)!r}")
        if (path / "summary.json").exists():
            found.append(path)
            continue
        inside = sorted(summary.parent for summary in path.rglob("summary.json"))
        if not inside:
            raise UserError("RUN_DIR", f"{path} has no summary.json and no run folders inside it")
        found.extend(inside)
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    return [load_run(path) for path in find_run_dirs(paths)]


# ---------------------------------------------------------------- grouping


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}, 'c': {}} -> {'a.b': 1}; lists become tuples so values can be compared and hashed."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = _hashable(value)
    return flat


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(item) for item in value)
    return value


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys (dotted) whose values are not the same in every run, minus IGNORED_KEYS."""
    keys = sorted({key for run in runs for key in run.flat} - set(IGNORED_KEYS))
    return [key for key in keys if len({_value_key(run.flat.get(key, _MISSING)) for run in runs}) > 1]


def _value_key(value: Any) -> tuple[str, str]:
    return (type(value).__name__, repr(value))


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key's shortest suffix of at least two parts that no other key ends with."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for size in range(min(2, len(parts)), len(parts) + 1):
            suffix = ".".join(parts[-size:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        short[key] = suffix
    return short


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, _Unset):
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    return str(value)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Groups of runs equal on every differing key but the seed, sorted by those keys' values."""
    if not runs:
        return []
    keys = differing_keys(runs)
    buckets: dict[tuple, list[Run]] = {}
    for run in runs:
        buckets.setdefault(tuple(_value_key(run.flat.get(key, _MISSING)) for key in keys), []).append(run)
    settings = [{key: members[0].flat.get(key, _MISSING) for key in keys} for members in buckets.values()]
    labels = group_labels(settings, [{run.config.label for run in members} for members in buckets.values()])
    groups = [Group(label=label or _common_name(runs), settings=setting,
                    runs=sorted(members, key=lambda run: (run.seed, str(run.path))))
              for label, setting, members in zip(labels, settings, buckets.values())]
    return sorted(groups, key=lambda group: [_sort_key(value) for value in group.settings.values()])


def group_labels(settings: Sequence[dict[str, Any]], own: Sequence[set[str | None]]) -> list[str]:
    """Each group's own label where its runs share one no other group uses, else distinguishing_pairs."""
    shared = [next(iter(labels)) if len(labels) == 1 else None for labels in own]
    counts = {label: shared.count(label) for label in shared}
    pairs = distinguishing_pairs(settings)
    return [label if label is not None and counts[label] == 1 else pair for label, pair in zip(shared, pairs)]


def distinguishing_pairs(settings: Sequence[dict[str, Any]]) -> list[str]:
    """Per group, the fewest `key=value` pairs (short keys, greedy) whose values no other group shares all of."""
    keys = list(settings[0]) if settings else []
    short = short_keys(keys)
    values = [[_value_key(setting[key]) for key in keys] for setting in settings]
    labels = []
    for g, mine in enumerate(values):
        others = [other for h, other in enumerate(values) if h != g]
        chosen: list[int] = []
        while others:  # the key that tells this group from the most remaining others (the first on ties)
            best = max(range(len(keys)), key=lambda k: sum(other[k] != mine[k] for other in others))
            chosen.append(best)
            others = [other for other in others if other[best] == mine[best]]
        labels.append(", ".join(f"{short[keys[k]]}={format_value(settings[g][keys[k]])}" for k in sorted(chosen)))
    return labels


def _common_name(runs: Sequence[Run]) -> str:
    names = {run.flat.get("name", run.config.name) for run in runs}
    return names.pop() if len(names) == 1 else "all runs"


def _sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, format_value(value))


# ---------------------------------------------------------------- the table


def table(groups: Sequence[Group]) -> list[dict]:
    """One row per group: label, seeds, each differing key, and METRICS as `<name>_mean` / `<name>_std` (accuracy
    columns named for the runs' metric)."""
    rows = []
    metric = metric_of(groups)
    for group in groups:
        row: dict[str, Any] = {"group": group.label, "n_seeds": len(group.runs),
                               "seeds": " ".join(str(run.seed) for run in group.runs), "metric": metric}
        row.update({key: format_value(value) for key, value in group.settings.items()})
        for column, key, scale in ((named(c, metric), named(k, metric), f) for c, k, f in METRICS):
            values = [run.summary.get(key) for run in group.runs]
            mean, std = mean_std([None if value is None else value * scale for value in values])
            row[f"{column}_mean"], row[f"{column}_std"] = mean, std
        rows.append(row)
    return rows


# (header, column, format) of the Markdown table.
_MARKDOWN_COLUMNS = (
    ("merged test acc.", "merged_test_accuracy", ".4f"),
    ("mean local test acc.", "mean_local_test_accuracy", ".4f"),
    ("consensus distance", "consensus_distance", ".4g"),
    ("sent (MB)", "bytes_sent_mb", ".2f"),
    ("comm. rounds", "communication_rounds", ".1f"),
    ("wall time (s)", "wall_time_s", ".1f"),
)


def _cell(mean: float | None, std: float | None, spec: str) -> str:
    if mean is None:
        return "n/a"
    if spec == ".1f" and float(mean).is_integer() and not std:
        return f"{mean:.0f}"  # a count that did not vary over seeds
    return f"{mean:{spec}}" if not std else f"{mean:{spec}} ± {std:{spec}}"


def markdown_table(rows: Sequence[dict]) -> str:
    metric = rows[0].get("metric", "accuracy") if rows else "accuracy"
    columns = [(named(title, metric), named(column, metric), spec) for title, column, spec in _MARKDOWN_COLUMNS]
    header = ["group", "n seeds"] + [title for title, _, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [row["group"].replace("|", "\\|"), str(row["n_seeds"])]
        cells += [_cell(row[f"{column}_mean"], row[f"{column}_std"], spec) for _, column, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[dict]) -> str:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: ("" if value is None else value) for key, value in row.items()})
    return buffer.getvalue()


# ---------------------------------------------------------------- the report


def report_markdown(groups: Sequence[Group], rows: Sequence[dict], plots: Sequence[str]) -> str:
    runs = sum(len(group.runs) for group in groups)
    lines = [f"# Comparison of {_plural(runs, 'run')} in {_plural(len(groups), 'group')}", "", markdown_table(rows),
             "Mean ± sample standard deviation over seeds (no ± where a value did not vary or there is one seed). "
             "Merged test accuracy is after the final merge; mean local test accuracy and consensus distance are "
             "at the last evaluation before it; data sent, communication rounds and wall time are whole-run totals.",
             "", "## Runs", ""]
    for group in groups:
        lines.append(f"- **{group.label}**: " + ", ".join(f"`{run.path}` (seed {run.seed})" for run in group.runs))
    lines += ["", "## Plots", ""] + [f"![{name}]({name}.png)" for name in plots]
    return "\n".join(lines) + "\n"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def write_report(groups: Sequence[Group], out_dir: str | Path) -> dict[str, Path]:
    """compare.md, compare.csv and one PNG per entry of PLOTS in `out_dir`; returns name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table(groups)
    written = {name: plot(groups, out / f"{name}.png") for name, plot in PLOTS.items()}
    write_text_atomic(out / "compare.csv", csv_text(rows))
    write_text_atomic(out / "compare.md", report_markdown(groups, rows, list(PLOTS)))
    return {"markdown": out / "compare.md", "csv": out / "compare.csv", **written}


# ---------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("compare", help="table and plots over finished runs, averaged over seeds",
                                   description="Group runs by the config keys that differ between them (the seed "
                                               "aside), name each group by its runs' label (else by the fewest "
                                               "differing keys that tell it apart), average over seeds, write "
                                               "compare.md, compare.csv and PNGs (at most 8 groups to a panel).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a run folder, or a folder with run folders below it (repeatable)")
    parser.add_argument("--out", default="compare", help="output folder (default: compare/)")
    return parser


def cmd_compare(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError("--out", f"{args.out} exists and is not a folder")
    runs = load_runs(args.run_dirs)
    groups = group_runs(runs)
    files = write_report(groups, args.out)
    print(markdown_table(table(groups)), end="")
    counts = f"{_plural(len(runs), 'run')} in {_plural(len(groups), 'group')}"
    print(f"{counts} (mean ± std over seeds); files in {args.out}:")
    for path in files.values():
        print(f"  {path}")
    return 0
