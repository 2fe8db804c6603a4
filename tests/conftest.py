"""Shared fixtures and helpers: one multi-node local Ray cluster for the whole session (bound to loopback), the
`ray` marker on every test that uses it, and the small run config and Ray-run helpers several test files share."""

from __future__ import annotations

import os
import time

import pytest
import torch

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind Ray to loopback, before Ray is imported
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node and one worker node (2 logical CPUs each) on this machine, started once per session."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 256 * 1024**2, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, object_store_memory=256 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


RAY_FIXTURES = ("ray_cluster", "token_head")  # the session cluster; test_cluster's own head (`ray start`)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses a Ray fixture is a `ray` test (`pytest -m "not ray"` is the fast tier); tests that start
    Ray some other way carry the marker themselves."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in RAY_FIXTURES):
            item.add_marker(pytest.mark.ray)


def small(**overrides) -> dict:
    """A 4-agent digits run that takes a few seconds; `section__key=value` overrides (`__` nests deeper)."""
    from raygossip.presets import quickstart

    base = quickstart()
    base["agents"] = {"count": 4}
    base["model"] = {"name": "mlp", "hidden": [32]}
    base["train"].update(epochs=2, steps_per_epoch=12)
    base["eval"] = {"every": 1}
    base["runtime"] = {"engine": "ray", "num_cpus_per_agent": 0.5, "progress": False, "wait_timeout_s": 30.0}
    for key, value in overrides.items():
        section, _, name = key.partition("__")
        node = base.setdefault(section, {})
        for part in name.split("__")[:-1]:
            node = node.setdefault(part, {})
        node[name.split("__")[-1]] = value
    return base


def wait_for_idle_cluster(timeout_s: float = 60.0) -> None:
    """Let the previous test's actors and placement group release their CPUs (ray.kill is asynchronous)."""
    import ray

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources().get("CPU", 0) - 1e-9:
            return
        time.sleep(0.2)


def run_ray(config, **kwargs):
    """A RayEngine run of `config` once the cluster is idle: (engine, outcome); the engine is closed on error."""
    from raygossip.engines.common import prepare
    from raygossip.engines.ray_engine import RayEngine

    wait_for_idle_cluster()
    engine = RayEngine(config, prepare(config))
    try:
        outcome = engine.run(**kwargs)
        return engine, outcome
    except BaseException:
        engine.close()
        raise


def assert_same_run(engine, outcome, reference, expected) -> None:
    """Bit for bit: every agent's parameters, every record's numbers, the merged model."""
    for got, want in zip(engine.agent_vectors(), reference.agent_vectors()):
        assert torch.equal(got, want)
    assert len(outcome["records"]) == len(expected["records"])
    for got, want in zip(outcome["records"], expected["records"]):
        for key in ("local_test_accuracy", "merged_test_accuracy", "bytes_sent", "messages_sent",
                    "consensus_distance", "train_loss", "gamma", "round", "communication_rounds"):
            assert got[key] == want[key], key
    assert outcome["merged_accuracy"] == expected["merged_accuracy"]
    merged_ref = reference.merged_state_dict()
    for name, tensor in engine.merged_state_dict().items():
        assert torch.equal(tensor, merged_ref[name]), name
