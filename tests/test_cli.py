"""The `raygossip` command line, in process through cli.main and once through the installed console script."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raygossip.cli import main
from raygossip.validation import load_config
from raygossip.core.agent import evaluate
from raygossip.data.datasets import load_dataset
from raygossip.models import build_model
from raygossip.presets import quickstart

CONSOLE_SCRIPT = Path(sys.executable).parent / "raygossip"
SUMMARY_KEYS = {
    "engine", "mode", "agents", "rounds", "epochs", "merged_test_accuracy", "mean_local_test_accuracy",
    "std_local_test_accuracy", "consensus_distance", "bytes_sent", "messages_sent", "wall_time_s", "events",
}
RUN_FLAGS = ["--engine", "reference", "--set", "train.epochs=1", "--set", "eval.every=1", "--no-progress"]


@pytest.fixture(autouse=True)
def _no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def one_error_line(err: str, *needles: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


# ---------------------------------------------------------------- topology


def test_topology_json_ring16(capsys):
    assert main(["topology", "ring", "--agents", "16", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert len(out.strip().splitlines()) == 1, out
    report = json.loads(out)
    assert isinstance(report, dict)
    assert report["lambda2"] == pytest.approx(0.949, abs=5e-4)
    assert report["spectral_gap"] == pytest.approx(1 - report["lambda2"], abs=1e-12)
    assert (report["min_degree"], report["max_degree"]) == (2, 2)
    assert report["doubly_stochastic"] is True
    assert report["agents"] == 16


def test_topology_text_mode_prints_key_value_lines(capsys):
    assert main(["topology", "ring", "--agents", "16"]) == 0
    out, _ = capsys.readouterr()
    pairs = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert {"lambda2", "spectral_gap", "min_degree", "max_degree", "doubly_stochastic"} <= set(pairs)
    assert float(pairs["lambda2"]) == pytest.approx(0.949, abs=5e-4)
    assert pairs["doubly_stochastic"].strip() == "True"
    assert pairs["min_degree"].strip() == "2"


@pytest.mark.parametrize(
    "argv, lambda2",
    [
        (["circulant", "--agents", "16", "--param", "offsets=[1,5]"], 0.723),
        (["circulant", "--agents", "16", "--param", "offsets=[1, 4]"], 0.600),
        (["lcf", "--agents", "32", "--param", "shifts=[13, -13]"], 0.854),  # DESIGN.md's "Dyck" value
        (["ring", "--agents", "32"], 0.987),
    ],
)
def test_topology_reference_values(capsys, argv, lambda2):
    assert main(["topology", *argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lambda2"] == pytest.approx(lambda2, abs=5e-4)


def test_topology_metropolis_weights(capsys):
    assert main(["topology", "ring", "--agents", "16", "--weights", "metropolis", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == "metropolis" and report["doubly_stochastic"] is True


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["dyck", "--agents", "16"], "agents.count"),
        (["ring", "--agents", "0"], "--agents"),
        (["hypercube", "--agents", "16"], "topology.name"),
        (["circulant", "--agents", "16", "--param", "offsets"], "--param"),
        (["circulant", "--agents", "16", "--param", "offsets=[1,5"], "--param offsets"),  # not YAML
        (["circulant", "--agents", "16", "--param", "offsets=[2,4]"], "topology.params.offsets"),
        (["ring", "--agents", "16", "--param", "degree=3"], "topology.params.degree"),
    ],
)
def test_topology_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    assert main(["topology", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    one_error_line(err, needle, "raygossip topology: error:")


def test_usage_mistake_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["topology", "ring"])  # --agents is required
    assert caught.value.code == 2
    one_error_line(capsys.readouterr().err, "--agents")


# ---------------------------------------------------------------- run: bad input


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--set", "train.lrr=0.1"], "train.lrr"),
        (["--set", "train.lr"], "--set"),
        (["--set", "train.epochs=ten"], "train.epochs"),
        (["--set", "train.lr=[0.1"], "--set train.lr"),
        (["--engine", "reference", "--set", "runtime.mode=async"], "runtime.mode"),
        (["--engine", "reference", "--mode", "bounded"], "runtime.mode"),
        (["--set", "topology.name=dyck"], "agents.count"),
    ],
)
def test_run_bad_set_exits_2_and_writes_nothing(capsys, tmp_path, extra, needle):
    out_dir = tmp_path / "out"
    assert main(["run", *extra, "--no-progress", "--out", str(out_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    one_error_line(err, needle, "raygossip run: error:")
    assert not out_dir.exists()


def test_run_bad_config_key_exits_2_and_writes_nothing(capsys, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("name: typo\ntrain:\n  lrr: 0.1\n")
    out_dir = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out_dir)]) == 2
    one_error_line(capsys.readouterr().err, "train.lrr")
    assert not out_dir.exists()


def test_run_bad_yaml_names_the_line(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("name: bad\ntrain: {lr: 0.1\n")
    out_dir = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out_dir)]) == 2
    one_error_line(capsys.readouterr().err, "config", "line 3")
    assert not out_dir.exists()


def test_run_missing_file_exits_2_and_writes_nothing(capsys, tmp_path):
    out_dir = tmp_path / "out"
    missing = tmp_path / "missing.yaml"
    assert main(["run", str(missing), "--out", str(out_dir)]) == 2
    one_error_line(capsys.readouterr().err, "config", "missing.yaml")
    assert not out_dir.exists()


@pytest.mark.parametrize(
    "setting, needle",
    [
        ("train.batch_size=5000", "train.batch_size"),  # larger than the smallest shard
        ("train.lr_schedule.milestones=[0.75, 0.5]", "train.lr_schedule.milestones"),  # not increasing
        ("model.name=lenet5", "model.hidden"),  # the quickstart's hidden is not a lenet5 parameter
        ("data.image_size=16", "data.image_size"),  # digits is tabular
    ],
)
def test_run_error_found_while_preparing_writes_nothing(capsys, tmp_path, setting, needle):
    out_dir = tmp_path / "out"
    code = main(["run", "--set", "train.epochs=1", "--set", setting, "--no-progress", "--out", str(out_dir)])
    assert code == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not out_dir.exists()


# ---------------------------------------------------------------- run: a real (1-epoch) quickstart


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One 1-epoch quickstart through cli.main; its stdout, exit status and output folder."""
    out_dir = tmp_path_factory.mktemp("cli") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: intra-op threads only contend
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.delenv("RAY_ADDRESS", raising=False)
        try:
            code = main(["run", *RUN_FLAGS, "--out", str(out_dir)])
        finally:
            torch.set_num_threads(threads)
    return code, stdout.getvalue(), stderr.getvalue(), out_dir


def test_run_succeeds_and_says_where(quick_run):
    code, out, err, out_dir = quick_run
    assert code == 0, err
    assert "merged_test_accuracy=" in out
    assert f"results in {out_dir}" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.yaml", "metrics.jsonl", "model.safetensors",
                                                           "summary.json"]


def test_run_config_yaml_loads_back_to_the_same_config(quick_run):
    out_dir = quick_run[3]
    expected = load_config(base=quickstart(), overrides=["runtime.engine=reference", "train.epochs=1", "eval.every=1", "runtime.progress=false"])
    assert load_config(out_dir / "config.yaml") == expected


def test_run_metrics_jsonl_is_one_record_per_line(quick_run):
    lines = (quick_run[3] / "metrics.jsonl").read_text().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]
    for record in records:
        assert isinstance(record, dict)
        for key in ("merged_test_accuracy", "consensus_distance", "bytes_sent"):
            assert key in record, (key, record)
        assert 0.0 <= record["merged_test_accuracy"] <= 1.0
        assert math.isfinite(record["consensus_distance"]) and record["consensus_distance"] >= 0
        assert isinstance(record["bytes_sent"], int) and record["bytes_sent"] > 0
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)


def test_run_summary_json_has_the_headline_numbers(quick_run):
    out_dir = quick_run[3]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert (summary["engine"], summary["mode"], summary["agents"], summary["epochs"]) == ("reference", "sync", 8, 1)
    assert summary["rounds"] >= 1
    last = json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["bytes_sent"] == last["bytes_sent"] > 0
    assert summary["messages_sent"] == last["messages_sent"] > 0
    assert 0.0 < summary["merged_test_accuracy"] <= 1.0
    assert summary["wall_time_s"] > 0
    kinds = [event["kind"] for event in summary["events"]]
    assert kinds[0] == "run_started" and "merge_done" in kinds


def test_run_model_safetensors_loads_into_the_mlp(quick_run):
    out_dir = quick_run[3]
    state = load_file(str(out_dir / "model.safetensors"))
    config = load_config(out_dir / "config.yaml")
    dataset = load_dataset(config.data.name, config.data.root)
    model = build_model(config.model.name, dataset.num_classes, dataset.input_shape, {"hidden": config.model.hidden})
    model.load_state_dict(state, strict=True)
    # the saved weights are the merged model the summary reports on
    summary = json.loads((out_dir / "summary.json").read_text())
    accuracy = evaluate(model, dataset.test.x, dataset.test.y, 1000, torch.device("cpu"))
    assert accuracy == pytest.approx(summary["merged_test_accuracy"], abs=1e-9)


# ---------------------------------------------------------------- the console script


@pytest.mark.slow  # two fresh interpreters importing the package
def test_console_script_runs(tmp_path):
    assert CONSOLE_SCRIPT.exists(), f"no console script at {CONSOLE_SCRIPT}; pip install -e . first"
    done = subprocess.run([str(CONSOLE_SCRIPT), "topology", "ring", "--agents", "16", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["lambda2"] == pytest.approx(0.949, abs=5e-4)
    bad = subprocess.run([str(CONSOLE_SCRIPT), "topology", "dyck", "--agents", "16"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stdout == ""
    one_error_line(bad.stderr, "agents.count")
