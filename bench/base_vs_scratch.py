"""Lifelong growth from a pretrained base vs from scratch, same final size and FLOPs (the paper's
LOIRE-GPT1 vs LOIRE-GPT2 comparison).

Usage:
    python bench/base_vs_scratch.py --budget short --seeds 0,1 --jobs 2   # the runs (resumable) and the report
    python bench/base_vs_scratch.py --budget short --report               # the report from the runs on file
    python bench/base_vs_scratch.py --budget short --seeds 0 --steps 3    # a smoke run (its own folder)

No pretrained checkpoint can be downloaded here, and no package this project installs ships GPT-2-family
weights (transformers, tokenizers and datasets ship code only), so the base is pretrained here, once:
the `gpt-tiny` ladder's M1 (hidden 64, FFN 256, 2 heads, 2 layers) trained by `loire.lifelong.run_stage`
for `PRETRAIN_STEPS` on general English that is none of the five domains (the MNLI and QNLI train
samples' sentences in shared/data: text only, no labels; they are the WB domain's downstream tasks, and
AP here measures only the domain corpora), with its own byte-level BPE (4096), and exported with
`loire.convert.to_hf` to a GPT-2 folder (safetensors + tokenizer) as a team's checkpoint would be.

The two chains differ only in the start: `base` imports that folder; `scratch` imports the same folder
with its weights re-drawn by GPT2LMHeadModel's own init (seed = the run's seed). Same tokenizer (so the
perplexities are comparable), same ladder (stage 1 grows nothing from M1, then Hidden -> FFN -> MHA ->
Layer), same strategy (`loire-kd`: the default when measured), same FLOPs per stage; the base's
pretraining FLOPs are reported apart (a team has already paid them). Each (start, seed) run writes
`bench/results/base_vs_scratch/<budget>/<start>/seed<k>.json` when it finishes; the report
`bench/results/base_vs_scratch-<budget>.md` / `.json` / `.png` is rebuilt from the files present.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import machine_facts  # noqa: E402
from loire.schedule import DOMAINS, schedule_preset  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DATA = ROOT.parent / "shared" / "data"
BUDGETS = {
    "short": {"schedule": "gpt-tiny", "eval_blocks": 32},
    "long": {"schedule": "gpt-tiny-long", "eval_blocks": 128},
}
STARTS = ("base", "scratch")
# The base's pretraining: 1000 steps of 16 x 64 tokens (about 1M tokens, 1.5 passes over the ~0.7M
# tokens of the two samples), 5x stage 1 of the short ladder: enough that the base is clearly past
# random (the report gives its held-out perplexity) at a few minutes on one thread.
PRETRAIN_STEPS = 1000
PRETRAIN_FILES = ("mnli/mnli_train_sample.jsonl", "qnli/qnli_train_sample.jsonl")
PRETRAIN_SEED = 1234  # one base for every seed: a team has one checkpoint


def general_corpus(data: Path, out: Path) -> Path:
    """The MNLI + QNLI train samples' sentences as a one-file JSONL corpus folder (text only)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "general.jsonl").open("w", encoding="utf-8") as fh:
        for name in PRETRAIN_FILES:
            for line in (data / name).read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                text = f"{row['sentence1']} {row['sentence2']}".strip()
                fh.write(json.dumps({"text": text}) + "\n")
    return out


def pretrain_base(data: Path, folder: Path, budget: str, steps: int = PRETRAIN_STEPS) -> dict[str, Any]:
    """Train M1 on the general corpus and write it as an HF GPT-2 folder; returns its facts."""
    from loire.convert import to_hf
    from loire.io import load_model
    from loire.lifelong import read_stage, run_stage
    from loire.tokenizer import load_tokenizer

    schedule = schedule_preset(BUDGETS[budget]["schedule"])
    warmup = min(schedule.stages[0].warmup_steps, steps)
    first = dataclasses.replace(schedule.stages[0], steps=steps, warmup_steps=warmup, max_train_tokens=None)
    schedule = dataclasses.replace(schedule, stages=(first, *schedule.stages[1:]), seed=PRETRAIN_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = general_corpus(data, Path(tmp) / "general")
        stage = Path(tmp) / "stage"
        started = time.time()
        run_stage("GEN", str(corpus), stage, schedule=schedule, strategy="loire", device="cpu", progress=False)
        record = read_stage(stage)
        hf = to_hf(load_model(stage), family="gpt2")
        hf.save_pretrained(folder, safe_serialization=True)
        load_tokenizer(stage).save_pretrained(folder)
    facts = {
        "steps": steps,
        "files": list(PRETRAIN_FILES),
        "heldout_ppl": record["ppl"]["GEN"],
        "flops": record["flops"]["stage"],
        "wall_time_s": time.time() - started,
        "dims": record["dims"],
    }
    (folder / "pretrain.json").write_text(json.dumps(facts, indent=2))
    return facts


def scratch_copy(base: Path, folder: Path, seed: int) -> Path:
    """The base folder with its weights re-drawn by the architecture's own init (same config, tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shutil.copytree(base, folder)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config.from_pretrained(base)).save_pretrained(folder, safe_serialization=True)
    return folder


def run_file(budget: str, start: str, seed: int) -> Path:
    return RESULTS / "base_vs_scratch" / budget / start / f"seed{seed}.json"


def one_run(budget: str, start: str, seed: int, base: str, work: str, steps: int | None = None) -> str:
    """One lifelong chain in this process (one thread); writes its run file last."""
    from loire.lifelong import run_lifelong

    torch.set_num_threads(1)
    label = budget if steps is None else f"{budget}-steps{steps}"
    out = Path(work) / label / start / f"seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    start_dir = Path(base) if start == "base" else scratch_copy(Path(base), out.parent / f"scratch-base-{seed}", seed)
    began = time.time()
    summary = run_lifelong(
        str(DATA), DOMAINS, out / "chain", strategy="loire-kd", schedule=BUDGETS[budget]["schedule"],
        device="cpu", steps=steps, seed=seed, max_eval_blocks=BUDGETS[budget]["eval_blocks"], progress=False,
        base=start_dir, eval_init=True,
    )  # fmt: skip
    summary.update(start=start, budget=label, wall_s=time.time() - began, machine=machine_facts(1))
    path = run_file(label, start, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=float))
    return str(path)


def load_runs(budget: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for s in STARTS for p in sorted(run_file(budget, s, 0).parent.glob("seed*.json"))]


def _pm(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.1f} ± {std:.1f}"


def report(budget: str, pretrain: dict[str, Any] | None) -> str:
    runs = load_runs(budget)
    by = {s: [r for r in runs if r["start"] == s] for s in STARTS}
    lines = [
        f"# Lifelong from a pretrained base vs from scratch (`{budget}` budget, strategy `loire`)",
        "",
        "Same tokenizer, same ladder, same FLOPs per stage; only the start differs (bench/base_vs_scratch.py "
        "says how the base was made). Mean ± std over the seeds run (n).",
        "",
    ]
    if pretrain:
        lines += [
            f"Base: gpt-tiny M1 pretrained {pretrain['steps']} steps on {', '.join(pretrain['files'])} "
            f"(held-out perplexity {pretrain['heldout_ppl']:.1f}, {pretrain['flops']:.3g} FLOPs, "
            f"{pretrain['wall_time_s']:.0f} s on one thread; not counted below).",
            "",
        ]
    lines += [
        "| start | n | stage | domain | PPL init → final (new domain) | AP | AP+ | cumulative FLOPs |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for start, rs in by.items():
        if not rs:
            continue
        for k, st in enumerate(rs[0]["stages"]):
            dom = st["domain"]
            init = [r["stages"][k].get("ppl_init", {}).get(dom) for r in rs]
            final = [r["stages"][k]["ppl"][dom] for r in rs]
            ap = [r["stages"][k]["ap"] for r in rs]
            plus = [r["stages"][k]["ap_plus"] for r in rs if r["stages"][k]["ap_plus"] is not None]
            init_s = _pm([v for v in init if v is not None]) if all(v is not None for v in init) else "-"
            lines.append(
                f"| {start} | {len(rs)} | {st['stage']} | {dom} | {init_s} → {_pm(final)} | {_pm(ap)} | "
                f"{_pm(plus) if plus else '-'} | {st['cumulative_flops']:.3g} |"
            )
    if by["base"] and by["scratch"]:
        b = [r["stages"][-1]["ap"] for r in by["base"]]
        s = [r["stages"][-1]["ap"] for r in by["scratch"]]
        lines += [
            "",
            f"Last-stage AP: base {_pm(b)}, scratch {_pm(s)} (difference {sum(s) / len(s) - sum(b) / len(b):+.1f}).",
        ]
    machine = runs[0]["machine"] if runs else None
    if machine:
        lines += [
            "",
            f"Machine: {machine['cpu']}, {machine['cores']} cores, one torch thread per run, torch {machine['torch']}.",
        ]
    return "\n".join(lines) + "\n"


def plot(budget: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(budget)
    fig, ax = plt.subplots(figsize=(6, 4))
    for start, color in zip(STARTS, ("tab:blue", "tab:orange"), strict=True):
        for k, r in enumerate(rr for rr in runs if rr["start"] == start):
            stages = [s["stage"] for s in r["stages"]]
            ap = [s["ap"] for s in r["stages"]]
            ax.plot(stages, ap, marker="o", color=color, alpha=0.8, label=start if k == 0 else None)
    ax.set(
        xlabel="stage", ylabel="AP (mean PPL over seen domains; lower is better)", title=f"base vs scratch ({budget})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="short")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", default=None, help="where the chains are written (default: a temporary folder)")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the run files")
    parser.add_argument("--steps", type=int, default=None, help="smoke run: this many steps everywhere")
    args = parser.parse_args(argv)
    label = args.budget if args.steps is None else f"{args.budget}-steps{args.steps}"
    facts_file = RESULTS / "base_vs_scratch" / label / "pretrain.json"
    if not args.report:
        if not DATA.is_dir():
            sys.exit(f"{DATA}: the shared data folder is needed (see its SOURCES.md)")
        work = Path(args.work or tempfile.mkdtemp(prefix="loire-base-vs-scratch-"))
        base = work / "base"
        if not (base / "model.safetensors").is_file():
            torch.set_num_threads(2)
            facts = pretrain_base(DATA, base, args.budget, args.steps or PRETRAIN_STEPS)
            facts_file.parent.mkdir(parents=True, exist_ok=True)
            facts_file.write_text(json.dumps(facts, indent=2))
        todo = [(s, int(k)) for k in args.seeds.split(",") for s in STARTS if not run_file(label, s, int(k)).exists()]
        print(f"{len(todo)} run(s) to do, {args.jobs} at a time: {todo}", flush=True)
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(one_run, args.budget, s, k, str(base), str(work), args.steps) for s, k in todo]
            for f in futures:
                print("wrote", f.result(), flush=True)
    pretrain = json.loads(facts_file.read_text()) if facts_file.exists() else None
    text = report(label, pretrain)
    (RESULTS / f"base_vs_scratch-{label}.md").write_text(text)
    (RESULTS / f"base_vs_scratch-{label}.json").write_text(json.dumps(load_runs(label), indent=2, default=float))
    plot(label, RESULTS / f"base_vs_scratch-{label}.png")
    print(text)


if __name__ == "__main__":
    main()
