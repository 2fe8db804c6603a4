"""Tables and plots of the claim (b) re-run: tuning per rule, the picks over seeds 0 1 2, curves over training."""
import json, statistics, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT, DOCS = Path(sys.argv[1]), Path(sys.argv[2])
PARTS = [p for p in sys.argv[3].split(",") if (ROOT / p / "trials.json").is_file()]
DOCS.mkdir(parents=True, exist_ok=True)


def records(folder):
    return [json.loads(l) for l in (Path(folder) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def pm(values, d=4):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{d}f}"
    return f"{statistics.fmean(values):.{d}f} ± {statistics.stdev(values):.{d}f}"


out = []
for part in PARTS:
    trials = json.loads((ROOT / part / "trials.json").read_text())
    rows = {(r["point"], r["seed"]): r for r in trials["trials"]}
    out.append(f"### {part}: tuning (seeds 0, 1; mean_local_validation_accuracy, mean ± std over the two seeds)\n")
    out.append("| rule | gamma | local val. acc | min agent val. acc (last record, mean) | consensus distance at the end, seed 0 / 1 | rejected |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    picks = {}
    for point in sorted(trials["points"], key=lambda p: p["point"]):
        s = point["settings"]
        recs = {seed: records(rows[(point["point"], seed)]["run_dir"]) for seed in (0, 1)}
        mins = [recs[seed][-1].get("min_local_validation_accuracy") for seed in (0, 1)]
        cds = " / ".join(f"{recs[seed][-1]['consensus_distance']:.3g}" for seed in (0, 1))
        rule = s["gossip.rule"]
        out.append(f"| {rule} | {s['gossip.gamma']:g} | {point['mean']:.4f} ± {point['std'] or 0:.4f} | "
                   f"{statistics.fmean(mins):.4f} | {cds} | {'; '.join(point['rejected'])} |")
    for point in trials["points"]:  # ranked best first
        rule = point["settings"]["gossip.rule"]
        if rule not in picks and not point["rejected"] and point["finished"]:
            picks[rule] = point
    out.append("")
    out.append(f"Picks: " + ", ".join(f"{rule} gamma {p['settings']['gossip.gamma']:g} ({p['mean']:.4f})"
                                      for rule, p in picks.items()) + "\n")
    finals = {}
    for rule, point in picks.items():
        folders = [rows[(point["point"], seed)]["run_dir"] for seed in (0, 1)] + \
            [str(ROOT / part / f"pick-{rule}-s{seed}") for seed in (2, 3, 4)]
        finals[rule] = [f for f in folders if (Path(f) / "summary.json").is_file()]
    out.append(f"### {part}: at the picks, seeds 0 to {max(len(v) for v in finals.values()) - 1} (test set: reported, never used to pick)\n")
    out.append("| rule, gamma | seeds | mean local test acc | min agent test acc | merged test acc (after final merge) | mean local val. acc | consensus distance at the end |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    per_seed = {}
    for rule, folders in finals.items():
        summaries = [json.loads((Path(f) / "summary.json").read_text()) for f in folders]
        lasts = [records(f)[-1] for f in folders]
        per_seed[rule] = {json.loads(json.dumps(s)).get("seed", k): s for k, s in enumerate(summaries)}
        out.append(f"| {rule} {picks[rule]['settings']['gossip.gamma']:g} | {len(folders)} | "
                   f"{pm([s['mean_local_test_accuracy'] for s in summaries])} | "
                   f"{pm([l['min_local_test_accuracy'] for l in lasts])} | "
                   f"{pm([s['merged_test_accuracy'] for s in summaries])} | "
                   f"{pm([l['mean_local_validation_accuracy'] for l in lasts])} | "
                   f"{pm([l['consensus_distance'] for l in lasts], 3)} |")
    if len(finals) == 2 and len(finals["choco"]) == len(finals["adagossip"]):
        diffs = {}
        for key in ("mean_local_test_accuracy", "merged_test_accuracy"):
            a = [json.loads((Path(f) / "summary.json").read_text())[key] for f in finals["adagossip"]]
            c = [json.loads((Path(f) / "summary.json").read_text())[key] for f in finals["choco"]]
            diffs[key] = pm([x - y for x, y in zip(a, c)])
        out.append(f"\nAdaGossip minus CHOCO-SGD, per seed (same seed, same data split): mean local test acc "
                   f"{diffs['mean_local_test_accuracy']}, merged {diffs['merged_test_accuracy']}\n")
    # plots
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colours = {"choco": "tab:blue", "adagossip": "tab:red"}
    for rule, folders in finals.items():
        for k, f in enumerate(folders):
            recs = records(f)
            ep = [r["epoch"] for r in recs]
            lab = f"{rule} {picks[rule]['settings']['gossip.gamma']:g}" if k == 0 else None
            axes[0, 0].plot(ep, [r["mean_local_test_accuracy"] for r in recs], color=colours[rule], label=lab, marker="o", ms=3)
            axes[0, 0].plot(ep, [r["min_local_test_accuracy"] for r in recs], color=colours[rule], ls=":", lw=1)
            axes[0, 1].semilogy(ep, [r["consensus_distance"] for r in recs], color=colours[rule], label=lab, marker="o", ms=3)
    n = max(len(v) for v in finals.values())
    axes[0, 0].set(title=f"{part}: mean (solid), min (dotted) local test acc., picks, seeds 0-{n - 1}", xlabel="epoch")
    axes[0, 1].set(title="consensus distance at the picks", xlabel="epoch")
    for ax in axes[0]:
        ax.legend()
    for col, rule in enumerate(("choco", "adagossip")):
        ax = axes[1, col]
        for point in sorted(trials["points"], key=lambda p: p["settings"]["gossip.gamma"]):
            if point["settings"]["gossip.rule"] != rule:
                continue
            recs = records(rows[(point["point"], 0)]["run_dir"])
            ax.semilogy([r["epoch"] for r in recs], [max(r["consensus_distance"], 1e-6) for r in recs],
                        marker="o", ms=3, label=f"gamma {point['settings']['gossip.gamma']:g}"
                        + (" (rejected)" if point["rejected"] else ""))
        ax.set(title=f"{rule}: consensus distance per gamma (seed 0)", xlabel="epoch")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / f"{part}_curves.png", dpi=90)
    (DOCS / f"{part}_trials.md").write_text((ROOT / part / "trials.md").read_text())
text = "\n".join(out) + "\n"
(DOCS / "tables.md").write_text(text)
print(text)
