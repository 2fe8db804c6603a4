"""eval.tensorboard / `raygossip run --tensorboard`: event files in the run folder that hold every record's numbers."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raygossip.api import run
from raygossip.cli import main
from raygossip.validation import load_config
from raygossip.errors import UserError
from conftest import small, wait_for_idle_cluster


def events(folder) -> EventAccumulator:
    files = list(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    board = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    board.Reload()
    return board


def values(board: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in board.Scalars(tag)]


def test_run_tensorboard_writes_every_record_as_scalars(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--engine", "reference", "--set", "agents.count=4", "--set", "train.epochs=2",
                 "--set", "eval.every=1", "--set", "eval.validation_fraction=0.2", "--no-progress",
                 "--tensorboard", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    board = events(out)
    tags = set(board.Tags()["scalars"])
    for tag in ("accuracy/merged_test", "accuracy/merged_validation", "accuracy/mean_local_test", "train/loss",
                "consensus/distance", "traffic/bytes_sent", "schedule/gamma", "schedule/lr",
                "summary/merged_test_accuracy"):
        assert tag in tags, (tag, sorted(tags))
    steps = [r["step"] for r in records]
    for key, tag in (("merged_test_accuracy", "accuracy/merged_test"),
                     ("merged_validation_accuracy", "accuracy/merged_validation"),
                     ("consensus_distance", "consensus/distance"), ("gamma", "schedule/gamma")):
        assert values(board, tag) == [(s, pytest.approx(r[key], rel=1e-6)) for s, r in zip(steps, records)]
    assert values(board, "traffic/bytes_sent") == [(s, float(r["bytes_sent"])) for s, r in zip(steps, records)]
    lr = 0.05  # the quickstart's train.lr, times each record's multiplier
    assert values(board, "schedule/lr") == [(s, pytest.approx(lr * r["lr_multiplier"])) for s, r in
                                            zip(steps, records)]
    summary = json.loads((out / "summary.json").read_text())
    assert values(board, "summary/merged_test_accuracy") == [(steps[-1], pytest.approx(summary["merged_test_accuracy"]))]
    histograms = board.Histograms("accuracy/local_test")
    assert [h.step for h in histograms] == steps
    assert histograms[-1].histogram_value.num == 4  # one value per agent
    assert histograms[-1].histogram_value.min == pytest.approx(records[-1]["min_local_test_accuracy"])


def test_no_tensorboard_writes_no_event_file(tmp_path):
    run(load_config(base=small(runtime__engine="reference")), out_dir=tmp_path, progress=False)
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_tensorboard_without_an_output_folder_is_a_one_line_error():
    with pytest.raises(UserError, match=r"^eval.tensorboard: needs an output folder"):
        run(load_config(base=small(runtime__engine="reference", eval__tensorboard=True)), progress=False)


def test_the_ray_engine_logs_each_agents_wait_for_its_neighbours(ray_cluster, tmp_path):
    wait_for_idle_cluster()
    config = load_config(base=small(eval__tensorboard=True, runtime__timing={"slowdown": [1, 1, 1, 3]}))
    result = run(config, out_dir=tmp_path, progress=False)
    board = events(tmp_path)
    waits = result.summary["waited_s_per_agent"]
    assert len(waits) == 4
    per_agent = [values(board, f"stragglers/waited_s/agent_{k:03d}")[0][1] for k in range(4)]
    assert per_agent == pytest.approx(waits, rel=1e-6)
    assert board.Histograms("stragglers/waited_s")[0].histogram_value.num == 4
