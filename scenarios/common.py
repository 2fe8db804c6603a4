"""What every scenario shares: scales, config variants and baselines, running them over seeds, the tables."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from raygossip.api import run
from raygossip.config import ENGINES, Config
from raygossip.config_io import apply_overrides, read_yaml
from raygossip.validation import load_config
from raygossip.errors import UserError
from raygossip.results import mean_std
from scenarios import tuning

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

SCALES = ("smoke", "cpu", "paper")

Variant = tuple[str, Config]  # (label shown in tables, the run's config)
Observer = Callable[[dict], None]


class Whole(dict):
    """A patch value that replaces the base's mapping instead of merging into it (e.g. topology params)."""


def deep_merge(base: dict, patch: dict) -> dict:
    """A copy of `base` with `patch` merged in: nested mappings merge, anything else (and Whole) replaces."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and not isinstance(value, Whole) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(dict(value) if isinstance(value, Whole) else value)
    return out


def slug(label: str) -> str:
    """A folder-safe name for a label: 'ARS (exp), alpha=0.1' -> 'ars-exp-alpha-0.1'."""
    return re.sub(r"[^a-z0-9.]+", "-", label.lower()).strip("-.") or "run"


# ---------------------------------------------------------------- scales


# What `smoke` does to any cpu config: seconds, on scikit-learn's bundled digits (no files needed).
SMOKE_PATCH: dict = {
    "data": {"name": "digits", "root": "data", "download": False, "image_size": None},
    "model": Whole(name="mlp", hidden=[16]),
    "agents": {"count": 4},
    "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 8, "local_steps": 1},
    "eval": {"every": 1, "test_samples": None, "local": True},
    "runtime": {"progress": False, "num_cpus_per_agent": 0.5, "wait_timeout_s": 60.0},
}


def read_config(path: str | Path) -> dict:
    """A config YAML as a raw mapping; a relative data.root that exists under the repo is made absolute."""
    data = read_yaml(path)
    root = data.get("data", {}).get("root")
    if isinstance(root, str) and not Path(root).is_absolute() and (REPO / root).exists():
        data["data"]["root"] = str((REPO / root).resolve())
    return data


def base_mapping(scale: str, cpu: str, paper: str, overrides: Sequence[str] = (), smoke: dict | None = None) -> dict:
    """The scale's starting mapping: configs/cpu/<cpu>, configs/papers/<paper>, or the cpu one shrunk to seconds.

    `smoke` is merged over SMOKE_PATCH for scenarios that need more (32 agents, the Ray engine's timing).
    `overrides` are `--set KEY=VALUE` strings, applied last to the base (the variants then patch it).
    """
    if scale not in SCALES:
        raise UserError("--scale", f"must be one of {', '.join(SCALES)}, got {scale!r}")
    if scale == "paper":
        data = read_config(CONFIGS / "papers" / paper)
    else:
        data = read_config(CONFIGS / "cpu" / cpu)
        if scale == "smoke":
            data = deep_merge(data, deep_merge(SMOKE_PATCH, smoke or {}))
    return apply_overrides(data, list(overrides))


def epochs_of(base: dict) -> int:
    return int(base.get("train", {}).get("epochs", Config().train.epochs))


def ars_growth(gamma0: float, epochs: int, reach: float = 0.8) -> float:
    """The ARS growth that takes gamma0 to 1 at fraction `reach` of training (0.09, 300 epochs: 1.0101).

    Epoch e uses min(1, gamma0 * growth**(e+1)), so gamma reaches 1 at epoch reach*epochs - 1.
    """
    return (1.0 / gamma0) ** (1.0 / max(1.0, reach * epochs))


# ---------------------------------------------------------------- variants and baselines


def variant(scenario: str, base: dict, label: str, patch: dict | None = None) -> Variant:
    """(label, validated Config) for `base` with `patch` merged in; named scenario-slug(label), labelled label."""
    data = deep_merge(base, patch or {})
    data["name"] = f"{scenario}-{slug(label)}"
    data["label"] = label
    return label, load_config(base=data)


EVERY_ROUND = {"kind": "every", "p": 1.0, "pull": "neighbours"}
EXACT_GOSSIP = {"rule": "dpsgd", "gamma": 1.0, "compressor": Whole(name="identity")}


def scaled_base(cpu: dict, smoke: dict, scale: str, overrides: Sequence[str] = ()) -> dict:
    """A config mapping written in a script (no YAML file): `cpu`, or `cpu` shrunk by `smoke` to seconds."""
    if scale not in ("smoke", "cpu"):
        raise UserError("--scale", f"this example has the scales smoke and cpu, got {scale!r}")
    base = cpu if scale == "cpu" else deep_merge(cpu, smoke)
    return apply_overrides(copy.deepcopy(base), list(overrides))


def parallel_sgd(scenario: str, base: dict, suffix: str = "") -> Variant:
    """Parallel SGD: the exact average every round (complete graph, D-PSGD with gamma 1)."""
    return variant(scenario, base, f"parallel SGD{suffix}", {
        "topology": Whole(name="complete", weights="uniform", params={}),
        "gossip": EXACT_GOSSIP,
        "schedule": {"averaging_rate": Whole(kind="constant", gamma0=1.0), "communication": EVERY_ROUND},
    })


def dpsgd_constant(scenario: str, base: dict, gamma: float = 1.0, suffix: str = "") -> Variant:
    """D-PSGD on the scenario's graph with a constant averaging rate (gamma 1: plain gossip averaging)."""
    return variant(scenario, base, f"D-PSGD gamma={gamma:g}{suffix}", {
        "gossip": {**EXACT_GOSSIP, "gamma": gamma},
        "schedule": {"averaging_rate": Whole(kind="constant", gamma0=gamma), "communication": EVERY_ROUND},
    })


def local_only(scenario: str, base: dict, merge: bool, suffix: str = "") -> Variant:
    """Local training, no communication at all; with or without the single global merge at the end."""
    label = f"local, {'final merge' if merge else 'no merge'}{suffix}"
    return variant(scenario, base, label, {
        "gossip": EXACT_GOSSIP,
        "schedule": {"averaging_rate": Whole(kind="constant", gamma0=1.0),
                     "communication": {"kind": "none"}, "final_merge": {"enabled": merge}},
    })


def baselines(scenario: str, base: dict, suffix: str = "", dpsgd: bool = True) -> list[Variant]:
    """What every comparison can include: parallel SGD, D-PSGD (constant rate), local with and without merge."""
    out = [parallel_sgd(scenario, base, suffix)]
    if dpsgd:
        out.append(dpsgd_constant(scenario, base, 1.0, suffix))
    out += [local_only(scenario, base, False, suffix), local_only(scenario, base, True, suffix)]
    return out


# ---------------------------------------------------------------- running


@dataclass
class Outcome:
    """One finished run: which variant, which seed, what it reported and where it lies."""

    label: str
    seed: int
    config: Config
    summary: dict
    records: list[dict]
    out_dir: Path
    seconds: float


def with_seed_and_engine(config: Config, seed: int, engine: str | None) -> Config:
    runtime = config.runtime if engine is None else dataclasses.replace(config.runtime, engine=engine)
    return dataclasses.replace(config, seed=seed, runtime=runtime)


def run_variants(
    variants: Sequence[Variant],
    seeds: Iterable[int],
    out: str | Path,
    *,
    engine: str | None = None,
    observer: Callable[[str, int], Observer | None] | None = None,
    threads: int | None = 1,
    progress: bool = False,
    log: Callable[[str], None] | None = print,
    reuse: dict[str, Path] | None = None,
) -> list[Outcome]:
    """Run every variant for every seed, each into its own folder out/<label>-seed<k> (a `raygossip compare` input).

    engine: overrides runtime.engine of every config (None keeps each config's own). observer(label, seed)
    returns the callback that sees that run's metric records as they arrive. threads: torch threads in
    this process (1 suits small models and leaves the cores to Ray workers; None leaves torch's default).
    A Ray engine is started once for the whole list (and stopped at the end) rather than once per run.
    reuse: {tuning.fingerprint(config): finished run folder}; a run with the same fingerprint (a sweep's
    trial of the same config and seed) is copied from there instead of run again (the observer sees nothing).
    """
    seeds = list(seeds)
    labels = [label for label, _ in variants]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserError("variants", f"labels must be unique, repeated: {', '.join(duplicates)}")
    if threads is not None:
        torch.set_num_threads(threads)
    configs = [(label, with_seed_and_engine(config, seed, engine)) for label, config in variants for seed in seeds]
    started_ray = _start_ray_once([config for _, config in configs])
    outcomes: list[Outcome] = []
    try:
        for index, (label, config) in enumerate(configs, start=1):
            folder = Path(out) / f"{slug(label)}-seed{config.seed}"
            callback = observer(label, config.seed) if observer is not None else None
            source = reuse.get(tuning.fingerprint(config)) if reuse else None
            began = time.perf_counter()
            if source is not None:
                summary, records = tuning.copy_run(source, folder, config)
                seconds = float(summary.get("wall_time_s") or 0.0)
            else:
                result = run(config, out_dir=folder, observer=callback, progress=progress)
                summary, records = result.summary, result.records
                seconds = time.perf_counter() - began
            outcomes.append(Outcome(label, config.seed, config, summary, records, folder, seconds))
            if log is not None:
                s = summary
                how = f"copied from {source}" if source is not None else f"{seconds:.1f} s"
                metric = (s.get("metric") or {}).get("name", "accuracy")  # eval.metric: accuracy, mse, perplexity, ...
                log(f"[{index}/{len(configs)}] {label} seed={config.seed}: {s.get('status', 'finished')} "
                    f"merged={fmt(s.get(f'merged_test_{metric}'))} local={fmt(s.get(f'mean_local_test_{metric}'))} "
                    f"MB={(s.get('bytes_sent') or 0) / 1e6:.2f} "
                    f"({how}) -> {folder}")
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return outcomes


def _start_ray_once(configs: Sequence[Config]) -> bool:
    ray_configs = [config for config in configs if config.runtime.engine == "ray"]
    if not ray_configs:
        return False
    from raygossip.engines.ray_engine import ensure_ray

    return ensure_ray(ray_configs[0])


# ---------------------------------------------------------------- tables


def fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def plus_minus(mean: float | None, std: float | None, spec: str = ".4f") -> str:
    """'mean ± std' over seeds; 'mean (1 seed)' where one seed gives no spread; 'n/a' where nothing is known."""
    if mean is None:
        return "n/a"
    return f"{mean:{spec}} (1 seed)" if std is None else f"{mean:{spec}} ± {std:{spec}}"


def pm(values: Sequence[float | None], digits: int = 4) -> str:
    """plus_minus of the values' mean_std, with `digits` decimals."""
    return plus_minus(*mean_std(values), f".{digits}f")


def by_label(outcomes: Sequence[Outcome]) -> dict[str, list[Outcome]]:
    """Outcomes grouped by variant label, in the order the variants were given."""
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(outcome.label, []).append(outcome)
    return groups


Column = tuple[str, Callable[[list[Outcome]], str]]


def summary_column(header: str, key: str, digits: int = 4) -> Column:
    """A column showing mean ± std over seeds of one summary.json number."""
    return header, lambda runs: pm([run.summary.get(key) for run in runs], digits)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def summary_table(outcomes: Sequence[Outcome], extra: Sequence[Column] = ()) -> str:
    """The Markdown table every scenario ends with: one row per variant, mean ± std over seeds.

    merged acc is the summary's merged_test_accuracy: after the final merge where it is enabled, else the
    accuracy the average of the agents' models would have (the counterfactual merge). mean local acc is
    the agents' own models at the end, before any merge. MB sent counts every byte put on the wire.
    """
    headers = ["label", "seeds", "merged acc", "mean local acc", "final merge", "MB sent", *[h for h, _ in extra]]
    rows = []
    for label, runs in by_label(outcomes).items():
        seeds = ",".join(str(run.seed) for run in runs)
        unfinished = [run.seed for run in runs if run.summary.get("status", "finished") != "finished"]
        if unfinished:  # diverged (or aborted) runs count with their last numbers, and say so
            seeds += f" (not finished: {','.join(map(str, unfinished))})"
        merge = "yes" if runs[0].config.schedule.final_merge.enabled else "no"
        megabytes = statistics.fmean(run.summary.get("bytes_sent") or 0 for run in runs) / 1e6
        rows.append([label, seeds, pm([r.summary.get("merged_test_accuracy") for r in runs]),
                     pm([r.summary.get("mean_local_test_accuracy") for r in runs]), merge, f"{megabytes:.2f}",
                     *[cell(runs) for _, cell in extra]])
    return markdown(headers, rows)


def curve_table(outcomes: Sequence[Outcome], key: str = "merged_test_accuracy", columns: int = 10) -> str:
    """key over training (metrics records, mean over seeds) per variant, at up to `columns` evaluation points."""
    groups = by_label(outcomes)
    epochs = sorted({round(record["epoch"], 3) for runs in groups.values() for run in runs for record in run.records})
    if len(epochs) > columns:
        picks = {round(i * (len(epochs) - 1) / (columns - 1)) for i in range(columns)}
        epochs = [epochs[i] for i in sorted(picks)]
    rows = []
    for label, runs in groups.items():
        cells = []
        for epoch in epochs:
            values = [r[key] for run in runs for r in run.records if round(r["epoch"], 3) == epoch and r.get(key) is not None]
            cells.append(fmt(statistics.fmean(values)) if values else "")
        rows.append([label, *cells])
    return markdown(["label \\ epoch", *[f"{e:g}" for e in epochs]], rows)


# ---------------------------------------------------------------- command line


def parse_args(scenario: str, description: str, argv: Sequence[str] | None = None,
               engines: Sequence[str] = ENGINES,
               extend: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """--seeds, --scale, --out, --engine, --set, --threads, --progress, shared by every scenario script.

    `extend` adds a scenario's own options to the parser.
    """
    parser = argparse.ArgumentParser(prog=f"python -m scenarios {scenario}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED", help="seeds (default: 0)")
    parser.add_argument("--scale", choices=SCALES, default="cpu",
                        help="smoke: seconds on digits (CI); cpu: real MNIST, minutes here (default); "
                             "paper: the papers' settings from configs/papers/ (GPU)")
    parser.add_argument("--out", type=Path, default=Path("runs") / scenario,
                        help=f"one folder per run is written below it (default: runs/{scenario})")
    parser.add_argument("--engine", choices=list(engines), default=None,
                        help="runtime.engine for every run (default: each config's own)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the base config before the variants apply, e.g. "
                             "--set data.root=/data (repeatable)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in this process (default 1; 0: torch's default)")
    parser.add_argument("--progress", action="store_true", help="show each run's progress bar")
    if extend is not None:
        extend(parser)
    return parser.parse_args(argv)


def finish(scenario: str, args: argparse.Namespace, outcomes: Sequence[Outcome], text: str) -> None:
    """Print the scenario's tables and keep a copy next to the run folders (out.md), outside out/."""
    print()
    print(text, end="")
    out = Path(args.out)
    report = out.parent / f"{out.name}.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    seeds = " ".join(str(s) for s in args.seeds)
    header = f"# {scenario}: scale {args.scale}, seeds {seeds}, {len(outcomes)} runs under {args.out}\n\n"
    report.write_text(header + text)
    total = sum(outcome.seconds for outcome in outcomes)
    print(f"\n{len(outcomes)} runs in {total:.0f} s; run folders under {args.out} "
          f"(compare them with: raygossip compare {args.out}/*); tables also in {report}")


def main_guard(body: Callable[[], int]) -> int:
    """Run a scenario's main body; a UserError is one line on stderr and exit status 2."""
    try:
        return body()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def threads_arg(args: argparse.Namespace) -> int | None:
    return None if args.threads == 0 else args.threads


@dataclass(frozen=True)
class Tuning:
    """The tune-then-run hook: a `raygossip sweep` on validation accuracy (scenarios/tuning.py) picks the step sizes,
    then the scenario's variants run with `picks=` and reuse the sweep's trials; --no-tune skips the sweep."""

    base: Callable[[argparse.Namespace], dict]  # the config mapping the sweep tunes
    grid: Callable[[argparse.Namespace, dict], dict[str, list]]  # (args, base) -> the sweep's grid
    picks: Callable[[dict, argparse.Namespace], Any]  # (trials.json, args) -> what variants(picks=...) takes
    table: Callable[[dict], str]  # the sweep's table, printed above the scenario's own
    untuned: str  # what --no-tune runs with, for its help
    seeds: Sequence[int] = (0,)
    metric: str = tuning.METRIC  # the record key the sweep ranks on
    reject_diverging: float | None = None  # raygossip sweep --reject-diverging FACTOR (None: off)


@dataclass(frozen=True)
class Scenario:
    """One `python -m scenarios NAME`: its variants over seeds, its tables, and the options only it has.

    variants(scale, overrides, **extra) builds the runs, extra being the options named in `options` (added to the
    parser by `extend`) and `picks` where there is a `tuning` hook; report(outcomes) is the text finish() prints and
    keeps. engine(args) picks runtime.engine for every run and may refuse the user's choice with a UserError (default:
    --engine as given); observer is passed on to run_variants. Calling it with argv returns the exit status.
    """

    name: str
    doc: str
    variants: Callable[..., Sequence[Variant]]
    report: Callable[[Sequence[Outcome]], str]
    extend: Callable[[argparse.ArgumentParser], None] | None = None
    options: Sequence[str] = ()
    engine: Callable[[argparse.Namespace], str | None] | None = None
    observer: Callable[[str, int], Observer | None] | None = None
    tuning: Tuning | None = None

    def __call__(self, argv: Sequence[str] | None = None) -> int:
        return run_scenario(self, argv)


def _tuning_options(hook: Tuning) -> Callable[[argparse.ArgumentParser], None]:
    """The options every tuned scenario takes: where the sweep goes, and skipping it."""
    def extend(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--tune-out", type=Path, default=None,
                            help="the tuning sweep's folder (default: OUT-tune); a finished sweep there is reused")
        parser.add_argument("--no-tune", action="store_true", help=f"skip tuning: {hook.untuned}")
    return extend


def tune_first(hook: Tuning, args: argparse.Namespace) -> tuple[Any, dict | None, str]:
    """(picks, reusable runs, the sweep's table) of the tuning sweep, or (None, None, "") with --no-tune."""
    if args.no_tune:
        return None, None, ""
    base = hook.base(args)
    tune_out = args.tune_out or args.out.parent / f"{args.out.name}-tune"
    trials = tuning.tune(base, hook.grid(args, base), tune_out, hook.seeds, hook.metric, hook.reject_diverging)
    text = (f"Tuning sweep ({tune_out}), ranked on {hook.metric}, seeds {' '.join(map(str, hook.seeds))}:\n\n"
            + hook.table(trials) + "\n")
    return hook.picks(trials, args), tuning.reusable_runs(trials), text


def run_scenario(scenario: Scenario, argv: Sequence[str] | None) -> int:
    """Parse the shared options and the scenario's own, tune first where it has a hook, run its variants over the
    seeds and write its tables. Returns the exit status (2 and one line on stderr for a UserError)."""
    extensions = [e for e in (scenario.extend, scenario.tuning and _tuning_options(scenario.tuning)) if e]
    args = parse_args(scenario.name, scenario.doc, argv,
                      extend=lambda parser: [extension(parser) for extension in extensions])

    def body() -> int:
        chosen = args.engine if scenario.engine is None else scenario.engine(args)
        extra = {name: getattr(args, name) for name in scenario.options}
        reuse, text = None, ""
        if scenario.tuning is not None:
            extra["picks"], reuse, text = tune_first(scenario.tuning, args)
        runs = scenario.variants(args.scale, args.overrides, **extra)
        outcomes = run_variants(runs, args.seeds, args.out, engine=chosen, observer=scenario.observer,
                                threads=threads_arg(args), progress=args.progress, reuse=reuse)
        finish(scenario.name, args, outcomes, text + scenario.report(outcomes))
        return 0

    return main_guard(body)
