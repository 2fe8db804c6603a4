"""The figures of `raygossip compare`: each group's metric curves over seeds (mean line, min..max band) and the
spread of local accuracies, drawn with matplotlib's object API (no pyplot state) and saved atomically."""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from raygossip.results import Group, Run, metric_of, named

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
