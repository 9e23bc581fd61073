"""Where does `loire` forget at stage 2, and which lever stops it? One lever at a time, stage 2 only.

Usage: python bench/forgetting_levers.py [--data ../shared/data] [--variants a,b] [--work DIR]

The `long` benchmark's only positive AP+ of `loire` is at stage 2 (WB perplexity 134.4 -> 150.4 while
the model grows to hidden 128 and learns NEWS; seed 0). This script reruns exactly that stage of the
`long` budget (`gpt-tiny-long`, seed 0, 128 validation blocks per domain) from one shared stage-1
model, with one change at a time to the `loire` strategy or the stage's settings, and reports WB and
NEWS perplexity after the stage, AP+ (= WB after stage 2 - WB after stage 1) and the stage's FLOPs.

Levers (why each is a candidate):
- `mem2`:   replay memory of half the new domain's training blocks per earlier domain instead of a
            tenth: at a tenth, 750 steps x 8 memory blocks per batch replay each stored WB block ~3.7
            times, so the memory is memorised rather than the domain kept (a property of the benchmark,
            shared by every replaying strategy).
- `lr5e-4`: half the later stages' peak learning rate: re-warming to a high LR is what forgets
            (Ibrahim et al. 2024).
- `kdfull`: distil from the stage-1 teacher over the whole stage instead of its first 8%.
- `mem2-kdfull`: both; `mem5`: a memory of a fifth; `mem2-nokd`: memory 1/2 without distillation.
Writes bench/results/forgetting_levers.md and .json after every variant (finished ones are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import loire.lifelong as lifelong  # noqa: E402
from bench.common import machine_facts  # noqa: E402
from loire.lifelong import corpus_uri, run_stage  # noqa: E402
from loire.schedule import Schedule, schedule_preset  # noqa: E402
from loire.strategies import STRATEGIES  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EVAL_BLOCKS = 128  # as the `long` benchmark

# name -> (strategy field changes, stage-2 spec changes, replay memory divisor, what)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], int, str]] = {
    "loire": ({}, {}, 10, "the default: replay 0.5 from a memory of 1/10, distillation over the first 8%"),
    "mem2": ({}, {}, 2, "replay memory of 1/2 the new domain's blocks per earlier domain"),
    "lr5e-4": ({}, {"lr": 5e-4}, 10, "later-stage peak lr 5e-4 instead of 1e-3"),
    "kdfull": ({"distill_fraction": None}, {}, 10, "distillation over the whole stage"),
    "mem2-kdfull": ({"distill_fraction": None}, {}, 2, "memory 1/2 and distillation over the whole stage"),
    "mem2-lr5e-4": ({}, {"lr": 5e-4}, 2, "memory 1/2 and lr 5e-4"),
    "mem5": ({}, {}, 5, "replay memory of 1/5 the new domain's blocks per earlier domain"),
    "mem2-nokd": ({"distill": "none"}, {}, 2, "memory 1/2 without distillation"),
    "mem2-random": ({"growth": "random"}, {}, 2, "memory 1/2, new parameters random (not exact)"),
    "mem2-free0.1": ({"growth_free_std": 0.1}, {}, 2, "memory 1/2, exact growth with free parameters at std 0.1"),
}


def stage_two_schedule(changes: dict[str, Any]) -> Schedule:
    sched = schedule_preset("gpt-tiny-long")
    stages = list(sched.stages)
    stages[1] = dataclasses.replace(stages[1], **changes)
    return dataclasses.replace(sched, stages=tuple(stages))


def _parent_for(stage_one: Path, strat: str, work: Path) -> Path:
    """A copy of the shared stage-1 folder recorded under the variant's strategy name (run_stage refuses a
    parent trained by another strategy; stage 1 of every variant is the same plain training on WB)."""
    copy = work / f"stage-1-WB-{strat}"
    if not copy.exists():
        shutil.copytree(stage_one, copy)
        rec = json.loads((copy / "stage.json").read_text())
        rec["strategy"] = strat
        rec["lineage"][-1]["model_dir"] = str(copy)  # the teacher of stage 2 is this stage-1 model
        (copy / "stage.json").write_text(json.dumps(rec, indent=2))
    return copy


def run_variant(name: str, parent: Path, data: str, work: Path) -> dict[str, Any]:
    fields, spec_changes, divisor, what = VARIANTS[name]
    strat = f"levers-{name}"
    STRATEGIES[strat] = dataclasses.replace(STRATEGIES["loire"], name=strat, **fields)
    lifelong.REPLAY_MEMORY_DIVISOR = divisor
    out = work / f"stage-2-{name}"
    parent = _parent_for(parent, strat, work)
    started = time.perf_counter()
    result = run_stage(
        "NEWS",
        corpus_uri(data, "NEWS"),
        out,
        parent=parent,
        schedule=stage_two_schedule(spec_changes),
        strategy=strat,
        max_eval_blocks=EVAL_BLOCKS,
        progress=False,
    )
    rec = json.loads((out / "stage.json").read_text())
    first = json.loads((parent / "stage.json").read_text())
    wb1, wb2, news = first["ppl"]["WB"], rec["ppl"]["WB"], rec["ppl"]["NEWS"]
    del result
    return {
        "variant": name,
        "what": what,
        "ppl_WB_stage1": wb1,
        "ppl_WB": wb2,
        "ppl_NEWS": news,
        "ap_plus": wb2 - wb1,
        "ap": (wb2 + news) / 2,
        "flops": rec["flops"]["stage"],
        "wall_s": time.perf_counter() - started,
    }


def render(rows: list[dict[str, Any]], machine: str) -> str:
    lines = [
        "# Forgetting levers at stage 2 of the `long` budget (`loire`, seed 0)",
        "",
        f"Machine: {machine}. Stage 2 of `gpt-tiny-long` (hidden 64 -> 128, 750 steps of NEWS, batch 16 x 64) "
        "from one shared stage-1 model (1000 steps of WB), one change at a time; perplexity on 128 validation "
        "blocks per domain. AP+ = WB after stage 2 - WB after stage 1 (the `long` benchmark's only positive "
        "AP+ of `loire`). `python bench/forgetting_levers.py` reruns it.",
        "",
        "| variant | what | WB after stage 1 | WB after stage 2 | NEWS | AP | AP+ | stage FLOPs | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['what']} | {r['ppl_WB_stage1']:.1f} | {r['ppl_WB']:.1f} | {r['ppl_NEWS']:.1f} "
            f"| {r['ap']:.1f} | {r['ap_plus']:+.1f} | {r['flops']:.2e} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", default="/tmp/loire-forgetting")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    parent = work / "stage-1-WB"
    if not (parent / "stage.json").exists():
        run_stage(
            "WB",
            corpus_uri(args.data, "WB"),
            parent,
            schedule="gpt-tiny-long",
            strategy="loire",
            max_eval_blocks=EVAL_BLOCKS,
            progress=False,
        )
    json_path = RESULTS / "forgetting_levers.json"
    done = {r["variant"]: r for r in json.loads(json_path.read_text())["rows"]} if json_path.exists() else {}
    machine = machine_facts(1)
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown {name!r}; known: {', '.join(VARIANTS)}")
        if name in done:
            continue
        done[name] = run_variant(name, parent, args.data, work)
        rows = [done[n] for n in VARIANTS if n in done]
        json_path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
        (RESULTS / "forgetting_levers.md").write_text(render(rows, str(machine)))
        print(f"{name}: WB {done[name]['ppl_WB']:.1f} NEWS {done[name]['ppl_NEWS']:.1f}", flush=True)


if __name__ == "__main__":
    main()
