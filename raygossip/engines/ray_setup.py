"""What an actor process needs before it hosts agents: the data as numpy, pinned threads, its device, its env."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch

from raygossip.data.datasets import Dataset, Split
from raygossip.task import Task

# Messages up to this size (the default and largest runtime.inline_bytes) travel by value inside the deliver call
# (one RPC, nothing to fetch); larger ones are put into the object store once and every receiver gets a reference
# (where the two ways cost the same: bench/README.md).
INLINE_BYTES = 1 << 20
INLINE_LIMIT = INLINE_BYTES + (64 << 10)  # Ray's max_direct_call_object_size for that: + room for the envelope


def actor_env(threads: int) -> dict[str, str]:
    """Environment of actor worker processes on a cluster this driver did not start: native thread pools
    pinned to the CPU share, and Ray's inline limit for call arguments raised to INLINE_LIMIT (else Ray
    would put larger arguments into the object store itself, once per receiver)."""
    pinned = str(max(1, threads))
    return {"OMP_NUM_THREADS": pinned, "MKL_NUM_THREADS": pinned, "OPENBLAS_NUM_THREADS": pinned,
            "RAY_max_direct_call_object_size": str(INLINE_LIMIT)}


def process_start_time() -> float | None:
    """When this process started (epoch seconds), from /proc on Linux; None elsewhere."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            booted = time.time() - float(uptime.read().split()[0])
        return booted + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def pin_threads(threads: int) -> None:
    """torch intra-op threads to the CPU share; one inter-op thread (an agent runs one op at a time)."""
    torch.set_num_threads(max(1, threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass


def dataset_to_numpy(dataset: Dataset, test_x: torch.Tensor, test_y: torch.Tensor, task: Task | None = None
                     ) -> dict[str, Any]:
    """What every actor needs: in-memory splits as numpy (zero-copy through the object store); a lazily read
    training split as its (small) dataset object, which each actor indexes itself; the run's resolved user code."""
    train = dataset.train
    arrays = {"name": dataset.name, "num_classes": dataset.num_classes, "input_shape": tuple(dataset.input_shape),
              "augment": dataset.augment, "test_x": test_x.numpy(), "test_y": test_y.numpy(),
              "task": None if task is None else dataclasses.replace(task, loader=None)}
    if isinstance(train, Split):
        arrays.update(train_x=train.x.numpy(), train_y=train.y.numpy())
    else:
        arrays["train_lazy"] = train
    return arrays


def dataset_from_numpy(arrays: dict[str, Any]) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """Inverse of dataset_to_numpy (the task is arrays["task"])."""
    test_x, test_y = torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"])
    train = arrays.get("train_lazy") or Split(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]))
    dataset = Dataset(
        name=arrays["name"], train=train,
        test=Split(test_x, test_y), num_classes=arrays["num_classes"], input_shape=tuple(arrays["input_shape"]),
        augment=arrays["augment"],
    )
    return dataset, test_x, test_y


def pick_device(requested: str, num_gpus: float) -> torch.device:
    """The device Ray assigned (a GPU share when num_gpus > 0), else CPU."""
    if requested != "auto":
        return torch.device(requested)
    if num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
    return torch.device("cpu")


def user_modules(setup: Any) -> list[str]:
    """The modules of the run's user code an actor imports: its task's, and a lazily read dataset's class."""
    modules = set(setup.task.modules()) if setup.task is not None else set()
    source = getattr(setup.dataset.train, "source", None)
    module = type(source).__module__ if source is not None else None
    if module and module != "__main__" and not module.startswith(("raygossip", "torch")):
        modules.add(module)
    return sorted(modules)


def check_user_modules(modules: list[str], runtime_env: dict | None) -> None:
    """Import the user's modules in a task on every alive node (with the actors' runtime_env) before any agent
    starts; the first that fails is one UserError naming the module and the node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raygossip.errors import UserError
    from raygossip.registry import one_line
    from raygossip.usercode import missing_modules

    if not modules:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(missing_modules)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    calls = {node["NodeManagerAddress"]: probe.options(
        runtime_env=runtime_env, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
    ).remote(modules) for node in nodes}
    hint = "give its folder or file in runtime.py_modules (--py-module) or runtime.working_dir (--working-dir)"
    for address, call in calls.items():
        try:
            missing = ray.get(call)
        except Exception as err:  # the runtime_env itself could not be set up there (a path Ray cannot ship, ...)
            raise UserError("runtime.py_modules", f"user code could not be set up on node {address}: "
                                                  f"{one_line(err)[:300]}") from None
        if missing:
            raise UserError("runtime.py_modules", f"module {missing[0]} could not be imported on node {address}; "
                                                  f"{hint}")


def upload_user_code(env: dict) -> dict:
    """runtime.py_modules and runtime.working_dir with local paths uploaded to the cluster (GCS) and replaced by
    their URIs: an actor's own runtime_env takes only URIs (Ray uploads local paths itself only for ray.init's
    job-wide runtime_env, which a Ray we joined does not have). Uses Ray's own upload helpers (private API)."""
    if not env:
        return env
    import tempfile

    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    from raygossip.errors import UserError
    from raygossip.registry import one_line

    scratch = tempfile.mkdtemp(prefix="raygossip-usercode-")
    try:
        env = upload_py_modules_if_needed(dict(env), include_gitignore=True, scratch_dir=scratch)
        return upload_working_dir_if_needed(env, include_gitignore=True, scratch_dir=scratch)
    except Exception as err:  # a path Ray cannot package (too large, unreadable, ...)
        field = "runtime.py_modules" if "py_modules" in env else "runtime.working_dir"
        raise UserError(field, f"could not ship user code to the cluster: {one_line(err)[:300]}") from None

