"""What carries `loire-er`'s result: replay ratio and distillation window, one change at a time.

Usage: python bench/lifelong_ablation.py [--data ../shared/data] [--jobs 2] [--variants a,b,...]
Runs each variant over the five real domains at gpt-tiny (the same runner as bench/lifelong.py) in
`--jobs` worker processes with one thread each, and writes bench/results/lifelong_ablation.md and .json.
A variant is a `loire.strategies` entry with some fields replaced, registered under its own name for
the run (run_stage checks that a parent stage used the same strategy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine_facts  # noqa: E402
from loire.lifelong import run_lifelong  # noqa: E402
from loire.schedule import schedule_preset  # noqa: E402
from loire.strategies import REPLAY_RATIO, STRATEGIES, Strategy  # noqa: E402

DOMAINS = ["WB", "NEWS", "REV", "BIO", "CS"]
# name -> (base strategy, replaced fields, what it tests)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "loire-er": ("loire-er", {}, "the default: distillation / plug-in window 25 steps"),
    "loire-er-w50": ("loire-er", {"distill_steps": 50}, "window 50"),
    "loire-er-nokd": ("loire-er", {"distill": "none"}, "no distillation (λ window still 25)"),
    "loire-er-r20": ("loire-er", {"replay_ratio": 0.2, "distill_steps": 50}, "replay 0.2, window 50 (earlier default)"),
    "loire-er-seed1": ("loire-er", {"seed": 1}, "the default with schedule seed 1: run-to-run spread"),
    "loire-er-nokd-seed1": ("loire-er", {"distill": "none", "seed": 1}, "no distillation, seed 1"),
    "replay": ("replay", {}, "ER at the same ratio, M1 size"),
    "replay-r20": ("replay", {"replay_ratio": 0.2}, "ER at 0.2"),
    "elle-r50": ("elle", {"replay_ratio": REPLAY_RATIO}, "ELLE at the same ratio (its scripts use 0.1)"),
    "elle-r50-seed1": ("elle", {"replay_ratio": REPLAY_RATIO, "seed": 1}, "ELLE at the same ratio, seed 1"),
    "elle-r50-growth-only": (
        "elle",
        {"replay_ratio": REPLAY_RATIO, "domain_prompts": False, "recover_fraction": 0.0},
        "ELLE's expansion alone at the same ratio: no prompts, no recovery warmup (vs loire-er-nokd)",
    ),
}


def variant(name: str) -> tuple[Strategy, int]:
    """The variant's strategy and schedule seed (0 unless the variant sets `seed`)."""
    base, fields, _ = VARIANTS[name]
    fields = dict(fields)
    seed = fields.pop("seed", 0)
    return dataclasses.replace(STRATEGIES[base], name=name, **fields), seed


def run_one(name: str, data: str, work: Path, steps: int | None = None) -> dict[str, Any]:
    """One variant in this process (the worker side)."""
    torch.set_num_threads(1)
    STRATEGIES[name], seed = variant(name)
    schedule = dataclasses.replace(schedule_preset("gpt-tiny"), seed=seed)
    summary = run_lifelong(data, DOMAINS, work / name, schedule=schedule, strategy=name, steps=steps, progress=False)
    summary["strategy_fields"] = dataclasses.asdict(STRATEGIES[name])
    summary["seed"] = seed
    return summary


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# LOIRE+ER ablation over WB → NEWS → REV → BIO → CS (gpt-tiny, CPU)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (one thread per run, {result['jobs']} runs at a time), "
        f"torch {m['torch']}, {m['date']}. Schedule preset `gpt-tiny` ({result['steps'] or 'its'} steps per "
        "stage), seed 0 unless named; FLOPs include "
        "the teachers' forward passes. The two seed-1 runs show how far AP moves with the seed alone.",
        "",
        "| variant | what changes | replay | window | AP (last stage) | AP+ per stage (2..5) | total FLOPs |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for name, s in result["variants"].items():
        f = s["strategy_fields"]
        steps = f["distill_steps"] or "schedule"
        window = steps if f["distill"] != "none" else f"{steps} (λ only)" if f["growth"] == "exact" else "-"
        ap_plus = ", ".join(f"{st['ap_plus']:.1f}" for st in s["stages"][1:])
        lines.append(
            f"| {name} | {VARIANTS[name][2]} | {f['replay_ratio']} | {window} | {s['stages'][-1]['ap']:.1f} | "
            f"{ap_plus} | {s['total_flops']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", default=None)
    parser.add_argument("--steps", type=int, default=None, help="override every stage's steps (smoke runs)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lifelong_ablation.md"))
    parser.add_argument("--keep", action="store_true", help="keep the other variants already in the output JSON")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="loire-ablation-"))
    if args.worker:
        print(json.dumps(run_one(args.worker, args.data, work, args.steps)))
        return
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")

    out = Path(args.out)
    kept: dict[str, Any] = {}
    if args.keep and out.with_suffix(".json").exists():
        previous = json.loads(out.with_suffix(".json").read_text())
        if previous.get("steps") != args.steps:
            raise SystemExit(f"--keep: {out.with_suffix('.json')} was run with --steps {previous.get('steps')}")
        kept = previous["variants"]

    def spawn(name: str) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--worker", name, "--data", args.data, "--work", str(work)]
        cmd += ["--steps", str(args.steps)] if args.steps else []
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        print(f"== {name} done", flush=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    slow_first = sorted(names, key=lambda n: VARIANTS[n][0] != "elle")  # ELLE's runs take the longest
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = dict(zip(slow_first, pool.map(spawn, slow_first), strict=True))
    summaries = {n: done.get(n) or kept[n] for n in VARIANTS if n in done or n in kept}
    result = {"machine": machine_facts(args.jobs), "jobs": args.jobs, "steps": args.steps, "variants": summaries}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
