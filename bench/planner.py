"""The growth planner against the paper's ladder and its reverse, at the same FLOPs (report only).

Usage:
    python bench/lifelong.py --budget short-planned --strategies loire-kd --seeds 0,1,2   # the runs
    python bench/lifelong.py --budget short-reverse --strategies loire-kd --seeds 0,1,2
    python bench/lifelong.py --budget short --strategies loire-kd --seeds 0,1,2        # the ladder
    python bench/planner.py --budget short                                             # this report

The three schedules share one strategy, `loire-kd` by default (the runs were made as `loire` before it
dropped distillation; moved to runs/loire-kd/, each with a note); `--strategy loire-std0.02` compares the
runs made before the free parameters moved to std 0.1, `--strategy loire` the current default's.
Reads its run files in the three budgets (`bench/results/lifelong/<budget>/runs/<strategy>/`), and
writes `bench/results/planner-<budget>.md`, `.json` and `.png`: last-stage AP and AP+ per stage (mean ±
std over the seeds present), total FLOPs against the ladder's (the planned and reverse schedules give
every stage the ladder's FLOP budget, so they should land within ±5%), and the growth chosen at every
stage (the planner's decision, or the schedule's fixed growth).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCHEDULES = {"ladder": "", "planned": "-planned", "reverse": "-reverse"}


STRATEGY = "loire-kd"


def load_runs(budget: str, strategy: str = STRATEGY) -> list[dict[str, Any]]:
    rows = []
    for name, suffix in SCHEDULES.items():
        for path in sorted((RESULTS / "lifelong" / f"{budget}{suffix}" / "runs" / strategy).glob("seed*.json")):
            run = json.loads(path.read_text())
            rows.append({"schedule": name, "seed": run["seed"], "run": run})
    return rows


def growth_label(stage: dict[str, Any]) -> str:
    targets = stage.get("growth") or {}
    text = " ".join(f"{d}={n}" for d, n in targets.items()) or "none"
    return f"{text} (planned)" if "growth_decision" in stage else text


def summarise(rows: list[dict[str, Any]]):
    import pandas as pd

    records = []
    for r in rows:
        run = r["run"]
        last = run["stages"][-1]
        records.append(
            {
                "schedule": r["schedule"],
                "seed": r["seed"],
                "last_ap": last["ap"],
                "max_ap_plus": max((s["ap_plus"] for s in run["stages"] if s["ap_plus"] is not None), default=None),
                "total_flops": run["total_flops"],
                **{f"ap_plus_{s['stage']}": s["ap_plus"] for s in run["stages"] if s["ap_plus"] is not None},
                **{f"growth_{s['stage']}": growth_label(s) for s in run["stages"][1:]},
                **{f"flops_{s['stage']}": s["flops"] for s in run["stages"]},
            }
        )
    frame = pd.DataFrame(records)
    numeric = frame.drop(columns=[c for c in frame.columns if c.startswith("growth_")] + ["seed"])
    stats = numeric.groupby("schedule").agg(["mean", "std", "count"])
    return frame, stats


def render(budget: str, frame, stats, strategy: str = STRATEGY) -> str:
    ladder_flops = stats.loc["ladder", ("total_flops", "mean")] if "ladder" in stats.index else None
    lines = [
        f"# Growth planner vs the ladder and its reverse (`{budget}` budget, strategy `{strategy}`)",
        "",
        "Same five domains (WB → NEWS → REV → BIO → CS), same strategy and settings; the planned and reverse "
        "schedules give every stage the ladder's FLOP budget (probes included). Mean ± std over the seeds run "
        "(n). Rebuild: `python bench/planner.py --budget " + budget + " --strategy " + strategy + "`.",
        "",
        "![planner](planner-" + budget + ".png)",
        "",
        "| schedule | n | last-stage AP | AP+ per stage (2..5) | total FLOPs | vs ladder |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for name in stats.index:
        row = stats.loc[name]
        n = int(row[("last_ap", "count")])
        std = row[("last_ap", "std")]
        ap = f"{row[('last_ap', 'mean')]:.1f}" + (f" ± {std:.1f}" if n > 1 else "")
        plus = ", ".join(
            f"{row[(f'ap_plus_{t}', 'mean')]:.1f}" for t in range(2, 6) if (f"ap_plus_{t}", "mean") in row.index
        )
        flops = row[("total_flops", "mean")]
        ratio = f"{flops / ladder_flops:.3f}x" if ladder_flops else "-"
        lines.append(f"| {name} | {n} | {ap} | {plus} | {flops:.3g} | {ratio} |")
    lines += [
        "",
        "## Growth per stage (seed by seed)",
        "",
        "| schedule | seed | stage 2 | stage 3 | stage 4 | stage 5 |",
    ]
    lines.append("|---|---:|---|---|---|---|")
    for _, r in frame.sort_values(["schedule", "seed"]).iterrows():
        cells = [str(r.get(f"growth_{t}", "")) for t in range(2, 6)]
        lines.append(f"| {r['schedule']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(budget: str, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"ladder": "C0", "planned": "C1", "reverse": "C2"}
    for name in SCHEDULES:
        runs = [r["run"] for r in rows if r["schedule"] == name]
        for i, run in enumerate(runs):
            stages = [s["stage"] for s in run["stages"]]
            style = {"alpha": 0.8, "color": colors[name], "label": name if i == 0 else None}
            ax1.plot(stages, [s["ap"] for s in run["stages"]], marker="o", **style)
            ax2.plot(stages, [s["cumulative_flops"] for s in run["stages"]], marker=".", **style)
    ax1.set(xlabel="stage", ylabel="AP (mean PPL over seen domains)", title=f"AP per stage ({budget})")
    ax2.set(xlabel="stage", ylabel="cumulative FLOPs", title="compute")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=["short", "long"], default="short")
    parser.add_argument("--strategy", default=STRATEGY, help=f"whose runs to compare (default {STRATEGY})")
    args = parser.parse_args(argv)
    rows = load_runs(args.budget, args.strategy)
    if not rows:
        where = f"bench/results/lifelong/{args.budget}{{,-planned,-reverse}}/runs/{args.strategy}/"
        sys.exit(f"no {args.strategy} runs under {where}")
    frame, stats = summarise(rows)
    (RESULTS / f"planner-{args.budget}.md").write_text(render(args.budget, frame, stats, args.strategy))
    (RESULTS / f"planner-{args.budget}.json").write_text(frame.to_json(orient="records", indent=2))
    plot(args.budget, rows, RESULTS / f"planner-{args.budget}.png")
    print((RESULTS / f"planner-{args.budget}.md").read_text())


if __name__ == "__main__":
    main()
