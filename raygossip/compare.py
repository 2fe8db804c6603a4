"""`raygossip compare`: group finished runs by their config differences; write a seed-averaged table and plots."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import math
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from raygossip.config import Config, load_config, to_dict
from raygossip.errors import UserError
from raygossip.results import read_metrics, write_text_atomic

# Keys that never separate groups: the seed is what a group averages over; the rest do not change results
# (a run's label names its group instead).
IGNORED_KEYS = ("seed", "name", "label", "runtime.progress", "data.root", "data.download")

# What `raygossip sweep` writes beside its trials' run folders (.tune: Ray Tune's own records).
SWEEP_FILES = ("best.yaml", "trials.md", "trials.json", ".tune")

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


@dataclass
class Run:
    """One finished run folder: its config (validated, defaults filled), summary and evaluation records."""

    path: Path
    config: Config
    flat: dict[str, Any]
    summary: dict
    records: list[dict]

    @property
    def seed(self) -> int:
        return self.config.seed


@dataclass
class Group:
    """Runs equal on every differing config key but the seed; `settings` holds those keys' values.

    `label` is the runs' own config label when they share one that no other group has, else the fewest
    `key=value` pairs of `settings` that tell this group from every other.
    """

    label: str
    settings: dict[str, Any]
    runs: list[Run]


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


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the values that are not None; std is None below two."""
    present = [float(value) for value in values if value is not None]
    if not present:
        return None, None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None


def metric_of(groups: Sequence[Group]) -> str:
    """The metric the runs were evaluated with (summary.json's metric.name; accuracy for runs from before it)."""
    return next(((run.summary.get("metric") or {}).get("name", "accuracy") for g in groups for run in g.runs),
                "accuracy")


def named(key: str, metric: str) -> str:
    """An accuracy key or column as the run's metric names it (merged_test_accuracy -> merged_test_perplexity)."""
    return key if metric == "accuracy" else key.replace("accuracy", metric).replace("acc.", metric)


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


# ---------------------------------------------------------------- curves


@dataclass
class Curve:
    """One group's metric against x: the mean over seeds and the min..max band, on a common x grid."""

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def series(run: Run, x_key: str, y_key: str, x_scale: float = 1.0) -> tuple[list, np.ndarray, np.ndarray]:
    """(steps, x, y) of a run's records that have both values, in step order (x never decreases along it)."""
    points = sorted((r.get("step", 0), float(r[x_key]) * x_scale, float(r[y_key])) for r in run.records
                    if r.get(x_key) is not None and r.get(y_key) is not None)
    return [p[0] for p in points], np.array([p[1] for p in points]), np.array([p[2] for p in points])


def group_curve(group: Group, x_key: str, y_key: str, x_scale: float = 1.0) -> Curve | None:
    """Seeds that evaluated at the same steps are averaged point by point (x too: wall time differs per seed);
    otherwise they are interpolated on the union of their x values inside the range every seed covers."""
    found = [series(run, x_key, y_key, x_scale) for run in group.runs]
    found = [item for item in found if item[0]]
    if not found:
        return None
    if all(steps == found[0][0] for steps, _, _ in found):
        grid = np.mean([x for _, x, _ in found], axis=0)
        ys = np.stack([y for _, _, y in found])
    else:
        low, high = max(x[0] for _, x, _ in found), min(x[-1] for _, x, _ in found)
        grid = np.unique(np.concatenate([x for _, x, _ in found]))
        if low <= high:
            grid = grid[(grid >= low) & (grid <= high)]
        ys = np.stack([np.interp(grid, x, y) for _, x, y in found])
    return Curve(x=grid, mean=ys.mean(axis=0), low=ys.min(axis=0), high=ys.max(axis=0))


# ---------------------------------------------------------------- plots


# At most this many groups (colours) share one panel; more lines than that cannot be told apart.
PANEL_GROUPS = 8


def panels(count: int, limit: int = PANEL_GROUPS) -> list[range]:
    """Split `count` groups, in order, into the fewest panels of at most `limit`, as even as possible."""
    parts = max(1, math.ceil(count / limit))
    bounds = [round(k * count / parts) for k in range(parts + 1)]
    return [range(bounds[k], bounds[k + 1]) for k in range(parts)]


def _colors(count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(k % cmap.N) for k in range(count)]


def _figure(width: float = 9.0, heights: Sequence[float] = (4.2,)):
    """A figure of panels stacked top to bottom (each `heights[k]` inches tall), sharing both axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, 0.8 + sum(heights)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(heights), 1, sharex=True, sharey=True, squeeze=False,
                           gridspec_kw={"height_ratios": list(heights)})[:, 0]
    return figure, list(axes)


def _legend_height(labels: Sequence[str], extra: int) -> float:
    """Inches a legend of these (wrapped) labels plus `extra` one-line entries takes at font size 8."""
    lines = sum(label.count("\n") + 1 for label in labels) + extra
    return 0.14 * lines + 0.06 * (len(labels) + extra) + 0.3


def _save(figure, path: Path) -> Path:
    """Render to a temporary file beside `path`, then rename over it (no half-written PNG).

    The saved image is grown to hold every artist, so a long legend is never cut off at its edge.
    """
    partial = path.with_name(f".{path.name}.partial")
    figure.savefig(partial, format="png", dpi=120, bbox_inches="tight", pad_inches=0.15)
    os.replace(partial, path)
    return path


def _seeds_note(groups: Sequence[Group]) -> str:
    counts = sorted({len(group.runs) for group in groups})
    if counts == [1]:
        return "one seed per group (no band)"
    return f"line: mean over {'/'.join(map(str, counts))} seeds; band: min–max over seeds"


def _title(figure, title: str, note: str) -> None:
    """A title over the whole figure (the outside legend included), with a smaller note line under it."""
    figure.suptitle(f"{title}\n{note}", fontsize=11)


def _draw(ax, curve: Curve, color, label: str | None, dashed: bool = False, band: bool = True) -> None:
    marker = ("s" if dashed else "o") if len(curve.x) <= 25 else None
    ax.plot(curve.x, curve.mean, color=color, label=label, linestyle="--" if dashed else "-",
            marker=marker, markersize=3.5, linewidth=1.2 if dashed else 1.8)
    if band and len(curve.x) > 0:
        ax.fill_between(curve.x, curve.low, curve.high, color=color, alpha=0.18 if not dashed else 0.08, linewidth=0)


def wrap_label(label: str, width: int = 40) -> str:
    """Break a group label between its comma-separated parts (inside a part at spaces) into lines of <= `width`."""
    lines: list[str] = []
    for part in label.split(", "):
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += ", " + part
        else:
            lines.extend(textwrap.wrap(part, width, break_long_words=False) or [part])
    return "\n".join(lines)


def _legend(ax, extra: Sequence[tuple[str, str]] = ()) -> None:
    """Groups (colours) plus line-style entries, outside the axes on the right."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    for style, text in extra:
        handles.append(Line2D([], [], color="0.3", linestyle=style))
        labels.append(text)
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _maybe_log_x(ax, curves: Sequence[Curve]) -> bool:
    """Log x when positive x values span more than two decades (e.g. compressed against full models)."""
    values = np.concatenate([c.x for c in curves]) if curves else np.array([])
    positive = values[values > 0]
    if not len(positive) or positive.max() / positive.min() <= 100:
        return False
    if (values <= 0).any():
        ax.set_xscale("symlog", linthresh=10.0 ** math.floor(math.log10(positive.min())))  # 0 a decade from it
    else:
        ax.set_xscale("log")
    return True


def _panel_axes(groups: Sequence[Group], extra: int = 0):
    """(figure, [(axes, that panel's groups, their colours)]): one panel per PANEL_GROUPS groups, each as tall as
    its legend (its groups' labels and `extra` more entries) needs."""
    chunks = panels(len(groups))
    least = 4.2 if len(chunks) == 1 else 3.2
    figure, axes = _figure(heights=[max(least, _legend_height([wrap_label(groups[k].label) for k in chunk], extra))
                                    for chunk in chunks])
    laid_out = []
    for ax, chunk in zip(axes, chunks):
        if len(chunks) > 1:
            ax.set_title(f"groups {chunk.start + 1}-{chunk.stop} of {len(groups)}", fontsize=9, loc="left")
        laid_out.append((ax, [groups[k] for k in chunk], _colors(len(chunk))))
    return figure, laid_out


def plot_accuracy(groups: Sequence[Group], x_key: str, x_label: str, title: str, path: Path,
                  x_scale: float = 1.0) -> Path:
    """Merged test accuracy (solid, band) and mean local test accuracy (dashed) against `x_key`."""
    figure, laid_out = _panel_axes(groups, extra=2)
    curves = []
    metric = metric_of(groups)
    for ax, members, colors in laid_out:
        for group, color in zip(members, colors):
            merged = group_curve(group, x_key, named("merged_test_accuracy", metric), x_scale)
            local = group_curve(group, x_key, named("mean_local_test_accuracy", metric), x_scale)
            if merged is not None:
                _draw(ax, merged, color, wrap_label(group.label))
                curves.append(merged)
            if local is not None:
                label = None if merged is not None else wrap_label(group.label)
                _draw(ax, local, color, label, dashed=True, band=False)
                curves.append(local)
    for ax, _, _ in laid_out:
        log_x = _maybe_log_x(ax, curves)
        ax.set_ylabel("test accuracy (fraction correct)" if metric == "accuracy" else f"test {metric}")
        ax.grid(alpha=0.3)
        _legend(ax, [("-", "merged model (average of agents)"), ("--", "mean of local models")])
    laid_out[-1][0].set_xlabel(x_label + (" (log scale)" if log_x else ""))
    _title(figure, title, _seeds_note(groups))
    return _save(figure, path)


def plot_consensus(groups: Sequence[Group], path: Path) -> Path:
    figure, laid_out = _panel_axes(groups)
    for ax, members, colors in laid_out:
        for group, color in zip(members, colors):
            curve = group_curve(group, "round", "consensus_distance")
            if curve is not None:
                _draw(ax, curve, color, wrap_label(group.label))
        ax.set_yscale("log", nonpositive="mask")
        ax.set_ylabel("consensus distance (log scale)")
        ax.grid(alpha=0.3, which="both")
        _legend(ax)
    laid_out[-1][0].set_xlabel("gossip round")
    _title(figure, "Consensus distance (how far the agents' models are from their average)", _seeds_note(groups))
    return _save(figure, path)


def plot_local_spread(groups: Sequence[Group], path: Path) -> Path:
    """Per group (one row each): every agent's last local test accuracy over all seeds, and the merged model."""
    figure, (ax,) = _figure(10.0, [max(2.2, 0.75 * len(groups) + 1.0)])
    rng = np.random.default_rng(0)
    seeds = sorted({run.seed for group in groups for run in group.runs})
    drawn = False
    for k, (group, color) in enumerate(zip(groups, _colors(len(groups)))):
        row = len(groups) - 1 - k  # first group on top, as in the table
        values = [v for run in group.runs for v in (run.summary.get("local_test_accuracy") or [])]
        if values:
            drawn = True
            ax.boxplot([values], positions=[row], widths=0.55, whis=(0, 100), showfliers=False, patch_artist=True,
                       orientation="horizontal", boxprops={"facecolor": (*color[:3], 0.2), "edgecolor": color},
                       medianprops={"color": color}, whiskerprops={"color": color}, capprops={"color": color})
        for run in group.runs:
            local = run.summary.get("local_test_accuracy") or []
            ax.scatter(local, row + rng.uniform(-0.2, 0.2, len(local)), s=16, color=color, alpha=0.85,
                       marker=_SEED_MARKERS[seeds.index(run.seed) % len(_SEED_MARKERS)], linewidths=0, zorder=3)
        merged = [m for m in (run.summary.get("merged_test_accuracy") for run in group.runs) if m is not None]
        ax.scatter(merged, [row] * len(merged), s=160, marker="|", color="black", linewidths=2, zorder=4)
    if not drawn:
        ax.text(0.5, 0.5, "no per-agent local accuracies recorded (eval.local: false)",
                transform=ax.transAxes, ha="center", va="center")
    ax.set_yticks(range(len(groups)), [wrap_label(group.label) for group in reversed(groups)], fontsize=8)
    ax.set_ylim(-0.6, len(groups) - 0.4)
    ax.set_xlabel("test accuracy (fraction correct)")
    _title(figure, "Per-agent local test accuracy at the last evaluation, before the final merge",
           "all seeds pooled; one row per group")
    ax.grid(alpha=0.3, axis="x")
    _spread_legend(ax, seeds)
    return _save(figure, path)


_SEED_MARKERS = "o^sDvP*X"


def _spread_legend(ax, seeds: Sequence[int]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="black", marker="|", linestyle="", markersize=12, markeredgewidth=2)]
    labels = ["merged model after the\nfinal merge (one per seed)"]
    for k, seed in enumerate(seeds[:len(_SEED_MARKERS)]):
        handles.append(Line2D([], [], color="0.4", marker=_SEED_MARKERS[k], linestyle="", markersize=5))
        labels.append(f"one agent, seed {seed}")
    handles.append(Line2D([], [], color="0.4", marker="s", linestyle="", markersize=10, alpha=0.3))
    labels.append("box: quartiles\nwhiskers: min..max")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


PLOTS: dict[str, Callable[[Sequence[Group], Path], Path]] = {
    "accuracy_vs_round": lambda groups, path: plot_accuracy(
        groups, "round", "gossip round", "Test accuracy against gossip rounds", path),
    "accuracy_vs_bytes": lambda groups, path: plot_accuracy(
        groups, "bytes_sent", "data sent by all agents together (MB)", "Test accuracy against data sent", path,
        x_scale=1e-6),
    "accuracy_vs_time": lambda groups, path: plot_accuracy(
        groups, "wall_time_s", "wall-clock time since training started (s)", "Test accuracy against wall time", path),
    "consensus_distance": plot_consensus,
    "local_accuracy_spread": plot_local_spread,
}


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
