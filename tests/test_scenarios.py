"""Scenario scripts at the smoke scale end to end (one seed), their variants at every scale, and every YAML config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raygossip.algorithms.topology import build_topology
from raygossip.core.plan import RunPlan
from raygossip.timeline_builder import Timeline
from raygossip.validation import load_config
from scenarios import (
    adagossip_vs_choco, adaptive_vs_ars, ars_vs_constant, bandwidth_collapse, churn, common, failures,
    late_communication, partition_heal, plot_window_position, straggler_recovery, stragglers, timeline_common,
    topologies,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE_SCENARIOS = [ars_vs_constant, adagossip_vs_choco, topologies, adaptive_vs_ars]
TIMELINE_SCENARIOS = [churn, partition_heal, straggler_recovery, bandwidth_collapse]
ALL_SCENARIOS = [*REFERENCE_SCENARIOS, late_communication, stragglers, failures, *TIMELINE_SCENARIOS]
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))


def short(module) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def assert_run_folders(outcomes, out: Path) -> None:
    for outcome in outcomes:
        assert outcome.out_dir.parent == out
        summary = json.loads((outcome.out_dir / "summary.json").read_text())
        assert summary["merged_test_accuracy"] == outcome.summary["merged_test_accuracy"]
        assert (outcome.out_dir / "config.yaml").is_file() and (outcome.out_dir / "metrics.jsonl").is_file()
        assert load_config(outcome.out_dir / "config.yaml").seed == outcome.seed


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_yaml_config_loads(path):
    config = load_config(path)
    if path.parent.name in ("papers", "cpu"):
        assert config.name == path.stem


def test_paper_and_cpu_configs_cover_the_papers():
    papers = {p.stem for p in (REPO / "configs" / "papers").glob("*.yaml")}
    assert {"ars_cifar10_resnet20", "ars_cifar10_vgg11", "ars_fashionmnist_lenet5", "single_merge_cifar100_resnet18",
            "adagossip_cifar10_resnet20_ring", "adagossip_cifar10_resnet20_torus",
            "adagossip_cifar10_resnet20_dyck"} <= papers
    ars = load_config(REPO / "configs" / "papers" / "ars_cifar10_resnet20.yaml")
    assert (ars.model.name, ars.model.norm, ars.agents.count, ars.topology.name) == ("resnet20", "evonorm", 16, "ring")
    assert (ars.schedule.averaging_rate.gamma0, ars.schedule.averaging_rate.growth, ars.train.epochs) == (0.09, 1.01, 300)
    vgg = load_config(REPO / "configs" / "papers" / "ars_cifar10_vgg11.yaml")
    assert (vgg.model.name, vgg.model.width) == ("vgg11", 0.25)
    merge = load_config(REPO / "configs" / "papers" / "single_merge_cifar100_resnet18.yaml")
    comm = merge.schedule.communication
    assert (comm.kind, comm.p, comm.pull, merge.train.local_steps, merge.train.optimizer) == (
        "probability", 0.2, "random_peer", 100, "sgd")
    assert merge.schedule.final_merge.enabled
    for path in sorted((REPO / "configs" / "cpu").glob("*.yaml")):
        config = load_config(path)
        assert config.data.name == "mnist" and config.data.download is False, path.name


@pytest.mark.parametrize("scale", ["cpu", "paper"])
@pytest.mark.parametrize("module", ALL_SCENARIOS, ids=short)
def test_scenario_variants_build_at_every_scale(module, scale):
    variants = module.variants(scale)
    labels = [label for label, _ in variants]
    assert len(labels) == len(set(labels)) and len(labels) >= 3
    names = {config.name for _, config in variants}
    assert len(names) == len(labels)  # one config name (and run folder) per variant
    assert [config.label for _, config in variants] == labels  # what `raygossip compare` names its groups by


def test_ars_variants_follow_the_protocol_and_scale_the_ramp_to_training_length():
    variants = dict(ars_vs_constant.variants("cpu"))
    ars = variants["ARS gamma0=0.09 (x1.285/epoch), alpha=0.01"]
    assert (ars.agents.count, ars.train.lr, ars.train.lr_schedule.milestones, ars.train.steps_per_epoch) == (
        16, 0.1, [0.5, 0.6], None)  # real epochs
    assert ars.schedule.final_merge.enabled and ars.eval.validation_fraction > 0
    plan_gamma = lambda epoch: min(1.0, 0.09 * ars.schedule.averaging_rate.growth ** (epoch + 1))  # noqa: E731
    assert plan_gamma(0) < 0.12 and plan_gamma(round(0.8 * ars.train.epochs) - 1) == pytest.approx(1.0, abs=0.01)
    assert variants["constant gamma=1, alpha=1"].data.partition.alpha == 1.0
    grid = ars_vs_constant.tuning_grid(ars_vs_constant.base_of("cpu", []), "cpu")
    kinds = [rate["kind"] for rate in grid["schedule.averaging_rate"]]
    assert kinds.count("ars") == kinds.count("constant") == 3  # the same tuning budget for both
    paper = dict(ars_vs_constant.variants("paper"))
    growth = paper["ARS gamma0=0.09 (x1.01/epoch), alpha=0.01"].schedule.averaging_rate.growth
    assert growth == pytest.approx(1.01, abs=1e-3)


def test_adagossip_grid_gives_each_rule_its_own_five_points_half_a_decade_apart():
    from raygossip.sweep_grid import grid_points, parse_grid

    grid = adagossip_vs_choco.tuning_grid("cpu")
    assert grid["gossip.rule"] == ["choco", "adagossip"] and "gossip.gamma" not in grid
    for rule in ("choco", "adagossip"):
        gammas = grid[f"gossip.gamma@gossip.rule={rule}"]
        assert len(gammas) == 5 and all(1 < b / a <= 10 ** 0.5 for a, b in zip(gammas, gammas[1:]))
    assert max(grid["gossip.gamma@gossip.rule=adagossip"]) <= min(grid["gossip.gamma@gossip.rule=choco"])
    assert [p["kind"] for p in grid["data.partition"]] == ["iid", "dirichlet_lin"]
    points = grid_points(grid)
    assert len(points) == 2 * 4 * 2 * 5
    # the sweep command line parses back to the same grid
    items = [f"{key}={json.dumps(values)}" for key, values in adagossip_vs_choco.tuning_grid("cpu", ["top-k 10%"]).items()]
    assert len(grid_points(parse_grid(items))) == 2 * 2 * 5
    variants = dict(adagossip_vs_choco.variants("cpu", picks={(0.1, "adagossip", "sign"): 0.02}))
    assert len(variants) == 16 and variants["adagossip, sign, alpha=0.1"].gossip.gamma == 0.02
    assert variants["choco, QSGD 4 bit, IID"].gossip.compressor.scaled
    assert len(adagossip_vs_choco.variants("cpu", compressor=["top-k 10%"])) == 4


def test_adagossip_picks_skip_rejected_points_and_the_table_shows_each_rules_grid():
    grid = adagossip_vs_choco.tuning_grid("smoke", ["top-k 10%"])
    topk = adagossip_vs_choco.COMPRESSORS["top-k 10%"]

    def point(rule, gamma, mean, rejected=()):
        return {"settings": {"data.partition": {"kind": "iid"}, "gossip.rule": rule, "gossip.compressor": topk,
                             "gossip.gamma": gamma}, "finished": True, "mean": mean, "std": 0.001,
                "rejected": list(rejected)}

    trials = {"grid": grid, "points": [point("choco", 0.5, 0.97, ["seed 1: consensus distance grew 1 -> 9"]),
                                       point("choco", 0.1, 0.95), point("adagossip", 0.02, 0.96),
                                       point("adagossip", 0.005, 0.94)]}
    assert adagossip_vs_choco.picks_of(trials) == {(None, "choco", "top-k 10%"): 0.1,
                                                   (None, "adagossip", "top-k 10%"): 0.02}
    table = adagossip_vs_choco.tuning_table(trials)
    assert "0.5: 0.9700 ± 0.0010 (rejected)" in table and "0.1: 0.9500 ± 0.0010 **picked**" in table
    assert "0.02: 0.9600 ± 0.0010 **picked**" in table


def test_tuning_picks_per_group_and_the_final_runs_reuse_its_trials(tmp_path):
    from scenarios import tuning

    label, config = ars_vs_constant.variants("smoke")[0]
    (sweep_run,) = common.run_variants([(label, config)], [0], tmp_path / "sweep", log=None)
    settings = lambda kind, g: {"data.partition": {"kind": "iid"},  # noqa: E731
                                "schedule.averaging_rate": {"kind": kind, "gamma0": g}}
    trials = {"points": [{"settings": settings("constant", 0.5), "finished": True, "mean": 0.9},
                         {"settings": settings("ars", 0.3), "finished": False, "mean": 0.95},  # diverged: not picked
                         {"settings": settings("ars", 0.09), "finished": True, "mean": 0.8},
                         {"settings": settings("constant", 1.0), "finished": True, "mean": 0.7}],
              "trials": [{"run_dir": str(sweep_run.out_dir), "status": "finished"}]}
    assert ars_vs_constant.picks_of(trials, "smoke") == {(None, "constant"): 0.5, (None, "ars"): 0.09}
    reuse = tuning.reusable_runs(trials)
    assert list(reuse.values()) == [sweep_run.out_dir]
    renamed = (label + " again", config)
    outcomes = common.run_variants([renamed], [0, 1], tmp_path / "final", log=None, reuse=reuse)
    copied, fresh = outcomes
    assert copied.summary == sweep_run.summary and copied.records == sweep_run.records
    assert load_config(copied.out_dir / "config.yaml").label == label  # rewritten with the final run's config
    assert fresh.seed == 1 and fresh.summary["merged_test_accuracy"] is not None


@pytest.mark.parametrize("scale", ["smoke", "cpu"])
def test_late_communication_windows_hold_a_tenth_of_the_rounds_and_r02_elsewhere(scale):
    kinds = {}
    for label, config in late_communication.variants(scale):
        assert config.topology.name == "random" and config.topology.params["r"] == 0.2, label
        assert config.schedule.final_merge.enabled, label
        topology = build_topology(config.topology.name, config.agents.count, config.topology.weights,
                                  config.topology.params)
        plan = RunPlan(config, topology, config.train.steps_per_epoch)
        kinds[label] = [plan.communication(r).kind for r in range(plan.total_rounds)]
    rounds = len(kinds["r=0.2, no window"])
    for k, start in enumerate(late_communication.POSITIONS):
        window = [r for r, kind in enumerate(kinds[late_communication.window_label(start)]) if kind == "allreduce"]
        assert window == list(range(k * rounds // 10, (k + 1) * rounds // 10))  # the k-th tenth, the same width
        assert kinds[late_communication.window_label(start)].count("every") == rounds - len(window)
    assert set(kinds["r=0.2, no window"]) == {"every"} and set(kinds["no communication"]) == {"none"}
    assert set(kinds["all-reduce every round"]) == {"allreduce"}
    if scale == "cpu":
        config = dict(late_communication.variants("cpu"))["r=0.2, no window"]
        train = config.train
        assert (config.agents.count, train.local_steps, train.optimizer, train.momentum, train.lr_schedule.kind,
                train.label_smoothing, train.grad_clip_value) == (16, 50, "sgd", 0.9, "constant", 0.1, 1.0)
        assert config.data.partition.kind == "preference" and config.data.partition.resample


# ---------------------------------------------------------------- smoke runs


@pytest.mark.parametrize("module", REFERENCE_SCENARIOS, ids=short)
def test_smoke_scale_runs_end_to_end(module, tmp_path):
    variants = module.variants("smoke")
    outcomes = common.run_variants(variants, [0], tmp_path, log=None)
    assert [o.label for o in outcomes] == [label for label, _ in variants]
    assert_run_folders(outcomes, tmp_path)
    table = module.report(outcomes)
    for label, _ in variants:
        assert f"| {label} | 0 |" in table
    by_label = {o.label: o.summary for o in outcomes}
    for label, summary in by_label.items():
        if label.startswith("local"):
            assert summary["bytes_sent"] == 0
        if label.startswith("parallel SGD") or label == "complete":
            assert summary["consensus_distance"] == pytest.approx(0.0, abs=1e-9)


def test_late_communication_script_main_writes_tables(tmp_path, capsys):
    out = tmp_path / "late"
    assert late_communication.COMMAND(["--scale", "smoke", "--seeds", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Mergeability" in printed and "| r=0.2 + all-reduce 90%-100% | 0 |" in printed
    assert "Gap to parallel SGD" in printed and "Spearman" in printed and "| no communication | " in printed
    folders = sorted(p.name for p in out.iterdir())
    assert len(folders) == len(late_communication.variants("smoke")) and all((out / f / "summary.json").is_file()
                                                                           for f in folders)
    assert (tmp_path / "late.md").read_text().count("\n| ") > 10
    summaries = {f: json.loads((out / f / "summary.json").read_text()) for f in folders}
    assert summaries["no-communication-seed0"]["bytes_sent"] == 0
    assert summaries["no-communication-seed0"]["final_merge"] is True
    every = summaries["all-reduce-every-round-seed0"]
    assert every["merged_test_accuracy"] == pytest.approx(every["mean_local_test_accuracy"])  # one model after each
    assert "merged_validation_accuracy" in every
    png = tmp_path / "window.png"
    assert plot_window_position.COMMAND([str(out), "--out", str(png)]) == 0 and png.stat().st_size > 1000


def test_every_scenario_is_registered_and_python_m_scenarios_lists_them(capsys):
    from scenarios import SCENARIOS, summary
    from scenarios.__main__ import main

    helpers = {"__init__", "__main__", "common", "tuning"}
    assert set(SCENARIOS.values()) == {p.stem for p in (REPO / "scenarios").glob("*.py")} - helpers
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(SCENARIOS)
    assert all(summary(name) and summary(name) in line for name, line in zip(SCENARIOS, listed))
    assert main(["no_such_scenario"]) == 2 and "no scenario 'no_such_scenario'" in capsys.readouterr().err


def test_a_tuned_scenario_with_no_tune_runs_its_default_picks(tmp_path, capsys):
    """The tune-then-run hook's options reach the scenario; --no-tune runs the variants with picks=None."""
    out = tmp_path / "ars"
    assert ars_vs_constant.COMMAND(["--scale", "smoke", "--no-tune", "--engine", "reference", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Tuning sweep" not in printed
    labels = [label for label, _ in ars_vs_constant.variants("smoke", (), None)]
    assert all(f"| {label} | 0 |" in printed for label in labels)
    for module, options in ((ars_vs_constant, ("--tune-out", "--no-tune")),
                            (adagossip_vs_choco, ("--graph", "--tune-out", "--no-tune"))):
        with pytest.raises(SystemExit):
            module.COMMAND(["--help"])
        shown = capsys.readouterr().out
        assert shown.startswith(f"usage: python -m scenarios {module.SCENARIO}") and all(o in shown for o in options)


def test_stragglers_smoke_on_the_ray_engine_with_an_observer(ray_cluster, tmp_path):
    variants = stragglers.variants("smoke")
    assert {config.runtime.engine for _, config in variants} == {"ray"}
    assert {config.runtime.mode for _, config in variants} == {"sync", "bounded", "async"}
    watch = stragglers.Watch(echo=None)
    outcomes = common.run_variants(variants, [0], tmp_path, observer=watch, log=None)
    assert_run_folders(outcomes, tmp_path)
    for outcome in outcomes:
        seen = [record for _, record in watch.arrivals[(outcome.label, 0)]]
        assert seen == outcome.records and seen  # the callback saw every record, in order
        assert outcome.summary["engine"] == "ray" and outcome.summary["train_s"] > 0
    slow = {o.label: o.summary for o in outcomes}["sync"]
    assert any(e.get("kind") == "slow_agent" for e in slow["events"])
    table = stragglers.report(outcomes, watch)
    assert "| async | 0 |" in table and "train s" in table


def test_stragglers_refuses_the_reference_engine(capsys):
    assert stragglers.COMMAND(["--scale", "smoke", "--engine", "reference", "--out", "unused"]) == 2
    assert "Ray engine" in capsys.readouterr().err


def test_failure_variants_share_everything_but_the_faults():
    variants = dict(failures.variants("cpu"))
    assert len(variants) == 9 and {config.runtime.engine for config in variants.values()} == {"ray"}
    assert {config.runtime.mode for config in variants.values()} == {"sync"}
    kill = variants["D-PSGD, kill 25% at round 75, drop"]
    assert (kill.faults.kill_fraction, kill.faults.kill_round, kill.runtime.on_failure) == (0.25, 75, "drop")
    lossy = {label: config.faults for label, config in variants.items() if "lost" in label}
    assert {label: (f.drop_messages, f.recovery) for label, f in lossy.items()} == {
        "D-PSGD, 10% messages lost": (0.1, "resync"), "CHOCO top-k 10%, 10% messages lost, resync": (0.1, "resync"),
        "CHOCO top-k 10%, 10% messages lost, no recovery": (0.1, "none")}
    base = variants["D-PSGD, no failures"]
    assert base.runtime.timing.step_time_s * 75 > 20  # the second half outlasts a restart
    for config in variants.values():
        assert (config.data, config.model, config.topology, config.train, config.seed) == (
            base.data, base.model, base.topology, base.train, base.seed)


def test_failures_smoke_reports_failures_only_where_injected(ray_cluster, tmp_path, capsys):
    out = tmp_path / "failures"
    assert failures.COMMAND(["--scale", "smoke", "--seeds", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    variants = failures.variants("smoke")
    for label, _ in variants:
        assert f"| {label} | 0 |" in printed
    assert "detection s" in printed and "recovery s" in printed
    assert (tmp_path / "failures.md").is_file()
    csv = (tmp_path / "failures.csv").read_text().splitlines()
    assert csv[0].startswith("label,seed,merged_acc") and len(csv) == 1 + len(variants)
    summaries = {label: json.loads((out / f"{common.slug(label)}-seed0" / "summary.json").read_text())
                 for label, _ in variants}
    for label, summary in summaries.items():
        assert summary["status"] == "finished" and summary["engine"] == "ray", label
        if "kill" in label:
            (failure,) = summary["failures"]  # round(0.25 * 3 agents)
            assert failure["injected_round"] == 8 and failure["detection_s"] >= 0
            action = "restarted" if label.endswith("restart") else "dropped"
            assert failure["action"] == action
            if action == "restarted":
                assert summary["restarts"] == 1 and failure["recovery_s"] > 0
            else:
                assert summary["dropped_agents"] == [failure["agent"]]
        else:
            assert summary["failures"] == [] and summary["restarts"] == 0 and summary["dropped_agents"] == []
    assert summaries["D-PSGD, 10% messages lost"]["lost_messages"] > 0
    assert summaries["D-PSGD, no failures"]["lost_messages"] == 0


def test_failures_refuses_the_reference_engine(capsys):
    assert failures.COMMAND(["--scale", "smoke", "--engine", "reference", "--out", "unused"]) == 2
    assert "Ray engine" in capsys.readouterr().err


# ---------------------------------------------------------------- timeline scenarios


TIMELINE_ACTIONS = {"churn": ["leave", "join"], "partition_heal": ["partition", "heal"],
                    "straggler_recovery": ["slow", "restore"], "bandwidth_collapse": ["link", "link"]}


@pytest.mark.parametrize("scale", common.SCALES)
@pytest.mark.parametrize("module", TIMELINE_SCENARIOS, ids=short)
def test_timeline_scenario_variants_compare_the_three_modes_around_one_event_window(module, scale):
    variants = dict(module.variants(scale))
    assert {config.runtime.engine for config in variants.values()} == {"ray"}
    timed = {label: config for label, config in variants.items() if config.timeline}
    assert {config.runtime.mode for config in timed.values()} == {"sync", "bounded", "async"}
    assert {config.runtime.staleness for config in timed.values()} == {timeline_common.STALENESS}
    rounds = failures.total_rounds(common.deep_merge(timeline_common.base(scale)[0], {}))
    for label, config in timed.items():
        events = config.timeline
        assert [e.action for e in events] == TIMELINE_ACTIONS[short(module)], label
        assert all(e.time_s is None for e in events)  # at round boundaries: sync stays deterministic
        assert 0 < events[0].round < events[1].round < rounds, label
        if config.gossip.rule != "dpsgd":  # CHOCO only where the family is about compression, with link events
            assert short(module) == "bandwidth_collapse" and config.gossip.compressor.name == "top_k"
    n = next(iter(variants.values())).agents.count
    if module is churn:
        leave = next(iter(timed.values())).timeline[0]
        assert len(leave.agents) == max(1, n // 4) and {e.timeline[1].start for e in timed.values()} == {
            "neighbour", "scratch"}
    if module is partition_heal:
        groups = next(iter(timed.values())).timeline[0].groups
        assert sorted(a for g in groups for a in g) == list(range(n)) and len(groups) == 2
    if module is straggler_recovery:
        assert {config.timeline[0].factor for config in timed.values()} == {straggler_recovery.FACTOR}
    if module is bandwidth_collapse:
        assert {config.gossip.rule for config in timed.values()} == {"dpsgd", "choco"}
        for config in timed.values():
            assert config.runtime.timing.bandwidth_mbps == bandwidth_collapse.BANDWIDTH_MBPS  # timing simulated
            assert config.timeline[0].bandwidth_mbps < config.timeline[1].bandwidth_mbps


@pytest.mark.parametrize("mode, join_from", [("sync", "neighbour"), ("async", "scratch")])
def test_churn_smoke_run_leaves_and_rejoins_on_the_ray_engine(ray_cluster, tmp_path, mode, join_from):
    from conftest import wait_for_idle_cluster

    wait_for_idle_cluster()  # (the previous test's actors, still stepping, would slow some agents and not others)
    if join_from == "neighbour":
        (label, config), = [v for v in churn.variants("smoke") if v[0] == "sync, join from neighbour"]
    else:  # a scratch joiner has no model to wait for, yet it must come back when the others get there, not as soon
        # as it went through its absent rounds (in no time): async, where nothing else paces it
        data, _ = timeline_common.base("smoke", [])
        data = common.deep_merge(data, {"train": {"epochs": 4, "steps_per_epoch": 10},
                                        "runtime": {"timing": {"step_time_s": 0.05}}})
        events = Timeline().at(round=5).leave([1]).at(round=30).join([1], start="scratch").build()
        (label, config), = timeline_common.mode_variants("churn", data, events, ", join from scratch",
                                                        modes=[("async", "async")])
    (outcome,) = common.run_variants([(label, config)], [0], tmp_path, log=None)
    assert_run_folders([outcome], tmp_path)
    summary = outcome.summary
    assert summary["status"] == "finished" and summary["engine"] == "ray" and summary["mode"] == mode
    events = [e for e in summary["events"] if e["kind"] == "timeline"]
    start, end = (e.round for e in outcome.config.timeline)
    assert [(e["action"], e["round"], e["agents"]) for e in events] == [("leave", start, [1]), ("join", end, [1])]
    # The join took effect when the sponsor's model of round end - 1 came: after its rounds 0..end-1 (each step at
    # least step_time_s from the run's start), not as soon as the away agent had skipped through them. (Measured
    # from the leave, as before, this was flaky in async mode: an agent that lags the others by end - start rounds
    # when it leaves, on a busy machine, finds its sponsor's model already there, as it should.)
    step_time = outcome.config.runtime.timing.step_time_s
    assert events[1]["time_s"] >= end * outcome.config.train.local_steps * step_time
    assert not [e for e in summary["events"] if e["kind"] == "join_timeout"]
    away = [r for r in outcome.records if start < r["round"] <= end]
    assert away and all(r["agents"] == [0, 2, 3] for r in away)  # records leave the agent out while it is away
    assert "agents" not in outcome.records[-1]
    table = churn.report([outcome])
    assert f"| {label} | 0 |" in table and f"leave@{start}, join@{end}" in table
