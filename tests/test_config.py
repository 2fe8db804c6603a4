"""Table tests for the typed config tree: strict loading, range checks, overrides and YAML round trips."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from raygossip import validation
from raygossip.config import Config
from raygossip.config_io import apply_overrides, choices, dump_yaml, from_dict, read_yaml, to_dict
from raygossip.validation import load_config, validate
from raygossip.errors import UserError
from raygossip.presets import quickstart

CHOICES = choices()  # {dotted key: allowed values} of every Literal field
REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def assert_holds(loaded: Any, given: Any, where: str = "") -> None:
    """Every key the mapping `given` sets has that value in `loaded` (a loaded config's to_dict), sections and lists
    of sections key by key; keys it leaves out are the defaults' business."""
    if isinstance(given, dict) and isinstance(loaded, dict):
        for key, value in given.items():
            assert key in loaded, f"{where}.{key} not in the loaded config"
            assert_holds(loaded[key], value, f"{where}.{key}" if where else key)
    elif isinstance(given, list) and given and all(isinstance(item, dict) for item in given):
        assert isinstance(loaded, list) and len(loaded) == len(given), where
        for k, (got, want) in enumerate(zip(loaded, given)):
            assert_holds(got, want, f"{where}[{k}]")
    else:
        assert loaded == given, f"{where}: {loaded!r} != {given!r}"


def nested(dotted: str, value: Any) -> dict:
    """{'a': {'b': value}} for 'a.b'."""
    *parents, leaf = dotted.split(".")
    data: dict = {leaf: value}
    for part in reversed(parents):
        data = {part: data}
    return data


def assert_user_error(error: UserError, field: str) -> None:
    """One line, and it names the field (both as .field and at the start of the text)."""
    text = str(error)
    assert "\n" not in text, text
    assert error.field == field, text
    assert text.startswith(f"{field}: "), text


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "dotted",
    ["trian", "train.lrr", "data.partition.alpah", "schedule.communication.sparse", "runtime.timing.delay",
     "gossip.compressor.k", "eval.local_every"],
)
def test_unknown_key_is_a_user_error_naming_it(dotted):
    with pytest.raises(UserError) as caught:
        load_config(base=nested(dotted, 1))
    assert_user_error(caught.value, dotted)
    assert "unknown key" in caught.value.message


def test_unknown_key_message_lists_the_allowed_keys():
    with pytest.raises(UserError) as caught:
        load_config(base={"train": {"lrr": 0.1}})
    assert "lr" in caught.value.message and "epochs" in caught.value.message


# ---------------------------------------------------------------- wrong types

WRONG_TYPES = [
    ("train.epochs", "ten", "train.epochs"),  # string for int
    ("train.epochs", True, "train.epochs"),  # bool for int
    ("train.epochs", 2.0, "train.epochs"),  # float for int
    ("train.lr", [0.1], "train.lr"),  # list for float
    ("train.lr", "0.1", "train.lr"),  # string for float
    ("train.lr", True, "train.lr"),  # bool for float
    ("train.lr", None, "train.lr"),  # null for a non-optional number
    ("train.lr", float("nan"), "train.lr"),  # not finite
    ("train.lr", float("inf"), "train.lr"),
    ("seed", {"a": 1}, "seed"),  # mapping for a scalar
    ("name", 5, "name"),  # int for str
    ("runtime.progress", "yes", "runtime.progress"),  # string for bool
    ("runtime.progress", 1, "runtime.progress"),  # int for bool
    ("train", "fast", "train"),  # scalar for a section
    ("data.partition", 3, "data.partition"),
    ("model.hidden", 64, "model.hidden"),  # scalar for a list
    ("model.hidden", [64, "a"], "model.hidden[1]"),  # bad item of an optional list: the item is named
    ("train.lr_schedule.milestones", [0.5, "x"], "train.lr_schedule.milestones[1]"),
    ("topology.params", [1, 2], "topology.params"),  # list for a mapping
    ("runtime.timing.slowdown", "fast", "runtime.timing.slowdown"),
    ("eval.test_samples", 1.5, "eval.test_samples"),  # optional int given a float
]


@pytest.mark.parametrize("dotted, value, field", WRONG_TYPES, ids=[f"{d}={v!r}" for d, v, _ in WRONG_TYPES])
def test_wrong_type_is_a_user_error_naming_the_field(dotted, value, field):
    with pytest.raises(UserError) as caught:
        load_config(base=nested(dotted, value))
    assert_user_error(caught.value, field)


def test_ints_are_accepted_where_floats_are():
    config = load_config(base={"train": {"lr": 1, "momentum": 0}})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_the_empty_mapping_gives_the_defaults():
    assert load_config(base={}) == Config()
    assert load_config() == Config()


# ---------------------------------------------------------------- validate(): one row per check

TWO_SQUARES = [[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4]]  # 8 agents, 2 components

# (overrides as a mapping, the field the error must name). Every CHOICES entry and every _check of
# validate() has at least one row; test_every_check_in_validate_has_a_row keeps it that way.
RANGE_ROWS: list[tuple[dict, str]] = [
    # registries and the graph
    (nested("data.name", "imagenet21k"), "data.name"),
    (nested("data.partition.kind", "sorted"), "data.partition.kind"),
    (nested("model.name", "gpt2"), "model.name"),
    (nested("topology.name", "hypercube"), "topology.name"),
    # agents
    (nested("agents.count", 0), "agents.count"),
    (nested("agents.count", -3), "agents.count"),
    # train
    (nested("train.epochs", 0), "train.epochs"),
    (nested("train.batch_size", 0), "train.batch_size"),
    (nested("train.lr", 0), "train.lr"),
    (nested("train.lr", -0.1), "train.lr"),
    (nested("train.momentum", 1.0), "train.momentum"),
    (nested("train.momentum", -0.1), "train.momentum"),
    (nested("train.weight_decay", -1e-4), "train.weight_decay"),
    (nested("train.local_steps", 0), "train.local_steps"),
    (nested("train.steps_per_epoch", 0), "train.steps_per_epoch"),
    (nested("train.lr_schedule.milestones", [0.5, 1.0]), "train.lr_schedule.milestones"),
    (nested("train.lr_schedule.milestones", [0.0]), "train.lr_schedule.milestones"),
    (nested("train.lr_schedule.factor", 0), "train.lr_schedule.factor"),
    (nested("train.lr_schedule.factor", 1.5), "train.lr_schedule.factor"),
    (nested("train.lr_schedule.warmup_epochs", -1), "train.lr_schedule.warmup_epochs"),
    (nested("train.label_smoothing", 1.0), "train.label_smoothing"),
    (nested("train.label_smoothing", -0.1), "train.label_smoothing"),
    (nested("train.grad_clip_value", 0), "train.grad_clip_value"),
    (nested("train.grad_clip_value", -1.0), "train.grad_clip_value"),
    # gossip
    (nested("gossip.gamma", 0), "gossip.gamma"),
    (nested("gossip.gamma", 1.5), "gossip.gamma"),
    (nested("gossip.beta", 1.0), "gossip.beta"),
    (nested("gossip.beta", -0.5), "gossip.beta"),
    ({"gossip": {"rule": "choco", "compressor": {"name": "top_k"}}}, "gossip.compressor.ratio"),
    ({"gossip": {"rule": "choco", "compressor": {"name": "random_k"}}}, "gossip.compressor.ratio"),
    ({"gossip": {"rule": "choco", "compressor": {"name": "top_k", "ratio": 0}}}, "gossip.compressor.ratio"),
    ({"gossip": {"rule": "choco", "compressor": {"name": "random_k", "ratio": 1.5}}}, "gossip.compressor.ratio"),
    ({"gossip": {"rule": "choco", "compressor": {"name": "qsgd"}}}, "gossip.compressor.bits"),
    ({"gossip": {"rule": "adagossip", "compressor": {"name": "qsgd", "bits": 0}}}, "gossip.compressor.bits"),
    ({"gossip": {"rule": "adagossip", "compressor": {"name": "qsgd", "bits": 9}}}, "gossip.compressor.bits"),
    ({"gossip": {"rule": "choco", "compressor": {"name": "top_k", "ratio": 0.1, "index_coding": "rice"}}},
     "gossip.compressor.index_coding"),
    ({"gossip": {"rule": "choco", "compressor": {"name": "qsgd", "bits": 2, "index_coding": "entropy"}}},
     "gossip.compressor.index_coding"),
    ({"label": ""}, "label"),
    ({"label": "  "}, "label"),
    # cross-field: dpsgd sends full models
    ({"gossip": {"rule": "dpsgd", "compressor": {"name": "top_k", "ratio": 0.1}}}, "gossip.compressor.name"),
    ({"gossip": {"compressor": {"name": "sign"}}}, "gossip.compressor.name"),
    # cross-field: compressed gossip needs a static graph
    ({"gossip": {"rule": "choco"}, "topology": {"name": "one_peer_exponential"}}, "topology.name"),
    ({"gossip": {"rule": "adagossip"}, "topology": {"name": "one_peer_exponential"}}, "topology.name"),
    # cross-field: nesterov needs momentum
    ({"train": {"nesterov": True, "momentum": 0.0}}, "train.nesterov"),
    # schedule
    (nested("schedule.averaging_rate.gamma0", 0), "schedule.averaging_rate.gamma0"),
    (nested("schedule.averaging_rate.gamma0", 1.01), "schedule.averaging_rate.gamma0"),
    (nested("schedule.averaging_rate.growth", 0.99), "schedule.averaging_rate.growth"),
    (nested("schedule.averaging_rate.ramp_epochs", 0), "schedule.averaging_rate.ramp_epochs"),
    (nested("schedule.averaging_rate.exponent", 0), "schedule.averaging_rate.exponent"),
    (nested("schedule.communication.p", 0), "schedule.communication.p"),
    (nested("schedule.communication.p", 1.5), "schedule.communication.p"),
    (nested("schedule.communication.start", -0.1), "schedule.communication.start"),
    (nested("schedule.communication.start", 1.1), "schedule.communication.start"),
    (nested("schedule.communication.width", 0), "schedule.communication.width"),
    (nested("schedule.communication.width", 1.5), "schedule.communication.width"),
    (nested("schedule.communication.sparse_every", -1), "schedule.communication.sparse_every"),
    (nested("schedule.final_merge.bn_batches", 0), "schedule.final_merge.bn_batches"),
    # communication phases
    (nested("schedule.communication.phases", [{"until": 0.5}]), "schedule.communication.phases[0].until"),
    (nested("schedule.communication.phases", [{"until": 0.5}, {"until": 0.5}, {"until": 1.0}]),
     "schedule.communication.phases[1].until"),
    (nested("schedule.communication.phases", [{"until": 0.0}, {"until": 1.0}]), "schedule.communication.phases[0].until"),
    (nested("schedule.communication.phases", [{"until": 1.5}]), "schedule.communication.phases[0].until"),
    (nested("schedule.communication.phases", [{"kind": "every"}]), "schedule.communication.phases[0].until"),
    (nested("schedule.communication.phases", [{"until": 1.0, "kind": "often"}]), "schedule.communication.phases[0].kind"),
    (nested("schedule.communication.phases", [{"until": 1.0, "pull": "all"}]), "schedule.communication.phases[0].pull"),
    (nested("schedule.communication.phases", [{"until": 0.5, "p": 0}, {"until": 1.0}]),
     "schedule.communication.phases[0].p"),
    (nested("schedule.communication.phases", [{"until": 1.0, "kind": "window", "width": 0}]),
     "schedule.communication.phases[0].width"),
    (nested("schedule.communication.phases", [{"until": 1.0, "start": 2}]), "schedule.communication.phases[0].start"),
    (nested("schedule.communication.phases", [{"until": 1.0, "sparse_every": -1}]),
     "schedule.communication.phases[0].sparse_every"),
    (nested("schedule.communication.phases", [{"until": 1.0, "junk": 1}]), "schedule.communication.phases[0].junk"),
    ({"schedule": {"communication": {"kind": "late", "phases": [{"until": 1.0}]}}}, "schedule.communication.kind"),
    ({"schedule": {"communication": {"p": 0.5, "phases": [{"until": 1.0}]}}}, "schedule.communication.p"),
    # cross-field: all-reduce averages full models; random topologies already pull random peers
    ({"gossip": {"rule": "choco"}, "schedule": {"communication": {"kind": "allreduce"}}}, "schedule.communication.kind"),
    ({"gossip": {"rule": "adagossip"}, "schedule": {"communication": {"phases": [
        {"until": 0.5}, {"until": 1.0, "kind": "allreduce"}]}}}, "schedule.communication.phases[1].kind"),
    ({"topology": {"name": "random", "params": {"r": 0.2}}, "schedule": {"communication": {"pull": "random_peer"}}},
     "schedule.communication.pull"),
    ({"topology": {"name": "random", "params": {"r": 0.2}}, "schedule": {"communication": {"phases": [
        {"until": 1.0, "kind": "probability", "p": 0.5, "pull": "random_peer"}]}}}, "schedule.communication.phases[0].pull"),
    ({"gossip": {"rule": "choco"}, "topology": {"name": "random", "params": {"r": 0.2}}}, "topology.name"),
    ({"gossip": {"rule": "adagossip"}, "topology": {"name": "random", "params": {"r": 1}}}, "topology.name"),
    # runtime
    ({"runtime": {"engine": "ray", "staleness": -1}}, "runtime.staleness"),
    ({"runtime": {"engine": "ray", "agents_per_actor": 0}}, "runtime.agents_per_actor"),
    ({"runtime": {"engine": "ray", "agents_per_actor": "many"}}, "runtime.agents_per_actor"),
    ({"runtime": {"engine": "ray", "agents_per_actor": "auto", "batched_steps": True}}, "runtime.batched_steps"),
    ({"runtime": {"engine": "ray", "agents_per_actor": 3, "num_gpus_per_agent": 0.5}}, "runtime.agents_per_actor"),
    ({"train": {"on_divergence": "explode"}}, "train.on_divergence"),
    ({"runtime": {"engine": "ray", "batched_steps": True}}, "runtime.batched_steps"),
    ({"runtime": {"engine": "ray", "batched_steps": True, "agents_per_actor": 2, "mode": "bounded"}},
     "runtime.batched_steps"),
    (nested("runtime.num_cpus_per_agent", 0), "runtime.num_cpus_per_agent"),
    (nested("runtime.num_gpus_per_agent", 1.5), "runtime.num_gpus_per_agent"),
    (nested("runtime.num_gpus_per_agent", -0.5), "runtime.num_gpus_per_agent"),
    (nested("runtime.num_cpus", 0), "runtime.num_cpus"),
    (nested("runtime.device", "tpu"), "runtime.device"),
    (nested("runtime.wait_timeout_s", 0), "runtime.wait_timeout_s"),
    (nested("runtime.finish_quorum", 0), "runtime.finish_quorum"),
    (nested("runtime.inline_bytes", -1), "runtime.inline_bytes"),
    (nested("runtime.inline_bytes", 1 << 21), "runtime.inline_bytes"),
    (nested("runtime.snapshot_every", -1), "runtime.snapshot_every"),
    (nested("runtime.max_restarts", -1), "runtime.max_restarts"),
    (nested("runtime.checkpoint_every", -1), "runtime.checkpoint_every"),
    (nested("runtime.finish_quorum", 1.5), "runtime.finish_quorum"),
    # cross-field: the reference engine runs only sync
    ({"runtime": {"engine": "reference", "mode": "async"}}, "runtime.mode"),
    ({"runtime": {"engine": "reference", "mode": "bounded"}}, "runtime.mode"),
    # timing
    (nested("runtime.timing.slowdown", [1.0, 2.0]), "runtime.timing.slowdown"),  # 8 agents by default
    ({"agents": {"count": 4}, "runtime": {"timing": {"slowdown": [1.0] * 5}}}, "runtime.timing.slowdown"),
    (nested("runtime.timing.slowdown", [1.0] * 7 + [0.5]), "runtime.timing.slowdown"),
    (nested("runtime.timing.slow_fraction", 1.5), "runtime.timing.slow_fraction"),
    (nested("runtime.timing.slow_fraction", -0.1), "runtime.timing.slow_fraction"),
    (nested("runtime.timing.slow_factor", 0.5), "runtime.timing.slow_factor"),
    (nested("runtime.timing.jitter", -0.1), "runtime.timing.jitter"),
    (nested("runtime.timing.step_time_s", -1), "runtime.timing.step_time_s"),
    (nested("runtime.timing.latency_s", -0.001), "runtime.timing.latency_s"),
    (nested("runtime.timing.bandwidth_mbps", 0), "runtime.timing.bandwidth_mbps"),
    # eval
    (nested("eval.every", -1), "eval.every"),
    (nested("eval.test_samples", 0), "eval.test_samples"),
    (nested("eval.batch_size", 0), "eval.batch_size"),
    (nested("eval.validation_fraction", 1.0), "eval.validation_fraction"),
    # data
    (nested("data.partition.alpha", 0), "data.partition.alpha"),
    (nested("data.partition.alpha", -1), "data.partition.alpha"),
    (nested("data.partition.shards_per_agent", 0), "data.partition.shards_per_agent"),
    (nested("data.partition.min_samples", 0), "data.partition.min_samples"),
    ({"data": {"partition": {"kind": "iid", "min_samples": 10}}}, "data.partition.min_samples"),
    ({"data": {"partition": {"kind": "shards", "balance": True}}}, "data.partition.balance"),
    ({"data": {"partition": {"kind": "dirichlet", "resample": True}}}, "data.partition.resample"),
    # graphs: a disconnected edge list, dyck with the wrong agent count, a graph too small
    ({"topology": {"name": "edges", "params": {"edges": TWO_SQUARES}}}, "topology.params.edges"),
    ({"agents": {"count": 16}, "topology": {"name": "dyck"}}, "agents.count"),
    ({"agents": {"count": 2}, "topology": {"name": "ring"}}, "agents.count"),
    ({"topology": {"name": "circulant", "params": {"offsets": [2, 4]}}}, "topology.params.offsets"),
    ({"topology": {"name": "ring", "params": {"degree": 3}}}, "topology.params.degree"),
]
# every CHOICES entry, given a value outside its list
RANGE_ROWS += [(nested(dotted, "not-a-choice"), dotted) for dotted in CHOICES]


@pytest.mark.parametrize("mapping, field", RANGE_ROWS, ids=[f"{f}:{i}" for i, (_, f) in enumerate(RANGE_ROWS)])
def test_out_of_range_is_a_user_error_naming_the_field(mapping, field):
    with pytest.raises(UserError) as caught:
        load_config(base=mapping)
    assert_user_error(caught.value, field)


def test_every_check_in_validate_has_a_row():
    """Each field validate() (and its registry helper) names, and each CHOICES key, appears in RANGE_ROWS."""
    source = "".join(inspect.getsource(f) for f in (validation.validate, validation._validate_registries,
                                                     validation._validate_partition))
    named = set(re.findall(r'"([a-z_]+(?:\.[a-z_0-9]+)+)"', source)) | set(CHOICES)
    covered = {field for _, field in RANGE_ROWS}
    assert named, "found no field names in validate()"
    assert named - covered == set(), f"no RANGE_ROWS row for {sorted(named - covered)}"


def test_cross_field_messages_say_why():
    cases = [
        ({"gossip": {"compressor": {"name": "top_k", "ratio": 0.1}}}, "choco"),
        ({"gossip": {"rule": "choco"}, "topology": {"name": "one_peer_exponential"}}, "static graph"),
        ({"train": {"nesterov": True}}, "momentum"),
        ({"runtime": {"engine": "reference", "mode": "async"}}, "runtime.engine"),
        (nested("runtime.timing.slowdown", [1.0]), "one factor per agent (8)"),
        ({"agents": {"count": 16}, "topology": {"name": "dyck"}}, "32"),
        ({"topology": {"name": "edges", "params": {"edges": TWO_SQUARES}}}, "disconnected"),
    ]
    for mapping, phrase in cases:
        with pytest.raises(UserError) as caught:
            load_config(base=mapping)
        assert phrase in caught.value.message, (mapping, str(caught.value))


def test_the_same_settings_are_accepted_where_they_are_allowed():
    """The cross-field rows above fail only because of the combination."""
    accepted = [
        {"gossip": {"rule": "choco", "compressor": {"name": "top_k", "ratio": 0.1}}},
        {"gossip": {"rule": "adagossip", "compressor": {"name": "qsgd", "bits": 4}}},
        {"gossip": {"rule": "dpsgd"}, "topology": {"name": "one_peer_exponential"}},
        {"train": {"nesterov": True, "momentum": 0.9}},
        {"runtime": {"engine": "ray", "mode": "async"}},
        {"agents": {"count": 4}, "runtime": {"timing": {"slowdown": [1.0, 1.0, 2.0, 3.5]}}},
        {"agents": {"count": 32}, "topology": {"name": "dyck"}},
        {"topology": {"name": "edges", "params": {"edges": [[i, (i + 1) % 8] for i in range(8)]}}},
        {"runtime": {"device": "cuda:1"}},
        {"eval": {"every": 0}},
        {"schedule": {"communication": {"kind": "allreduce"}}},
        {"schedule": {"communication": {"phases": [{"until": 0.5}, {"until": 1.0, "kind": "allreduce"}]}}},
        {"topology": {"name": "random", "params": {"r": 0.2}}, "schedule": {"communication": {"kind": "probability",
                                                                                              "p": 0.5}}},
        {"topology": {"name": "complete"}, "schedule": {"communication": {"pull": "random_peer"}}},
        {"gossip": {"rule": "choco"}, "topology": {"name": "adagossip_dyck"}, "agents": {"count": 32}},
        {"data": {"partition": {"kind": "preference", "resample": True}}},
        {"data": {"partition": {"kind": "dirichlet", "min_samples": 5, "balance": True}}},
    ]
    for mapping in accepted:
        assert_holds(to_dict(load_config(base=copy.deepcopy(mapping))), mapping)


def test_validate_runs_on_a_config_object_too():
    config = Config()
    config.train.epochs = 0
    with pytest.raises(UserError) as caught:
        validate(config)
    assert_user_error(caught.value, "train.epochs")


# ---------------------------------------------------------------- files and --set


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert_user_error(caught.value, "config")
    assert "nope.yaml" in caught.value.message


def test_a_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(UserError) as caught:
        load_config(tmp_path)
    assert_user_error(caught.value, "config")


@pytest.mark.parametrize(
    "text, line",
    [
        ("name: a\ntrain:\n  lr: 0.1\n   epochs: 3\n", 4),  # bad indentation
        ("name: a\nseed: 0\ntrain: {lr: 0.1\n", 4),  # unclosed flow mapping (reported at the end)
        ("name: [a, b\nseed: 1\n", 2),
        ("a: 1\nb: 'unterminated\n", 3),
    ],
)
def test_yaml_syntax_error_gives_the_line(tmp_path, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert_user_error(caught.value, "config")
    assert f"line {line}" in caught.value.message, str(caught.value)
    assert "not valid YAML" in caught.value.message


@pytest.mark.parametrize("text, kind", [("- 1\n- 2\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert_user_error(caught.value, "config")
    assert kind in caught.value.message


def test_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert read_yaml(path) == {}
    assert load_config(path) == Config()


def test_unknown_key_in_a_file_names_it(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert_user_error(caught.value, "train.lrr")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.lr"], "--set"),  # no '='
        (["train.lr=0.1", "seed"], "--set"),
        (["train.lr=[0.1"], "--set train.lr"),  # the value is not YAML
        (["seed.x=1"], "seed"),  # seed is a scalar, not a section
        (["train.lrr=0.1"], "train.lrr"),
        (["train.epochs=ten"], "train.epochs"),
        (["train.epochs=0"], "train.epochs"),
    ],
)
def test_bad_override_is_a_user_error_naming_it(overrides, field):
    with pytest.raises(UserError) as caught:
        load_config(base={"seed": 1}, overrides=overrides)
    assert_user_error(caught.value, field)


def test_apply_overrides_sets_nested_keys_and_keeps_siblings():
    data = {"train": {"lr": 0.1, "epochs": 5}}
    out = apply_overrides(data, ["train.lr=0.05", "train.lr_schedule.kind=cosine"])
    assert out == {"train": {"lr": 0.05, "epochs": 5, "lr_schedule": {"kind": "cosine"}}}


@pytest.mark.parametrize(
    "item, dotted, value",
    [
        ("train.epochs=3", "train.epochs", 3),
        ("train.lr=0.05", "train.lr", 0.05),
        ("train.lr=.5", "train.lr", 0.5),
        ("train.momentum=0", "train.momentum", 0),
        ("runtime.progress=false", "runtime.progress", False),
        ("train.nesterov=true", "train.nesterov", True),
        ("model.hidden=[32, 16]", "model.hidden", [32, 16]),
        ("topology.params={offsets: [1, 5]}", "topology.params", {"offsets": [1, 5]}),
        ("runtime.address=null", "runtime.address", None),
        ("name=hello world", "name", "hello world"),
        ("name=a=b", "name", "a=b"),  # only the first '=' splits
        ("name=", "name", ""),
        ("name='42'", "name", "42"),
    ],
)
def test_apply_overrides_parses_values_as_yaml(item, dotted, value):
    out = apply_overrides({}, [item])
    assert out == nested(dotted, value)
    assert type(_lookup(out, dotted)) is type(value)


def _lookup(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def test_apply_overrides_creates_sections_and_later_ones_win():
    out = apply_overrides({}, ["schedule.communication.kind=late", "schedule.communication.start=0.75",
                               "seed=1", "seed=2"])
    assert out == {"schedule": {"communication": {"kind": "late", "start": 0.75}}, "seed": 2}
    config = load_config(base={}, overrides=["schedule.communication.kind=late", "schedule.communication.start=0.75"])
    assert config.schedule.communication.kind == "late" and config.schedule.communication.start == 0.75


def test_overrides_apply_on_top_of_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 4\n")
    config = load_config(path, ["train.lr=0.2", "model.hidden=[8]"])
    assert (config.train.lr, config.train.epochs, config.model.hidden) == (0.2, 4, [8])


# ---------------------------------------------------------------- YAML round trip


def _every_section_changed() -> dict:
    return {
        "name": "changed",
        "seed": 7,
        "data": {"name": "digits", "root": "/tmp/somewhere", "download": True, "image_size": None,
                 "partition": {"kind": "shards", "alpha": 0.3, "shards_per_agent": 3, "samples_per_agent": 50}},
        "model": {"name": "mlp", "norm": "group", "width": 0.5, "hidden": [32, 16], "groups": 4},
        "agents": {"count": 6},
        "topology": {"name": "circulant", "weights": "metropolis", "params": {"offsets": [1, 2]}},
        "train": {"epochs": 3, "batch_size": 8, "lr": 1.0e-3, "momentum": 0.5, "nesterov": True,
                  "weight_decay": 5.0e-4, "optimizer": "adamw", "local_steps": 2, "steps_per_epoch": 9,
                  "lr_schedule": {"kind": "step", "milestones": [0.3, 0.6, 0.9], "factor": 0.5, "warmup_epochs": 0.5}},
        "gossip": {"rule": "adagossip", "gamma": 0.25, "beta": 0.99,
                   "compressor": {"name": "qsgd", "ratio": 0.2, "bits": 3, "scope": "global", "scaled": True}},
        "schedule": {
            "averaging_rate": {"kind": "step", "gamma0": 0.125, "growth": 1.5, "ramp_epochs": 4,
                               "milestones": [1, 2], "factor": 3.0},
            "communication": {"kind": "window", "p": 0.5, "pull": "random_peer", "start": 0.25, "width": 0.5,
                              "sparse_every": 4},
            "final_merge": {"enabled": False, "bn": "global", "bn_batches": 5},
        },
        "runtime": {"engine": "ray", "mode": "bounded", "staleness": 3, "address": "ray://head:10001", "num_cpus": 4,
                    "num_cpus_per_agent": 0.5, "num_gpus_per_agent": 0.25, "placement": "SPREAD", "device": "cuda:0",
                    "torch_threads": 2, "wait_timeout_s": 30.0, "finish_quorum": 1.0, "checkpoint_every": 0,
                    "progress": False, "inline_bytes": 4096, "on_failure": "drop", "snapshot_every": 3,
                    "max_restarts": 1,
                    "timing": {"slowdown": [1.0, 1.0, 2.0, 1.0, 1.5, 1.0], "slow_fraction": 0.25, "slow_factor": 3.0,
                               "jitter": 0.1, "step_time_s": 0.01, "latency_s": 0.002, "bandwidth_mbps": 100.0}},
        "eval": {"every": 2, "test_samples": 500, "local": False, "batch_size": 250},
        "faults": {"kill": [{"agent": 2, "round": 5}], "kill_fraction": 0.2, "kill_round": 4, "drop_messages": 0.1,
                   "delay_messages": 0.2, "delay_s": 0.05,
                   "chaos": {"every_s": 5.0, "target": "actor", "start": 1.0, "stop": 60.0, "max_deaths": 4,
                             "coordinator_every_s": 20.0, "coordinator_at_s": [3.0]}},
        "timeline": [{"round": 2, "action": "slow", "agents": [1], "factor": 3.0},
                     {"round": 4, "action": "link", "loss": 0.1, "edges": [[0, 1]]},
                     {"round": 5, "action": "communication", "communication": {"kind": "probability", "p": 0.5}},
                     {"round": 6, "action": "gamma", "value": 0.5}, {"round": 6, "action": "kill", "agents": [3]}],
    }


def _sections(config: Any, path: str = "") -> list[tuple[str, Any]]:
    """(path, dataclass instance) for the config and every nested section."""
    found = [(path or "<top>", config)]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            found += _sections(value, f"{path}.{f.name}" if path else f.name)
    return found


def test_the_changed_config_changes_every_section_and_is_valid():
    config = load_config(base=_every_section_changed())
    for path, section in _sections(config):
        default = type(section)()
        changed = [f.name for f in dataclasses.fields(section)
                   if not dataclasses.is_dataclass(getattr(section, f.name))
                   and getattr(section, f.name) != getattr(default, f.name)]
        leaves = [f.name for f in dataclasses.fields(section) if not dataclasses.is_dataclass(getattr(section, f.name))]
        assert changed or not leaves, f"section {path} keeps all its defaults"


def _round_trip(config: Config) -> Config:
    return from_dict(Config, yaml.safe_load(dump_yaml(config)))


@pytest.mark.parametrize(
    "make",
    [Config, lambda: load_config(base=_every_section_changed()), lambda: load_config(base=quickstart())]
    + [lambda path=path: load_config(path) for path in CONFIGS],
    ids=["default", "every-section-changed", "quickstart-preset"] + [str(p.relative_to(REPO)) for p in CONFIGS],
)
def test_yaml_round_trip_loses_nothing(make):
    config = make()
    again = _round_trip(config)
    assert again == config
    validate(again)
    assert dump_yaml(again) == dump_yaml(config)


def test_the_dump_is_strict_loadable_and_mirrors_the_tree():
    data = yaml.safe_load(dump_yaml(Config()))
    assert list(data) == [f.name for f in dataclasses.fields(Config)]
    assert load_config(base=data) == Config()


def test_there_are_config_files():
    assert {path.name for path in CONFIGS} >= {"quickstart.yaml", "mnist_lenet5.yaml"}


def test_quickstart_file_equals_the_preset():
    assert load_config(REPO / "configs" / "quickstart.yaml") == load_config(base=quickstart())


def _dotted_keys(cls: type, path: str = "") -> list[str]:
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        dotted = f"{path}.{f.name}" if path else f.name
        keys += _dotted_keys(tp, dotted) if dataclasses.is_dataclass(tp) else [dotted]
    return keys


def test_docs_config_md_documents_every_key():
    text = (REPO / "docs" / "CONFIG.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines() if line.startswith("| `")}
    keys = set(_dotted_keys(Config))
    assert keys - rows == set(), f"docs/CONFIG.md has no row for {sorted(keys - rows)}"
    stale = {row for row in rows if "." in row or row in ("name", "seed")} - keys
    assert stale == set(), f"docs/CONFIG.md documents keys that do not exist: {sorted(stale)}"


# ---------------------------------------------------------------- property: UserError or a Config, nothing else

_NAMES = sorted({"ring", "dyck", "edges", "circulant", "torus", "one_peer_exponential", "random_regular", "erdos_renyi",
                 "lcf", "petersen", "complete", "exponential", "random", "adagossip_dyck", "digits", "mnist", "mlp",
                 "lenet5", "dirichlet", "iid",
                 "shards", "preference", "dirichlet_lin", "cpu", "auto", "cuda:0", ""}
                | {choice for choices in CHOICES.values() for choice in choices})
_TOPOLOGY_PARAMS = ["offsets", "rows", "cols", "degree", "seed", "p", "edges", "shifts", "repeats", "r", "base", "junk"]

# Small ints: validate() builds the graph, and a dense n x n mixing matrix for a huge agents.count is out of
# memory (a numpy MemoryError, not a UserError; reported, not tested here).
_small_ints = st.integers(min_value=-3, max_value=40)
# Keys without control characters (keys holding newlines have their own test below).
_keys = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=5)
_scalars = st.one_of(
    st.none(), st.booleans(), _small_ints, st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(_NAMES), st.text(max_size=4),
)
_junk = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=6,
)


def _values_for(tp: Any, dotted: str, junk: bool) -> st.SearchStrategy:
    """Mostly plausible values of the annotated type; with `junk`, now and then a value of any type."""
    plausible = _plausible(tp, dotted, junk)
    return _mostly(plausible, _junk) if junk else plausible


def _mostly(usual: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """`usual` seven times in eight (flatmap keeps the strategy's repr small, unlike one_of(*[usual] * 7))."""
    return st.integers(min_value=0, max_value=7).flatmap(lambda k: rare if k == 0 else usual)


def _plausible(tp: Any, dotted: str, junk: bool) -> st.SearchStrategy:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _section(tp, dotted, junk)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[st.none() if a is type(None) else _plausible(a, dotted, junk) for a in args])
    if origin is list:
        return st.lists(_plausible(args[0], dotted, junk), max_size=9)
    if origin is dict:  # topology.params
        values = [_small_ints, st.lists(_small_ints, min_size=1, max_size=4),
                  st.lists(st.lists(_small_ints, min_size=2, max_size=2), max_size=10)]
        return st.dictionaries(st.sampled_from(_TOPOLOGY_PARAMS), st.one_of(*values, *([_junk] if junk else [])),
                               max_size=2)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return _small_ints
    if tp is float:
        return st.one_of(st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.999, 1.0, 1.5, 2.0, -1.0]),
                         st.floats(min_value=-2, max_value=2))
    if tp is str:
        return st.sampled_from(list(CHOICES.get(dotted, ())) + _NAMES)
    return _junk


def _section(cls: type, dotted: str, junk: bool) -> st.SearchStrategy:
    hints = typing.get_type_hints(cls)
    optional = {f.name: _values_for(hints[f.name], f"{dotted}.{f.name}" if dotted else f.name, junk)
                for f in dataclasses.fields(cls)}
    real = st.fixed_dictionaries({}, optional=optional)
    if not junk:
        return real
    junk_keys = st.dictionaries(st.one_of(_keys, _small_ints), _junk, min_size=1, max_size=1)
    return _mostly(real, st.builds(lambda a, b: {**a, **b}, real, junk_keys))


_KEY_PATHS = sorted(
    {"seed", "name", "agents.count", "train.lr", "train.epochs", "topology.name", "topology.params.offsets",
     "gossip.rule", "gossip.compressor.name", "gossip.compressor.ratio", "gossip.compressor.bits",
     "runtime.mode", "runtime.engine", "runtime.timing.slowdown", "train.lrr", "seed.x", "", "train..lr"}
)
_override = st.builds(
    lambda key, sep, value: f"{key}{sep}{value}",
    st.sampled_from(_KEY_PATHS), st.sampled_from(["=", "=", ":", ""]),
    st.sampled_from(["1", "0", "-1", "0.5", "true", "null", "[1, 2]", "{a: 1}", "[1", "ring", "choco", "top_k",
                     "'x'", ""]),
)


def _check_outcome(base: dict, overrides: list[str]) -> None:
    try:
        config = load_config(base=copy.deepcopy(base), overrides=overrides)
    except UserError as error:
        text = str(error)
        assert "\n" not in text, text
        assert error.field is not None and text.startswith(f"{error.field}: "), text
        event("UserError")
    else:
        assert_holds(to_dict(config), apply_overrides(copy.deepcopy(base), list(overrides)))
        assert _round_trip(config) == config
        event("Config")


_SETTINGS = settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@_SETTINGS
@given(base=_section(Config, "", junk=True), overrides=st.lists(_override, max_size=2))
def test_random_mappings_give_a_config_or_a_user_error(base, overrides):
    """Real key names plus junk keys and values of random types: a Config or a UserError, nothing else."""
    _check_outcome(base, overrides)


@_SETTINGS
@given(base=_section(Config, "", junk=False))
def test_well_typed_random_mappings_give_a_config_or_a_user_error(base):
    """Every value of its annotated type (so validate() and the graph builders run): the same promise."""
    _check_outcome(base, [])


@pytest.mark.parametrize("text", ['"bad\\nkey": 1\n', 'topology:\n  params: {"of\\nfsets": [1]}\n'])
def test_a_key_holding_a_newline_still_gives_one_line(tmp_path, text):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as caught:
        load_config(path)
    assert "\n" not in str(caught.value)
