"""The `raygossip` command line: run, topology (and the subcommands later issues add)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from pathlib import Path

import yaml

from raygossip.config import ENGINES, Mode
from raygossip.config_io import parse_yaml
from raygossip.api import RunAborted, RunDiverged
from raygossip.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parse_pairs(items: list[str], flag: str) -> dict:
    pairs = {}
    for item in items:
        if "=" not in item:
            raise UserError(flag, f"expected KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            pairs[key] = parse_yaml(raw)
        except yaml.YAMLError:
            raise UserError(f"{flag} {key}", f"value {raw!r} is not valid YAML") from None
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="raygossip", description="Decentralized (gossip) training of PyTorch models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser("run", help="train from a YAML config (no CONFIG: the embedded quickstart)")
    run.add_argument("config", nargs="?", help="YAML config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.lr=0.05 (repeatable)")
    run.add_argument("--engine", choices=ENGINES, help="runtime.engine")
    run.add_argument("--mode", choices=typing.get_args(Mode), help="runtime.mode")
    run.add_argument("--address", help="Ray cluster address (runtime.address; default: RAY_ADDRESS or a local Ray)")
    run.add_argument("--out", help="output folder (default: runs/NAME-TIMESTAMP)")
    run.add_argument("--seed", type=int, help="seed")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--checkpoint-every", type=int, metavar="N",
                     help="write a resumable checkpoint into --out every N communication rounds")
    run.add_argument("--on-failure", choices=["restart", "drop", "abort"],
                     help="runtime.on_failure: what the Ray engine does when an agent dies")
    run.add_argument("--py-module", action="append", default=[], metavar="PATH",
                     help="a folder or .py file of your own code, shipped to every Ray actor (runtime.py_modules; "
                          "repeatable)")
    run.add_argument("--working-dir", metavar="DIR", help="a folder the Ray actors start in and import from "
                                                          "(runtime.working_dir)")
    run.add_argument("--tensorboard", action="store_true",
                     help="eval.tensorboard: TensorBoard event files in the run folder (tensorboard --logdir runs/)")

    resume = sub.add_parser("resume", help="continue a run from its latest checkpoint")
    resume.add_argument("run_dir", help="the run's output folder (holds config.yaml and checkpoint.json)")
    resume.add_argument("--no-progress", action="store_true", help="no progress bar")

    sweep = sub.add_parser("sweep", help="a grid of configs x seeds on Ray Tune: one run folder per trial, "
                                          "best.yaml and a table")
    sweep.add_argument("config", nargs="?", help="YAML config file (no CONFIG: the embedded quickstart)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=[v1,v2,...]",
                       help="values of one config key to search, e.g. --grid gossip.gamma=[0.25,0.5,1] (repeatable)")
    sweep.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED",
                       help="seeds of every config, averaged before configs are ranked (default: 0)")
    sweep.add_argument("--metric", help="record key to rank on (default: merged_validation_accuracy, which needs "
                                        "eval.validation_fraction > 0)")
    sweep.add_argument("--reject-diverging", type=float, nargs="?", const=2.0, default=None, metavar="FACTOR",
                       help="reject a trial whose consensus distance grows by more than FACTOR (default 2) over its "
                            "last quarter of records, or is not finite; its config ranks last")
    sweep.add_argument("--mode", choices=["max", "min"], help="whether higher or lower is better (default: the "
                                                              "metric's)")
    sweep.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo",
                       help="asha stops poor trials early at rungs of --grace-epochs x 2^k epochs")
    sweep.add_argument("--grace-epochs", type=int, default=1, help="ASHA's first rung, in epochs (default: 1)")
    sweep.add_argument("--max-concurrent", type=int, help="at most this many trials at a time")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key of every trial (repeatable)")
    sweep.add_argument("--out", help="output folder (default: runs/sweep-NAME-TIMESTAMP)")
    sweep.add_argument("--no-progress", action="store_true", help="no line per finished trial")

    topo = sub.add_parser("topology", help="print a graph's mixing and spectral properties")
    topo.add_argument("name")
    topo.add_argument("--agents", type=int, required=True)
    topo.add_argument("--weights", choices=["uniform", "metropolis"], default="uniform")
    topo.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    topo.add_argument("--json", action="store_true", help="print one JSON object")

    from raygossip import compare

    compare.add_parser(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from raygossip.api import default_out_dir, run
    from raygossip.config import Config
    from raygossip.config_io import apply_overrides, from_dict, read_yaml
    from raygossip.validation import validate
    from raygossip.presets import quickstart

    data = read_yaml(args.config) if args.config else quickstart()
    overrides = list(args.overrides)
    if args.engine:
        overrides.append(f"runtime.engine={args.engine}")
    if args.mode:
        overrides.append(f"runtime.mode={args.mode}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.no_progress:
        overrides.append("runtime.progress=false")
    if args.checkpoint_every is not None:
        overrides.append(f"runtime.checkpoint_every={args.checkpoint_every}")
    if args.on_failure:
        overrides.append(f"runtime.on_failure={args.on_failure}")
    if args.tensorboard:
        overrides.append("eval.tensorboard=true")
    if args.py_module:
        overrides.append(f"runtime.py_modules={json.dumps(args.py_module)}")
    if args.working_dir:
        overrides.append(f"runtime.working_dir={json.dumps(args.working_dir)}")
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        overrides.append(f"runtime.address={address}")
    config = from_dict(Config, apply_overrides(data, overrides))
    validate(config)
    out = Path(args.out) if args.out else default_out_dir(config)
    print_summary(run(config, out_dir=out).summary, out)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from raygossip.api import resume

    result = resume(args.run_dir, progress=False if args.no_progress else None)
    print_summary(result.summary, Path(args.run_dir))
    return 0


def print_summary(s: dict, out: Path) -> None:
    metric = s.get("metric", {}).get("name", "accuracy")
    local = s.get(f"mean_local_test_{metric}")
    local_text = f"{local:.4f} +- {s[f'std_local_test_{metric}']:.4f}" if local is not None else "n/a"
    print(f"engine={s['engine']} mode={s['mode']} agents={s['agents']} epochs={s['epochs']} rounds={s['rounds']}")
    print(f"merged_test_{metric}={s[f'merged_test_{metric}']:.4f}  mean_local_test_{metric}={local_text}")
    print(f"consensus_distance={s['consensus_distance']:.4g}  bytes_sent={s['bytes_sent']}  "
          f"messages_sent={s['messages_sent']}  wall_time_s={s['wall_time_s']:.1f}")
    failures = s.get("failures") or []
    if failures:
        restarted = sum(f.get("action") == "restarted" for f in failures)
        print(f"failures={len(failures)} restarted={restarted} dropped_agents={s.get('dropped_agents', [])}")
    print(f"results in {out}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from datetime import datetime

    from raygossip.config_io import apply_overrides, read_yaml
    from raygossip.presets import quickstart
    from raygossip.sweep import sweep
    from raygossip.sweep_grid import parse_grid

    data = apply_overrides(read_yaml(args.config) if args.config else quickstart(), list(args.overrides))
    grid = parse_grid(args.grid)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError("--max-concurrent", f"must be >= 1, got {args.max_concurrent}")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{data.get('name', 'run')}-{stamp}"
    result = sweep(data, grid, out_dir=out, seeds=args.seeds, metric=args.metric, mode=args.mode,
                   scheduler=args.scheduler, grace_epochs=args.grace_epochs, max_concurrent=args.max_concurrent,
                   progress=not args.no_progress, reject_diverging=args.reject_diverging)
    print((result.out_dir / "trials.md").read_text().split("\n## Trials")[0].rstrip())
    best = result.best
    print(f"best: {best['label']} ({best['mean']:.4f}); config in {out / 'best.yaml'}, trials in {out}")
    return 0


def cmd_topology(args: argparse.Namespace) -> int:
    from raygossip.algorithms.spectral import spectral_report
    from raygossip.algorithms.topology import build_topology

    from raygossip.config import MAX_AGENTS

    if not 1 <= args.agents <= MAX_AGENTS:
        raise UserError("--agents", f"must be in 1..{MAX_AGENTS}, got {args.agents}")
    topology = build_topology(args.name, args.agents, args.weights, _parse_pairs(args.param, "--param"))
    report = spectral_report(topology)
    if args.json:
        print(json.dumps(report))
    else:
        width = max(len(key) for key in report)
        for key, value in report.items():
            shown = f"{value:.6f}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from raygossip import compare

    return compare.cmd_compare(args)


COMMANDS = {"run": cmd_run, "resume": cmd_resume, "topology": cmd_topology, "compare": cmd_compare,
            "sweep": cmd_sweep}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except RunDiverged as error:
        print(f"raygossip {args.command}: {error}", file=sys.stderr)
        return 4
    except RunAborted as error:
        print(f"raygossip {args.command}: {error}", file=sys.stderr)
        return 3
    except UserError as error:
        print(f"raygossip {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raygossip: interrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
