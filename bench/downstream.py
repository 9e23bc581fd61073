"""Downstream fine-tuning of every strategy's last-stage model: the paper's third table at CPU scale.

Usage: python bench/downstream.py [--work /tmp/lifelong-work] [--strategies loire,fixed-small,...]
       [--stage stage-5-CS] [--budget 500] [--seeds 1] [--data ../shared/data] [--threads N]

Reads `<work>/<strategy>/<stage>` (the stage folders `bench/lifelong.py --work DIR` writes), fine-tunes
each on the ten DSP tasks of `loire/tasks/dsp.yaml` at a training budget, and writes
bench/results/downstream.md and .json: rows are strategies, columns the tasks and their average (in %,
mean over seeds, ± std with several seeds), with the majority-class baseline as a last row.
Without `--strategies`, every strategy whose last stage exists is used; a named strategy whose stage
folder is missing, or no stage folder at all, is an error (exit code 2) naming the folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import cpu_counters, foreign_share, machine_facts  # noqa: E402
from loire.downstream import (  # noqa: E402
    DEFAULT_BUDGET,
    TaskResult,
    default_data_root,
    evaluate_downstream,
    load_catalogue,
    summary,
)
from loire.strategies import STRATEGIES  # noqa: E402

DEFAULT_WORK = Path("/tmp/lifelong-work")
DEFAULT_STAGE = "stage-5-CS"
METRIC_SHORT = {"accuracy": "acc", "micro_f1": "µF1", "macro_f1": "MF1"}


def find_stages(work: Path, stage: str, requested: list[str] | None) -> tuple[dict[str, Path], list[str]]:
    """Stage folders by strategy (complete ones hold stage.json) and the strategies without one."""
    names = requested if requested is not None else list(STRATEGIES)
    found = {n: work / n / stage for n in names if (work / n / stage / "stage.json").is_file()}
    return found, [n for n in names if n not in found]


def render(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    m = result["machine"]
    lines = ["# Downstream fine-tuning after the last stage (DSP tasks, gpt-tiny, CPU)", ""]
    lines += [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch thread(s), torch {m['torch']}, {m['date']}; "
        f"other processes used {100 * result['foreign_cpu_share']:.0f}% of the CPU meanwhile.",
        "",
        f"Models: `{result['work']}/<strategy>/{result['stage']}` (bench/lifelong.py). Budget {result['budget']} "
        f"training examples per task (dev ≤ max(200, budget/4), test ≤ max(500, budget/2), seeded subsets); "
        f"seeds {result['seeds']}; settings per task from `loire/tasks/dsp.yaml`. Scores in %, "
        "mean over seeds (± sample std with several seeds); the average is over the ten tasks.",
        "",
    ]
    header = [
        f"{t['name']}{' †' if t['substitute'] else ''} ({t['domain']}, {METRIC_SHORT[t['metric']]})" for t in tasks
    ]
    lines += ["| strategy | " + " | ".join(header) + " | average | wall s |"]
    lines += ["|---|" + "---:|" * (len(tasks) + 2)]
    for name, run in result["strategies"].items():
        by_task = {r["task"]: r for r in run["results"]}
        cells = []
        for t in tasks:
            r = by_task.get(t["name"])
            if r is None or not r["ok"]:
                cells.append("failed")
            elif len(r["scores"]) > 1:
                cells.append(f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}")
            else:
                cells.append(f"{100 * r['mean']:.1f}")
        average = "-" if run["average"] is None else f"{100 * run['average']:.1f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {average} | {run['wall_time_s']:.0f} |")
    if result["strategies"]:
        first = next(iter(result["strategies"].values()))
        by_task = {r["task"]: r for r in first["results"] if r["ok"]}
        cells = [f"{100 * by_task[t['name']]['majority']:.1f}" if t["name"] in by_task else "-" for t in tasks]
        majority = [by_task[t["name"]]["majority"] for t in tasks if t["name"] in by_task]
        avg = f"{100 * statistics.fmean(majority):.1f}" if majority else "-"
        lines.append("| majority class | " + " | ".join(cells) + f" | {avg} | |")
    lines += ["", "† stand-in data for the paper's task:"]
    lines += [f"- {t['name']}: {t['substitute']}" for t in tasks if t["substitute"]]
    lines += ["", "Data notes:"]
    lines += [f"- {t['name']}: {t['note']}" for t in tasks if t["note"]]
    failures = [(n, f) for n, run in result["strategies"].items() for f in run["failures"]]
    if failures:
        lines += ["", "Failures:"] + [f"- {n} / {f['task']}: {f['error']}" for n, f in failures]
    if result["missing"]:
        lines += ["", "Not run (no stage folder): " + ", ".join(result["missing"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(DEFAULT_WORK), help="lifelong work dir (bench/lifelong.py --work)")
    parser.add_argument("--stage", default=DEFAULT_STAGE, help="stage folder name inside each strategy folder")
    parser.add_argument("--strategies", default=None, help="comma-separated (default: all that exist)")
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="training examples per task")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--data", default=default_data_root())
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "downstream.md"))
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    requested = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else None
    stages, missing = find_stages(work, args.stage, requested)
    if requested is not None and missing:
        print(
            f"error: no complete stage folder for {missing} (expected {work}/<strategy>/{args.stage}/stage.json); "
            "run bench/lifelong.py --work first",
            file=sys.stderr,
        )
        return 2
    if not stages:
        print(
            f"error: no stage folders under {work} (expected {work}/<strategy>/{args.stage} for strategies "
            f"{list(STRATEGIES)}); run `python bench/lifelong.py --work {work}` first",
            file=sys.stderr,
        )
        return 2
    catalogue = load_catalogue()
    result: dict[str, Any] = {
        "machine": machine_facts(torch.get_num_threads()),
        "work": str(work),
        "stage": args.stage,
        "budget": args.budget,
        "seeds": list(range(args.seeds)),
        "tasks": [
            {"name": s.name, "domain": s.domain, "metric": s.metric, "substitute": s.substitute, "note": s.note}
            for s in catalogue.values()
            if args.tasks == "all" or s.name in args.tasks.split(",")
        ],
        "missing": missing,
        "strategies": {},
        "foreign_cpu_share": 0.0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started, counters = time.perf_counter(), cpu_counters()
    for name, folder in stages.items():
        print(f"== {name}: {folder}", flush=True)
        t0 = time.perf_counter()
        results = evaluate_downstream(
            folder,
            args.tasks,
            args.data,
            budget=args.budget,
            seeds=args.seeds,
            catalogue=catalogue,
            on_result=lambda r: print(
                f"   {r.task}: {100 * r.mean:.1f} (majority {100 * r.majority:.1f}, {r.wall_time_s:.0f} s)"
                if isinstance(r, TaskResult)
                else f"   {r.task}: FAILED {r.error}",
                flush=True,
            ),
        )
        result["strategies"][name] = summary(results, model_dir=str(folder), wall_time_s=time.perf_counter() - t0)
        result["foreign_cpu_share"] = foreign_share(counters, cpu_counters(), time.perf_counter() - started)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
