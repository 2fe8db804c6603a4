"""The Python API: run an experiment from a config object, observe its records, keep its outputs.

User code: `run(config, model=factory, data=loader, loss=f, metric=g)` takes Python objects (also functions defined
in a script's __main__) in place of the config's model.name, data.name, train.loss and eval.metric; those fields
also take registered names (raygossip.models.register, raygossip.data.register) and import paths
`package.module:name`. docs/CONFIG.md says what each is called with and returns."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import networkx as nx

from raygossip.algorithms.topology import edges_from_graph
from raygossip.config import Config, TopologyConfig
from raygossip.config_io import dump_yaml
from raygossip.validation import validate
from raygossip.engines.common import Observer, prepare, summary_record
from raygossip.errors import UserError
from raygossip.usercode import resolve_task
from raygossip.results import MetricsLog, read_metrics, save_tensors_atomic, strict_json, write_json_atomic, write_text_atomic


@dataclass
class RunResult:
    """What a finished run returns (and what it wrote under `out_dir`)."""

    summary: dict
    records: list[dict]
    out_dir: Path | None



def make_engine(config: Config, setup=None):
    """The engine named by runtime.engine, built (data loaded, agents created)."""
    setup = setup or prepare(config)
    if config.runtime.engine == "ray":
        from raygossip.engines.ray_engine import RayEngine

        return RayEngine(config, setup)
    from raygossip.engines.reference import ReferenceEngine

    return ReferenceEngine(config, setup)


def default_out_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.name}-{stamp}"


def with_graph(config: Config, graph: nx.Graph) -> Config:
    """`config` on any undirected networkx graph: the `edges` topology of it (keeping topology.weights) and
    agents.count its number of nodes, so config.yaml stays a complete record of the run."""
    count, section = edges_from_graph(graph, config.topology.weights)
    topology = TopologyConfig(**section)
    return dataclasses.replace(config, agents=dataclasses.replace(config.agents, count=count), topology=topology)


def run(config: Config, out_dir: str | Path | None = None, observer: Observer | None = None,
        progress: bool | None = None, graph: nx.Graph | None = None, *, model: Any = None, data: Any = None,
        loss: Any = None, metric: Any = None) -> RunResult:
    """Validate, build the engine, train to the end; write config.yaml, metrics.jsonl, summary.json, model.safetensors.

    graph: any undirected networkx graph to run on instead of config.topology (see with_graph).
    model, data, loss, metric: user code as Python objects (a model factory, a data loader, f(outputs, batch) ->
    loss, f(outputs, batch) -> batch mean), in place of model.name, data.name, train.loss, eval.metric.
    """
    if graph is not None:
        config = with_graph(config, graph)
    config, task = resolve_task(config, model=model, data=data, loss=loss, metric=metric)
    validate(config)
    _check_checkpointing(config, Path(out_dir) if out_dir is not None else None)
    _check_cluster(config)
    setup = prepare(config, task)  # every data, model and schedule error surfaces here, before any folder or Ray process
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", dump_yaml(config))
        (out / "metrics.jsonl").unlink(missing_ok=True)
    return _execute(config, out, observer, progress, resume=None, setup=setup)


def resume(run_dir: str | Path, observer: Observer | None = None, progress: bool | None = None, *, model: Any = None,
           data: Any = None, loss: Any = None, metric: Any = None) -> RunResult:
    """Continue a run from its latest checkpoint (written with runtime.checkpoint_every > 0); model, data, loss and
    metric: the Python objects the run was given (where config.yaml names them in a script's __main__)."""
    from raygossip.checkpoint import load_checkpoint
    from raygossip.validation import load_config

    out = Path(run_dir)
    if not (out / "config.yaml").is_file():
        raise UserError("RUN_DIR", f"{str(out)!r} holds no config.yaml (not a raygossip run folder)")
    config = load_config(out / "config.yaml")
    config, task = resolve_task(config, model=model, data=data, loss=loss, metric=metric)
    run_state, agents = load_checkpoint(out, config)
    if "record_list" in run_state:  # the Ray engine's coordinator keeps them (the driver may have died first)
        previous = run_state["record_list"]
    else:
        previous = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        previous = previous[: run_state["records"]]
    write_text_atomic(out / "metrics.jsonl", "".join(strict_json(r) + "\n" for r in previous))
    return _execute(config, out, observer, progress, resume=(run_state, agents, previous), setup=prepare(config, task))


def _check_checkpointing(config: Config, out: Path | None) -> None:
    if config.runtime.checkpoint_every and out is None:
        raise UserError("runtime.checkpoint_every", "needs an output folder (--out) to write checkpoints into")
    if config.eval.tensorboard and out is None:
        raise UserError("eval.tensorboard", "needs an output folder (--out) to write event files into")


def _check_cluster(config: Config) -> None:
    if config.runtime.engine == "ray" and config.runtime.address is not None:
        from raygossip.engines.cluster import preflight_cluster  # imports Ray: only for a run on a cluster

        preflight_cluster(config)  # a head that is not there or refuses the token: one line, before any folder


class RunAborted(UserError):
    """The run stopped before its end (its outputs so far are kept): an agent died and runtime.on_failure is
    abort, every agent was dropped, or no agent took a step within runtime.wait_timeout_s."""


class RunDiverged(RunAborted):
    """The run stopped because an agent's loss or parameters became non-finite (train.on_divergence: abort); its
    outputs so far are kept, and summary.json says status: diverged."""


def _write_aborted(config: Config, engine, outcome: dict, out: Path | None, wall_time_s: float) -> None:
    """Write summary.json of an aborted run (metrics.jsonl already holds every record so far), then raise."""
    aborted = outcome["aborted"]
    status = aborted.get("status", "aborted")
    summary = {"name": config.name, "engine": engine.name, "status": status, "reason": aborted["reason"],
               "records": len(outcome["records"]), "last": outcome["last"], "wall_time_s": wall_time_s,
               "events": outcome["events"], **outcome.get("extra", {})}
    where = ""
    if out is not None:
        write_json_atomic(out / "summary.json", summary)
        where = f"; what was done so far is in {out}"
    error = RunDiverged if status == "diverged" else RunAborted
    raise error(aborted.get("field", "runtime.on_failure"), f"run {status}: {aborted['reason']}{where}")


def _tensorboard(config: Config, out: Path | None, resume: tuple | None):
    """The run's TensorBoard log (eval.tensorboard), or None; a resumed run drops events past its checkpoint."""
    if not config.eval.tensorboard or out is None:
        return None
    from raygossip.tracking import TensorBoardLog  # imports tensorboard: only when asked for

    previous = resume[2] if resume is not None else None
    return TensorBoardLog(out, config, purge_step=previous[-1]["step"] + 1 if previous else None)


def _execute(config: Config, out: Path | None, observer: Observer | None, progress: bool | None,
             resume: tuple | None, setup=None) -> RunResult:
    log = MetricsLog(out / "metrics.jsonl") if out is not None else None
    started = time.perf_counter()
    engine = make_engine(config, setup)
    board = _tensorboard(config, out, resume)

    def observe(record: dict) -> None:
        if log is not None:
            log.append(record)
        if board is not None:
            board.record(record)
        if observer is not None:
            observer(record)

    try:
        kwargs = {"checkpoint_dir": out} if config.runtime.checkpoint_every else {}
        if resume is not None:
            run_state, agents, previous = resume
            kwargs.update(start_step=engine.restore(run_state, agents), previous_records=previous)
        outcome = engine.run(observe, progress=progress, **kwargs)
        if "aborted" in outcome:
            _write_aborted(config, engine, outcome, out, time.perf_counter() - started)
        summary = summary_record(
            engine=engine.name, setup=engine.setup, last=outcome["last"], merged_after=outcome["merged_accuracy"],
            wall_time_s=time.perf_counter() - started + (resume[0]["wall_time_s"] if resume else 0.0), traffic=engine.traffic(), events=outcome["events"],
            communication_rounds=outcome["last"]["communication_rounds"],
        )
        summary["status"] = "finished"
        summary.update(outcome.get("extra", {}))
        if out is not None:
            save_tensors_atomic(out / "model.safetensors", engine.merged_state_dict(), {"name": config.name})
            write_json_atomic(out / "summary.json", summary)
        if board is not None:
            board.summary(summary)
    finally:
        if board is not None:
            board.close()
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    return RunResult(summary=summary, records=outcome["records"], out_dir=out)
