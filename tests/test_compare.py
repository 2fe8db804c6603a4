"""`raygossip compare` on four real reference runs (2 seeds x 2 averaging-rate kinds), and table tests of its parts."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from raygossip import compare, plots, results
from raygossip.api import run as run_experiment
from raygossip.config import Config
from raygossip.validation import load_config
from raygossip.errors import UserError
from raygossip.presets import quickstart

KINDS = ("constant", "ars")
SEEDS = (1, 2)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for kind in KINDS:
        for seed in SEEDS:
            config = load_config(base=quickstart(), overrides=[
                f"seed={seed}", "train.epochs=2", "eval.every=1", f"schedule.averaging_rate.kind={kind}",
                "runtime.engine=reference", "runtime.progress=false",
                "agents.count=4", "train.steps_per_epoch=6", "eval.test_samples=360"])  # small: seconds, not tens
            run_experiment(config, out_dir=root / f"{kind}-seed{seed}")
    return root


@pytest.fixture(scope="module")
def report(runs_root: Path, tmp_path_factory) -> dict:
    """`raygossip compare ROOT --out OUT` through the subcommand's own parser; stdout captured."""
    parser = argparse.ArgumentParser()
    compare.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path_factory.mktemp("compare") / "out"
    args = parser.parse_args(["compare", str(runs_root), "--out", str(out)])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = compare.cmd_compare(args)
    return {"status": status, "stdout": printed.getvalue(), "out": out}


@pytest.fixture(scope="module")
def groups(runs_root: Path) -> list[compare.Group]:
    return compare.group_runs(compare.load_runs([runs_root]))


# ---------------------------------------------------------------- grouping and the table


def test_two_groups_of_two_seeds_labelled_by_the_differing_key(groups):
    assert [len(group.runs) for group in groups] == [2, 2]
    assert [sorted(run.seed for run in group.runs) for group in groups] == [list(SEEDS)] * 2
    assert [group.settings for group in groups] == [
        {"schedule.averaging_rate.kind": "ars"}, {"schedule.averaging_rate.kind": "constant"}]
    assert [group.label for group in groups] == ["averaging_rate.kind=ars", "averaging_rate.kind=constant"]
    for group in groups:
        assert {run.path.name.split("-")[0] for run in group.runs} == {group.settings["schedule.averaging_rate.kind"]}


def test_table_mean_and_std_equal_a_hand_computation_from_the_summaries(groups):
    rows = compare.table(groups)
    assert [row["group"] for row in rows] == [group.label for group in groups]
    for row, group in zip(rows, groups):
        summaries = [json.loads((run.path / "summary.json").read_text()) for run in group.runs]
        assert row["n_seeds"] == 2 and row["seeds"] == "1 2"
        for column, key, scale in [("merged_test_accuracy", "merged_test_accuracy", 1),
                                   ("mean_local_test_accuracy", "mean_local_test_accuracy", 1),
                                   ("consensus_distance", "consensus_distance", 1),
                                   ("bytes_sent_mb", "bytes_sent", 1e-6),
                                   ("communication_rounds", "communication_rounds", 1),
                                   ("wall_time_s", "wall_time_s", 1)]:
            values = [s[key] * scale for s in summaries]
            assert row[f"{column}_mean"] == pytest.approx((values[0] + values[1]) / 2, rel=1e-12)
            assert row[f"{column}_std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5, rel=1e-9, abs=1e-15)


def test_cmd_compare_prints_the_table_and_where_files_went(report, groups):
    assert report["status"] == 0
    lines = report["stdout"].splitlines()
    assert lines[0].startswith("| group | n seeds | merged test acc.")
    assert any(line.startswith("| averaging_rate.kind=ars | 2 | ") for line in lines)
    assert f"  {report['out'] / 'compare.csv'}" in lines
    assert "averaging_rate.kind=constant" in (report["out"] / "compare.md").read_text()


def test_csv_parses_back_to_the_table(report, groups):
    with open(report["out"] / "compare.csv", newline="") as handle:
        parsed = list(csv.DictReader(handle))
    rows = compare.table(groups)
    assert [row["group"] for row in parsed] == [row["group"] for row in rows]
    assert parsed[0]["schedule.averaging_rate.kind"] == "ars"
    for back, row in zip(parsed, rows):
        for column in ("merged_test_accuracy_mean", "merged_test_accuracy_std", "bytes_sent_mb_mean",
                       "wall_time_s_std"):
            assert float(back[column]) == row[column]
        assert int(back["n_seeds"]) == 2


@pytest.mark.parametrize("name", list(plots.PLOTS))
def test_every_plot_is_a_real_png(report, name):
    data = (report["out"] / f"{name}.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 300
    assert len(data) > 15_000  # lines, labels and a legend, not a blank canvas
    assert not list(report["out"].glob(f".{name}.png*"))  # no temporary left behind


# ---------------------------------------------------------------- bad RUN_DIR: one-line UserErrors


def _one_line_error(paths) -> UserError:
    with pytest.raises(UserError) as caught:
        compare.load_runs(paths)
    assert caught.value.field == "RUN_DIR" and "\n" not in str(caught.value)
    return caught.value


def test_bad_run_dirs_are_one_line_user_errors(runs_root, tmp_path):
    assert "no such folder" in str(_one_line_error([tmp_path / "missing"]))
    (tmp_path / "empty").mkdir()
    assert "no summary.json" in str(_one_line_error([tmp_path / "empty"]))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(runs_root / "ars-seed1", corrupt)
    (corrupt / "summary.json").write_text('{"merged_test_accuracy": 0.9,')
    assert "not valid JSON" in str(_one_line_error([corrupt]))
    (corrupt / "summary.json").write_text("[1, 2]")
    assert "JSON object" in str(_one_line_error([corrupt]))
    (corrupt / "summary.json").write_text("{}")
    (corrupt / "config.yaml").write_text("train: {epochs: 0}\n")
    assert "train.epochs" in str(_one_line_error([corrupt]))
    (corrupt / "metrics.jsonl").unlink()
    assert "metrics.jsonl" in str(_one_line_error([corrupt]))


def test_out_must_be_a_folder_and_run_dir_is_required(tmp_path):
    parser = argparse.ArgumentParser()
    compare.add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["compare", "a", "b"]).out == "compare"
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["compare"])
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        compare.cmd_compare(argparse.Namespace(run_dirs=[str(tmp_path)], out=str(tmp_path / "file")))
    with pytest.raises(UserError, match="RUN_DIR: not a folder"):
        compare.load_runs([tmp_path / "file"])


def test_a_parent_folder_and_its_run_folders_count_each_run_once(runs_root):
    found = compare.find_run_dirs([runs_root, runs_root / "ars-seed1"])
    assert sorted(path.name for path in found) == sorted(f"{k}-seed{s}" for k in KINDS for s in SEEDS)


# ---------------------------------------------------------------- the pieces, without runs


def _fake_run(flat: dict, records: list[dict] | None = None, seed: int = 0, label: str | None = None) -> compare.Run:
    return compare.Run(path=Path(f"run{seed}"), config=Config(seed=seed, label=label), flat={**flat, "label": label},
                       summary={}, records=records or [])


def test_a_group_is_named_by_its_runs_own_label_which_never_splits_groups():
    runs = [_fake_run({"train.lr": 0.1}, seed=0, label="slow"), _fake_run({"train.lr": 0.1}, seed=1, label="slow"),
            _fake_run({"train.lr": 0.2}, label="fast")]
    assert [(g.label, len(g.runs)) for g in compare.group_runs(runs)] == [("slow", 2), ("fast", 1)]
    relabelled = [_fake_run({"train.lr": 0.1}, seed=0, label="a"), _fake_run({"train.lr": 0.1}, seed=1, label="b")]
    assert [(g.label, len(g.runs)) for g in compare.group_runs(relabelled)] == [("run", 2)]  # their common name


@pytest.mark.parametrize("labels, expected", [
    (["x", None, "z"], ["x", "train.lr=0.2", "z"]),  # a group without a label gets its differing pairs
    (["same", "same", "z"], ["train.lr=0.1", "train.lr=0.2", "z"]),  # a label two groups share names neither
])
def test_labels_missing_or_shared_fall_back_to_the_differing_pairs(labels, expected):
    runs = [_fake_run({"train.lr": lr}, label=label) for lr, label in zip((0.1, 0.2, 0.3), labels)]
    assert [g.label for g in compare.group_runs(runs)] == expected


def test_distinguishing_pairs_are_the_fewest_keys_that_tell_each_group_apart():
    keys = ("schedule.communication.kind", "schedule.communication.pull", "topology.name")
    settings = [dict(zip(keys, values)) for values in
                [("every", "random_peer", "ring"), ("every", "neighbours", "complete"), ("late", "random_peer", "ring"),
                 ("late", "random_peer", "torus")]]
    assert compare.distinguishing_pairs(settings) == [
        "communication.kind=every, communication.pull=random_peer",  # kind tells it from 3 and 4, pull from 2
        "communication.pull=neighbours",
        "communication.kind=late, topology.name=ring",
        "topology.name=torus",
    ]
    assert compare.distinguishing_pairs([{}]) == [""]


@pytest.mark.parametrize("count", [0, 1, 8, 9, 10, 16, 17, 30])
def test_panels_hold_at_most_eight_groups_each_as_even_as_possible(count):
    chunks = plots.panels(count)
    sizes = [len(chunk) for chunk in chunks]
    assert [k for chunk in chunks for k in chunk] == list(range(count))
    assert len(chunks) == max(1, math.ceil(count / plots.PANEL_GROUPS)) and max(sizes) <= plots.PANEL_GROUPS
    assert max(sizes) - min(sizes) <= 1


def _png_pixels(path: Path) -> np.ndarray:
    from matplotlib import image

    return image.imread(path)


@pytest.mark.parametrize("count", [3, 12])
def test_a_long_legend_stays_inside_the_saved_image(tmp_path, count):
    label = "communication.kind=window, communication.start=0.25, topology.name=circulant, seed-free label {}"
    groups = [compare.Group(label.format(g), {}, [_fake_run({}, [{"step": s, "round": s, "merged_test_accuracy": g + s,
                                                                  "mean_local_test_accuracy": g}
                                                                 for s in range(3)])]) for g in range(count)]
    path = plots.PLOTS["accuracy_vs_round"](groups, tmp_path / "a.png")
    pixels = _png_pixels(path)
    border = np.concatenate([pixels[:4].reshape(-1, 4), pixels[-4:].reshape(-1, 4),
                             pixels[:, :4].reshape(-1, 4), pixels[:, -4:].reshape(-1, 4)])
    assert (border[:, :3] == 1.0).all()  # nothing drawn touches the edge: no legend cut off
    if count > plots.PANEL_GROUPS:
        three = _png_pixels(plots.PLOTS["accuracy_vs_round"](groups[:3], tmp_path / "b.png"))
        assert pixels.shape[0] > 1.5 * three.shape[0]  # two panels stacked


def test_seed_name_and_progress_never_split_groups():
    base = {"seed": 0, "name": "a", "runtime.progress": True, "train.lr": 0.1, "gossip.gamma": 1.0}
    runs = [_fake_run({**base, "seed": 1, "name": "b"}), _fake_run({**base, "runtime.progress": False}),
            _fake_run({**base, "train.lr": 0.2})]
    assert compare.differing_keys(runs) == ["train.lr"]
    grouped = compare.group_runs(runs)
    assert [(g.label, len(g.runs)) for g in grouped] == [("train.lr=0.1", 2), ("train.lr=0.2", 1)]
    assert compare.group_runs(runs[:2])[0].label == "all runs"  # nothing differs, names do


def test_a_key_only_some_runs_have_is_unset_in_the_others():
    runs = [_fake_run({"topology.params.k": 3}), _fake_run({})]
    assert [g.label for g in compare.group_runs(runs)] == ["params.k=3", "params.k=unset"]


@pytest.mark.parametrize("keys, expected", [
    (["gossip.gamma"], {"gossip.gamma": "gossip.gamma"}),
    (["seed"], {"seed": "seed"}),
    (["schedule.averaging_rate.kind", "schedule.communication.kind"],
     {"schedule.averaging_rate.kind": "averaging_rate.kind", "schedule.communication.kind": "communication.kind"}),
    (["a.x.kind", "b.x.kind"], {"a.x.kind": "a.x.kind", "b.x.kind": "b.x.kind"}),
])
def test_short_keys_are_the_shortest_unique_suffix_of_two_parts_or_more(keys, expected):
    assert compare.short_keys(keys) == expected


@pytest.mark.parametrize("value, text", [(None, "null"), (True, "true"), (0.5, "0.5"), (1.0, "1"), (1e-5, "1e-05"),
                                         ((64, 32), "[64, 32]"), ("ring", "ring"), (3, "3")])
def test_format_value(value, text):
    assert compare.format_value(value) == text


def test_flatten_makes_dotted_hashable_keys():
    assert compare.flatten({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": None}) == {"a.b": 1, "a.c": (1, 2), "e": None}


@pytest.mark.parametrize("values, mean, std", [
    ([1.0, 3.0], 2.0, 2**0.5), ([2.0], 2.0, None), ([None, 4.0, 6.0], 5.0, 2**0.5), ([None], None, None)])
def test_mean_std_is_the_sample_std_over_present_values(values, mean, std):
    assert results.mean_std(values) == (pytest.approx(mean) if mean is not None else None,
                                        pytest.approx(std) if std is not None else None)


def test_group_curve_averages_aligned_seeds_point_by_point():
    runs = [_fake_run({}, [{"step": 1, "wall_time_s": 1.0, "acc": 0.2}, {"step": 2, "wall_time_s": 2.0, "acc": 0.4}]),
            _fake_run({}, [{"step": 1, "wall_time_s": 3.0, "acc": 0.4}, {"step": 2, "wall_time_s": 4.0, "acc": 0.8}])]
    curve = plots.group_curve(compare.Group("g", {}, runs), "wall_time_s", "acc")
    np.testing.assert_allclose(curve.x, [2.0, 3.0])
    np.testing.assert_allclose(curve.mean, [0.3, 0.6])
    np.testing.assert_allclose(curve.low, [0.2, 0.4])
    np.testing.assert_allclose(curve.high, [0.4, 0.8])


def test_group_curve_interpolates_misaligned_seeds_on_the_shared_range():
    runs = [_fake_run({}, [{"step": s, "x": float(s), "y": float(s)} for s in (0, 2, 4)]),
            _fake_run({}, [{"step": s, "x": float(s), "y": 2.0 * s} for s in (1, 3, 5)])]
    curve = plots.group_curve(compare.Group("g", {}, runs), "x", "y")
    np.testing.assert_allclose(curve.x, [1, 2, 3, 4])
    np.testing.assert_allclose(curve.mean, [1.5, 3.0, 4.5, 6.0])
    assert plots.group_curve(compare.Group("g", {}, [_fake_run({}, [{"step": 1, "x": 1}])]), "x", "y") is None
