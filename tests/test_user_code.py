"""A user's own model, data, loss and metric (issue 23): from a module outside the project, not installed, on both
engines; bad references fail early in one line; the same run on Ray in sync equals the reference engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import raygossip.models
from raygossip.api import run
from raygossip.config import Config, from_dict, to_dict
from raygossip.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# The user's module: written into a temporary folder at test time (outside the project, never installed).
USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset


def net(hidden=16):
    return nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def bn_net(num_classes, input_shape, *, hidden=16):
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def blobs(n=480, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 5, generator=g) + 1.5 * y[:, None].float()
    return TensorDataset(x[:384], y[:384]), TensorDataset(x[384:], y[384:])


class Lazy(Dataset):
    """Samples made on demand from their index: nothing is held in memory."""

    def __init__(self, n, seed):
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        return torch.randn(5, generator=g) + 1.5 * (i % 3), i % 3


def lazy():
    return Lazy(384, 0), Lazy(96, 1)


def regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(480, 5, generator=g)
    y = x @ torch.arange(5.0) + 0.1 * torch.randn(480, generator=g)
    return TensorDataset(x[:384], y[:384]), TensorDataset(x[384:], y[384:])


def linear():
    return nn.Linear(5, 1)


def parity(sample):
    return int(sample[1]) % 2


def l1(outputs, batch):
    return (outputs.reshape(batch[1].shape) - batch[1]).abs().mean()


def mae(outputs, batch):
    return (outputs.reshape(batch[1].shape) - batch[1]).abs().mean()


mae.direction = "min"


def tokens(n=256, length=12, vocab=7):
    """Sequences of a counting grammar: each token is the previous + 1 (mod vocab); target: the next tokens."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    seq = (start + torch.arange(length + 1)) % vocab
    x, y = seq[:, :-1], seq[:, 1:]
    return TensorDataset(x[:192], y[:192]), TensorDataset(x[192:], y[192:])


def bigram(num_classes, input_shape, *, width=16):
    return nn.Sequential(nn.Embedding(num_classes, width), nn.Linear(width, num_classes))


def first_token(sample):
    return int(sample[0][0])


def broken_factory():
    raise RuntimeError("no weights for you")


def not_a_model():
    return 42


def broken_loader():
    raise FileNotFoundError("corpus.txt")


def wrong_loader():
    return [1, 2, 3]


def wide_net():
    return nn.Linear(7, 3)
'''


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    """A folder holding the user's module `mymodels_h1` (a fresh name, so no earlier import hides it)."""
    folder = tmp_path / "usercode"
    folder.mkdir()
    (folder / "mymodels_h1.py").write_text(USER_MODULE)
    yield folder
    sys.modules.pop("mymodels_h1", None)


def user_config(user_dir: Path, **sections) -> Config:
    """A small run of the user's module on the reference engine (py_modules: how it finds the module)."""
    data = {"data": {"name": "mymodels_h1:blobs", "partition": {"kind": "dirichlet"}},
            "model": {"name": "mymodels_h1:net"}, "agents": {"count": 4},
            "train": {"epochs": 6, "batch_size": 16, "lr": 0.1}, "eval": {"every": 1},
            "runtime": {"engine": "reference", "progress": False, "py_modules": [str(user_dir / "mymodels_h1.py")]}}
    for section, values in sections.items():
        node = data.setdefault(section, {})
        for key, value in values.items():
            node[key] = value if not isinstance(value, dict) else {**node.get(key, {}), **value}
    return from_dict(Config, data)


# ---------------------------------------------------------------- the reference engine, every kind of reference


def test_a_user_model_and_in_memory_data_by_import_path_train(user_dir):
    result = run(user_config(user_dir))
    assert result.summary["merged_test_accuracy"] > 0.6  # three well separated blobs
    assert result.summary["metric"] == {"name": "accuracy", "direction": "max"}


def test_lazy_data_is_read_by_index_and_partitioned_by_its_labels(user_dir):
    result = run(user_config(user_dir, data={"name": "mymodels_h1:lazy"}))
    assert result.summary["heterogeneity"]["num_classes"] == 3
    assert result.summary["merged_test_accuracy"] > 0.6


def test_regression_with_mse_names_its_records_by_the_metric(user_dir):
    config = user_config(user_dir, data={"name": "mymodels_h1:regression", "partition": {"kind": "iid"}},
                         model={"name": "mymodels_h1:linear"}, train={"loss": "mse", "lr": 0.02, "epochs": 4},
                         eval={"metric": "mse"})
    result = run(config)
    assert result.summary["metric"] == {"name": "mse", "direction": "min"}
    assert "merged_test_accuracy" not in result.summary and "merged_test_accuracy" not in result.records[-1]
    first, last = result.records[0]["merged_test_mse"], result.records[-1]["merged_test_mse"]
    assert last < first and "mean_local_test_mse" in result.records[-1]


def test_a_user_loss_and_metric_by_import_path(user_dir):
    config = user_config(user_dir, data={"name": "mymodels_h1:regression", "partition": {"kind": "iid"}},
                         model={"name": "mymodels_h1:linear"}, train={"loss": "mymodels_h1:l1", "lr": 0.02},
                         eval={"metric": "mymodels_h1:mae"})
    result = run(config)
    assert result.summary["metric"] == {"name": "mae", "direction": "min"}
    assert result.records[-1]["merged_test_mae"] < result.records[0]["merged_test_mae"]


def test_by_key_groups_any_data_and_label_partitioners_say_when_there_are_no_labels(user_dir):
    result = run(user_config(user_dir, data={"name": "mymodels_h1:lazy",
                                             "partition": {"kind": "by_key", "key": "mymodels_h1:parity"}}))
    assert result.summary["heterogeneity"]["classes_per_agent"]["min"] < 3  # agents hold few parities
    regression = {"name": "mymodels_h1:regression", "partition": {"kind": "dirichlet"}}
    with pytest.raises(UserError, match="data.partition.kind: dirichlet splits by class label"):
        run(user_config(user_dir, data=regression, model={"name": "mymodels_h1:linear"}, train={"loss": "mse"},
                        eval={"metric": "mse"}))


def test_python_objects_registered_names_and_closures(user_dir):
    """run(model=, data=) with functions of a script (closures here, as a __main__ would give) and a registered
    name; the config records what ran."""
    hidden = 8

    def factory(num_classes, input_shape):
        return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def loader():
        g = torch.Generator().manual_seed(1)
        y = torch.randint(0, 2, (200,), generator=g)
        x = torch.randn(200, 5, generator=g) + 2 * y[:, None].float()
        return torch.utils.data.TensorDataset(x[:160], y[:160]), torch.utils.data.TensorDataset(x[160:], y[160:])

    config = user_config(user_dir)
    result = run(config, model=factory, data=loader)
    assert result.summary["merged_test_accuracy"] > 0.6
    raygossip.models.register("h1_tiny")(factory)
    try:
        again = run(user_config(user_dir, model={"name": "h1_tiny"}), data=loader)
        assert again.summary["merged_test_accuracy"] == result.summary["merged_test_accuracy"]
    finally:
        raygossip.models.MODELS.pop("h1_tiny")


def test_a_token_model_learns_next_tokens_and_reports_perplexity(user_dir):
    """Language modelling: token ids in, (N, T, V) logits out, next_token loss, perplexity (lower is better); the
    vocabulary (num_classes) is read from the token ids; by_key groups sequences by their first token."""
    config = user_config(user_dir, data={"name": "mymodels_h1:tokens",
                                         "partition": {"kind": "by_key", "key": "mymodels_h1:first_token"}},
                         model={"name": "mymodels_h1:bigram"}, train={"loss": "next_token", "lr": 0.5},
                         eval={"metric": "perplexity"})
    result = run(config)
    assert result.summary["metric"] == {"name": "perplexity", "direction": "min"}
    first, last = result.records[0]["merged_test_perplexity"], result.records[-1]["merged_test_perplexity"]
    assert last < first < 7.5 and result.summary["merged_test_perplexity"] < 2.0  # 7 tokens: 7 is a blind guess


# ---------------------------------------------------------------- bad references: one line, before any Ray process

BAD = {
    "model.name": [{"model": {"name": "no_such_module_h1:net"}}, {"model": {"name": "mymodels_h1:nothing"}},
                   {"model": {"name": "mymodels_h1:broken_factory"}}, {"model": {"name": "mymodels_h1:not_a_model"}},
                   {"model": {"name": "mymodels_h1:wide_net"}}, {"model": {"name": "resnet"}}],
    "model.hidden": [{"model": {"hidden": [8]}}],
    "data.name": [{"data": {"name": "mymodels_h1:broken_loader"}}, {"data": {"name": "mymodels_h1:wrong_loader"}},
                  {"data": {"name": "mymodels_h1:nope"}}],
    "train.loss": [{"train": {"loss": "mse"}}, {"train": {"loss": "hinge"}}, {"train": {"loss": "mymodels_h1:x"}}],
    "eval.metric": [{"eval": {"metric": "no_such_module_h1:f"}}],
    "data.partition.key": [{"data": {"partition": {"kind": "by_key"}}}],
    "runtime.py_modules[0]": [{"runtime": {"py_modules": ["/no/such/folder"]}}],
}

PROBE = textwrap.dedent('''
    import json, sys
    import ray
    from raygossip.api import run
    from raygossip.config import Config, from_dict, to_dict
    from raygossip.errors import UserError
    out = []
    for case in json.loads(sys.argv[1]):
        try:
            run(from_dict(Config, case))
            out.append(None)
        except UserError as error:
            out.append(str(error))
    print(json.dumps({"errors": out, "ray": ray.is_initialized()}))
''')


def test_every_bad_reference_is_one_line_naming_its_field_before_ray_starts(user_dir):
    cases, fields = [], []
    for field, overrides in BAD.items():
        for override in overrides:
            data = to_dict(user_config(user_dir, **override))
            data["runtime"]["engine"] = "ray"
            cases.append(data)
            fields.append(field)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], capture_output=True, text=True,
                          env=env, cwd=user_dir.parent, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["ray"] is False  # no Ray process was started for any of them
    for field, error in zip(fields, got["errors"]):
        assert error is not None and error.startswith(f"{field}: "), (field, error)
        assert "\n" not in error and "Traceback" not in error


def test_the_cli_prints_a_bad_reference_as_one_line(user_dir, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(json.dumps({"model": {"name": "mymodels_h1:broken_factory"}, "data": {"name": "mymodels_h1:blobs"},
                                  "runtime": {"py_modules": [str(user_dir / "mymodels_h1.py")]}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "raygossip.cli", "run", str(config), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "model.name" in lines[0] and "no weights for you" in lines[0]


# ---------------------------------------------------------------- resume (reference engine)


def test_a_user_model_resumes_from_its_checkpoint_to_the_same_parameters(user_dir, tmp_path):
    from safetensors.torch import load_file

    from raygossip.api import resume

    whole = run(user_config(user_dir, model={"name": "mymodels_h1:bn_net"}), out_dir=tmp_path / "whole")
    checkpointed = user_config(user_dir, model={"name": "mymodels_h1:bn_net"}, runtime={"checkpoint_every": 5})
    run(checkpointed, out_dir=tmp_path / "cut")
    resumed = resume(tmp_path / "cut")
    assert resumed.summary["merged_test_accuracy"] == whole.summary["merged_test_accuracy"]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- the Ray engine: user code shipped to the actors


def ray_user_config(user_dir: Path, **runtime) -> Config:
    """8 agents of the user's module on Ray, the module shipped with runtime.py_modules (a single .py file)."""
    return user_config(user_dir, agents={"count": 8}, train={"epochs": 4},
                       runtime={"engine": "ray", "num_cpus_per_agent": 0.25, "wait_timeout_s": 60.0, **runtime})


def ray_run(config: Config):
    from raygossip.engines.common import prepare
    from raygossip.engines.ray_engine import RayEngine

    from test_ray_engine import wait_for_idle_cluster

    wait_for_idle_cluster()
    engine = RayEngine(config, prepare(config))
    try:
        return engine, engine.run(progress=False)
    except BaseException:
        engine.close()
        raise


def test_a_user_module_outside_the_project_runs_async_with_4_agents_per_actor(ray_cluster, user_dir):
    engine, outcome = ray_run(ray_user_config(user_dir, mode="async", agents_per_actor=4))
    try:
        assert "aborted" not in outcome
        assert outcome["extra"]["placement"]["actors"] == 2
        records = outcome["records"]
        assert [r["epoch"] for r in records] == [1.0, 2.0, 3.0, 4.0]
        assert records[-1]["train_loss"] < records[0]["train_loss"] and 0 <= outcome["merged_accuracy"] <= 1
    finally:
        engine.close()


@pytest.mark.parametrize("agents_per_actor", [1, 4])
def test_sync_on_ray_equals_the_reference_engine_bit_for_bit_with_a_user_model(ray_cluster, user_dir,
                                                                              agents_per_actor):
    from raygossip.engines.reference import ReferenceEngine

    config = ray_user_config(user_dir, agents_per_actor=agents_per_actor)
    config = from_dict(Config, {**to_dict(config), "model": {"name": "mymodels_h1:bn_net"},
                                "data": {"name": "mymodels_h1:lazy", "partition": {"kind": "dirichlet"}}})
    reference = ReferenceEngine(config)
    expected = reference.run(progress=False)
    engine, outcome = ray_run(config)
    try:
        for got, want in zip(engine.agent_vectors(), reference.agent_vectors(), strict=True):
            assert torch.equal(got, want)
        assert [r["merged_test_accuracy"] for r in outcome["records"]] == \
               [r["merged_test_accuracy"] for r in expected["records"]]
        assert outcome["merged_accuracy"] == expected["merged_accuracy"]
        merged = reference.merged_state_dict()
        assert any("running_mean" in name for name in merged)  # the user's batch norm, re-estimated after the merge
        for name, tensor in engine.merged_state_dict().items():
            assert torch.equal(tensor, merged[name]), name
    finally:
        engine.close()


def test_a_killed_agent_of_a_user_model_restarts(ray_cluster, user_dir):
    config = ray_user_config(user_dir, agents_per_actor=2, snapshot_every=3)
    config = from_dict(Config, {**to_dict(config), "faults": {"kill": [{"agent": 1, "round": 5}]}})
    engine, outcome = ray_run(config)
    try:
        failures = {f["agent"]: f["action"] for f in outcome["extra"]["failures"]}
        assert failures == {0: "restarted", 1: "restarted"}  # agent 0 shares agent 1's actor
        assert "aborted" not in outcome and len(outcome["records"]) == 4
    finally:
        engine.close()


def test_a_module_the_workers_cannot_import_is_one_line_naming_it_and_the_node(ray_cluster, user_dir, monkeypatch):
    """The driver imports the module (it is on its path), the workers do not have it (no py_modules)."""
    monkeypatch.syspath_prepend(str(user_dir))
    config = ray_user_config(user_dir, py_modules=[])
    with pytest.raises(UserError) as caught:
        ray_run(config)
    text = str(caught.value)
    assert text.startswith("runtime.py_modules: module mymodels_h1 (ModuleNotFoundError") and "\n" not in text
    assert "could not be imported on node" in text


def test_batched_steps_stack_a_user_chain_and_step_another_loss_one_by_one(user_dir):
    from raygossip.core.agent import AgentCore
    from raygossip.core.batched import BatchedSteps
    from raygossip.engines.common import prepare

    setup = prepare(user_config(user_dir, runtime={"agents_per_actor": 2, "batched_steps": True}))
    cores = [AgentCore(i, setup.config, setup.dataset, setup.shards[i], 10, task=setup.task) for i in range(2)]
    assert BatchedSteps(cores).reason is None  # the user's Linear-ReLU-Linear chain steps stacked
    config = user_config(user_dir, data={"name": "mymodels_h1:regression", "partition": {"kind": "iid"}},
                         model={"name": "mymodels_h1:linear"}, train={"loss": "mse"}, eval={"metric": "mse"})
    setup = prepare(config)
    cores = [AgentCore(i, setup.config, setup.dataset, setup.shards[i], 10, task=setup.task) for i in range(2)]
    assert BatchedSteps(cores).reason == "the loss is mse (stacked steps take cross_entropy only)"


def test_compare_tensorboard_and_sweep_use_the_metric_name_and_direction(user_dir, tmp_path):
    from raygossip.compare import group_runs, load_runs, markdown_table, table
    from raygossip.sweep import task_metrics

    config = user_config(user_dir, data={"name": "mymodels_h1:regression", "partition": {"kind": "iid"}},
                         model={"name": "mymodels_h1:linear"}, train={"loss": "mse", "lr": 0.02},
                         eval={"metric": "mse", "tensorboard": True})
    run(config, out_dir=tmp_path / "run")
    text = markdown_table(table(group_runs(load_runs([tmp_path / "run"]))))
    assert "merged test mse" in text and "n/a" not in text.splitlines()[2].split("|")[3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run"))
    board.Reload()
    assert "mse/merged_test" in board.Tags()["scalars"]
    metrics = task_metrics(config)
    assert metrics["merged_validation_mse"] == "min" and metrics["merged_test_mse"] == "min"
    assert metrics["train_loss"] == "min" and "merged_test_accuracy" not in metrics


def test_a_sweep_on_ray_tune_trains_a_user_model_and_ranks_on_its_metric(ray_cluster, user_dir, tmp_path):
    """Two Tune trials of the user's regression, ranked on merged_validation_mse (lower is better)."""
    from raygossip.sweep import sweep

    data = to_dict(user_config(user_dir, data={"name": "mymodels_h1:regression", "partition": {"kind": "iid"}},
                               model={"name": "mymodels_h1:linear"}, train={"loss": "mse", "epochs": 2},
                               eval={"metric": "mse", "validation_fraction": 0.2}))
    result = sweep(data, {"train.lr": [0.001, 0.03]}, out_dir=tmp_path / "sweep", seeds=[0], progress=False,
                   max_concurrent=1)
    assert [t["status"] for t in result.trials] == ["finished", "finished"]
    table = json.loads((tmp_path / "sweep" / "trials.json").read_text())
    assert table["metric"] == "merged_validation_mse"
    assert table["best"]["settings"] == {"train.lr": 0.03}  # the larger step gets further in 2 epochs


def test_functions_of_a_script_reach_the_ray_actors_by_value(ray_cluster, user_dir):
    """A model factory, loss and metric defined here (as in a script's __main__: not importable by the actors) go
    to the actors by value; the data comes from the user's module (shipped with runtime.py_modules)."""
    from test_ray_engine import wait_for_idle_cluster

    scale = 0.5

    def factory(num_classes, input_shape):
        return nn.Sequential(nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, num_classes))

    def smoothed(outputs, batch):
        return torch.nn.functional.cross_entropy(outputs, batch[1], label_smoothing=scale * 0.1)

    def hit_rate(outputs, batch):
        return (outputs.argmax(-1) == batch[1]).float().mean()

    wait_for_idle_cluster()
    config = ray_user_config(user_dir, agents_per_actor=2)
    result = run(config, model=factory, loss=smoothed, metric=hit_rate)
    assert result.summary["status"] == "finished" and result.summary["metric"]["name"] == "hit_rate"
    assert 0 <= result.summary["merged_test_hit_rate"] <= 1
