"""A run's user code: resolve model, data, loss and metric references once in the driver, check them on one batch
before any Ray process starts, and carry them to the actors (with a one-line error where a module is missing)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Any

import torch

from raygossip.config import Config
from raygossip.errors import UserError
from raygossip.registry import add_search_paths, is_import_path, one_line, reference_of
from raygossip.task import LOSSES, METRICS, Metric, Task, as_metric, metric_name

ZOO_MODELS = frozenset(("mlp", "lenet5", "resnet20", "vgg11", "mobilenetv2", "resnet18"))
DIRECTIONS = ("max", "min")


def search_paths(config: Config) -> list[str]:
    """Folders the driver adds to its import path: runtime.working_dir and the parents of local runtime.py_modules."""
    runtime = config.runtime
    paths = [runtime.working_dir] if runtime.working_dir else []
    for module in runtime.py_modules:
        if "://" not in module:  # a local folder or file: its parent holds it
            paths.append(os.path.dirname(os.path.abspath(os.path.expanduser(module.rstrip("/")))))
    return paths


def validate_task_fields(config: Config) -> None:
    """The new task fields, checked without importing user code (config.validate calls this)."""
    if not LOSSES.knows(config.train.loss):
        raise UserError("train.loss", f"must be one of {', '.join(LOSSES)} or an import path package.module:f; "
                                      f"got {config.train.loss!r}")
    if not METRICS.knows(config.eval.metric):
        raise UserError("eval.metric", f"must be one of {', '.join(METRICS)} or an import path package.module:f; "
                                       f"got {config.eval.metric!r}")
    key = config.data.partition.key
    if (config.data.partition.kind == "by_key") != (key is not None):
        raise UserError("data.partition.key", "partition kind by_key needs a key (an import path package.module:f, "
                                              f"f(sample) -> group), and only it takes one; got kind "
                                              f"{config.data.partition.kind!r} and key {key!r}")
    if key is not None and not is_import_path(key):
        raise UserError("data.partition.key", f"must be an import path package.module:f, got {key!r}")
    for k, module in enumerate(config.runtime.py_modules):
        if not isinstance(module, str) or not module.strip():
            raise UserError(f"runtime.py_modules[{k}]", f"must be a folder, file or URI, got {module!r}")
        if "://" not in module and not os.path.exists(os.path.expanduser(module)):
            raise UserError(f"runtime.py_modules[{k}]", f"no such file or folder: {module!r}")
    folder = config.runtime.working_dir
    if folder is not None and "://" not in folder and not os.path.isdir(os.path.expanduser(folder)):
        raise UserError("runtime.working_dir", f"no such folder: {folder!r}")
    for name in ("model", "data"):
        params = getattr(config, name).params
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise UserError(f"{name}.params", f"must be a mapping of names to values, got {params!r}")
    zoo_keys = [key for key in ("norm", "width", "hidden", "groups") if getattr(config.model, key) is not None]
    if zoo_keys and config.model.name not in ZOO_MODELS:
        raise UserError(f"model.{zoo_keys[0]}", f"is a parameter of the zoo's models; {config.model.name!r} takes "
                                                "its own in model.params (set it to null)")
    if config.model.params and config.model.name in ZOO_MODELS:
        raise UserError("model.params", f"the zoo's {config.model.name} takes model.norm, width, hidden, groups; "
                                        "model.params is for a user model")


def _registered_name(registry: dict, obj: Any) -> str | None:
    return next((name for name, value in registry.items() if value is obj), None)


def _named(config: Config, model: Any, data: Any, loss: Any, metric: Any) -> Config:
    """config with the Python objects given to run() written in as names (registered) or module:qualname."""
    from raygossip.data.datasets import DATASETS
    from raygossip.models import MODELS

    def name(registry: dict, obj: Any) -> str:
        return obj if isinstance(obj, str) else (_registered_name(registry, obj) or reference_of(obj))

    replace = dataclasses.replace
    if model is not None:
        config = replace(config, model=replace(config.model, name=name(MODELS, model)))
    if data is not None:
        config = replace(config, data=replace(config.data, name=name(DATASETS, data)))
    if loss is not None:
        config = replace(config, train=replace(config.train, loss=name(LOSSES, loss)))
    if metric is not None:
        label = metric.name if isinstance(metric, Metric) else name(METRICS, metric)
        config = replace(config, eval=replace(config.eval, metric=label))
    return config


def resolve_task(config: Config, *, model: Any = None, data: Any = None, loss: Any = None,
                 metric: Any = None) -> tuple[Config, Task]:
    """Resolve the run's model, data, loss and metric (the config's names or import paths, or Python objects given
    here, which win) into one Task; returns the config naming them too. UserError(field) for what does not resolve."""
    from raygossip.data.datasets import DATASETS, ZOO
    from raygossip.models import MODELS

    config = _named(config, model, data, loss, metric)
    validate_task_fields(config)  # (paths and names, before importing anything)
    add_search_paths(search_paths(config))
    factory = model if callable(model) else MODELS.resolve(config.model.name)
    loader = data if callable(data) else DATASETS.resolve(config.data.name)
    if not callable(factory):
        raise UserError("model.name", f"{config.model.name!r} names a {type(factory).__name__}, not a model factory")
    if not callable(loader):
        raise UserError("data.name", f"{config.data.name!r} names a {type(loader).__name__}, not a data loader")
    loss_ref = config.train.loss
    loss_fn = loss if callable(loss) else LOSSES.resolve(loss_ref)
    if not callable(loss_fn):
        raise UserError("train.loss", f"{loss_ref!r} names a {type(loss_fn).__name__}, not a function")
    if loss_ref in ("cross_entropy", "next_token") and loss is None:
        loss_fn = functools.partial(loss_fn, label_smoothing=config.train.label_smoothing)
    metric_obj = metric if metric is not None else METRICS.resolve(config.eval.metric)
    if not (isinstance(metric_obj, Metric) or callable(metric_obj)):
        raise UserError("eval.metric", f"{config.eval.metric!r} names a {type(metric_obj).__name__}, not a function")
    found = as_metric(metric_obj, metric_name(metric if metric is not None else config.eval.metric))
    if found.direction not in DIRECTIONS:
        raise UserError("eval.metric", f"direction must be max or min, got {found.direction!r}")
    task = Task(model=factory, zoo_model=model is None and config.model.name in ZOO_MODELS, loader=loader,
                zoo_data=data is None and config.data.name in ZOO, loss=loss_fn, loss_name=loss_ref, metric=found)
    return config, task


def task_of(config: Config) -> Task:
    """The Task a config names (without Python objects): where no resolved Task was handed down."""
    return resolve_task(config)[1]


def check_task(config: Config, task: Task, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Run one small training batch through the model, the loss (a scalar with a gradient) and the metric (a number):
    what does not fit is one UserError naming the field, before any Ray process starts."""
    shapes = f"inputs {tuple(batch[0].shape)} {batch[0].dtype}, targets {tuple(batch[1].shape)} {batch[1].dtype}"
    try:
        with torch.random.fork_rng(devices=[]):  # (dropout draws: the run's random stream stays untouched)
            outputs = model(batch[0])
    except Exception as err:  # the user's model cannot take the data
        raise UserError("model.name", f"the model raised {one_line(err)} on a batch of {shapes}") from None
    if not isinstance(outputs, torch.Tensor):
        raise UserError("model.name", f"the model returned {type(outputs).__name__}, not a tensor (on {shapes})")
    where = f"model outputs {tuple(outputs.shape)} and {shapes}"
    try:
        loss = task.loss(outputs, batch)
    except Exception as err:  # outputs and targets do not fit this loss
        raise UserError("train.loss", f"{config.train.loss} raised {one_line(err)} on {where}") from None
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise UserError("train.loss", f"{config.train.loss} must return a scalar tensor with a gradient, got "
                                      f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))} on {where}")
    try:
        with torch.no_grad():
            value = task.metric.fn(outputs.detach(), batch)
            value = [float(v) for v in value] if isinstance(value, tuple) else float(value)
    except Exception as err:  # outputs and targets do not fit this metric
        raise UserError("eval.metric", f"{config.eval.metric} raised {one_line(err)} on {where}") from None
    del value


def missing_modules(modules: list[str]) -> list[str]:
    """`module: error` for each module this process cannot import (what an actor checks first)."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # any import failure, on one line
            missing.append(f"{module} ({one_line(err)})")
    return missing


def actor_runtime_env(config: Config) -> dict:
    """The runtime_env keys that bring user code to the actors: runtime.py_modules and runtime.working_dir."""
    env: dict[str, Any] = {}
    if config.runtime.py_modules:
        env["py_modules"] = [m if "://" in m else os.path.abspath(os.path.expanduser(m)) for m in config.runtime.py_modules]
    if config.runtime.working_dir:
        env["working_dir"] = os.path.expanduser(config.runtime.working_dir)
    return env
