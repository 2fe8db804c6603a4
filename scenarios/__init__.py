"""Scenario scripts: each builds a list of (label, Config) variants, runs them over seeds and prints a table.

Run one with `python -m scenarios NAME [options]` (`python -m scenarios --list` shows them all); each module's
COMMAND is what runs, a common.Scenario for the experiments and a plain function for the two table/plot tools.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Sequence

# The folder beside the repository that holds the real datasets (MNIST under MNIST/raw), read without downloads by
# the cpu-scale configs (their data.root: ../shared/data), the tests and the benchmarks.
DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"

# name -> module under scenarios/ whose COMMAND(argv) runs it.
SCENARIOS: dict[str, str] = {
    "ars_vs_constant": "ars_vs_constant",
    "adaptive_vs_ars": "adaptive_vs_ars",
    "adagossip_vs_choco": "adagossip_vs_choco",
    "late_communication": "late_communication",
    "plot_window_position": "plot_window_position",
    "topologies": "topologies",
    "failures": "failures",
    "stragglers": "stragglers",
    "churn": "churn",
    "partition_heal": "partition_heal",
    "straggler_recovery": "straggler_recovery",
    "bandwidth_collapse": "bandwidth_collapse",
    "timeline_table": "timeline_common",
    "own_language_model": "own_language_model",
    "own_image_folder": "own_image_folder",
    "own_regression": "own_regression",
}


def command(name: str) -> Callable[[Sequence[str] | None], int]:
    """The scenario's COMMAND: called with its argv, it returns the exit status."""
    return importlib.import_module(f"scenarios.{SCENARIOS[name]}").COMMAND


def summary(name: str) -> str:
    """The first line of what the scenario's COMMAND says it does (a Scenario's doc, a function's docstring, or
    its module's docstring)."""
    module = importlib.import_module(f"scenarios.{SCENARIOS[name]}")
    doc = (getattr(module.COMMAND, "doc", None) or getattr(module.COMMAND, "__doc__", None) or module.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
