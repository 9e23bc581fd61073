"""Every strategy over the five real domains, several seeds: AP / AP+ (mean ± std), FLOPs, plots.

Usage:
    python bench/lifelong.py --budget long --jobs 2                        # continue the planned runs (PLANNED_LONG)
    python bench/lifelong.py --budget long --strategies loire,elle --seeds 0,1,2   # these, seed-major
    python bench/lifelong.py --budget long --report                        # tables and plots from what exists
    python bench/lifelong.py --budget short --strategies loire,replay --seeds 0 --steps 5   # a smoke run

Budgets: `short` is the `gpt-tiny` schedule (200 + 4 x 150 steps per stage, 32 validation blocks per
domain: what the tests and earlier results use); `long` is `gpt-tiny-long` (5x the steps, warmup and
distillation window, about one epoch of each domain; 128 validation blocks of 64 tokens per domain).

Each (strategy, seed) run is one worker process with one torch thread; `--jobs` of them run at once.
A run writes `bench/results/lifelong/<budget>/runs/<strategy>/seed<k>.json` when it finishes, so an
interrupted benchmark continues where it stopped (finished runs are never redone unless `--redo`).
The report (`lifelong-<budget>.md`, `.json` with the per-seed rows, and PNGs beside it) is rebuilt
from every run file present: mean ± std over seeds (pandas groupby), last-stage AP against total
FLOPs with the Pareto front, the mean PPL_{t,i} matrix of each strategy as a heat map, and the
operator ablation (exact vs zero vs random initialisation of the new parameters).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from bench.common import machine_facts  # noqa: E402
from loire.lifelong import REPLAY_MEMORY_DIVISOR, run_lifelong  # noqa: E402
from loire.schedule import DOMAINS  # noqa: E402
from loire.strategies import REPLAY_RATIO, STRATEGIES  # noqa: E402

RESULTS = ROOT / "bench" / "results"
BUDGETS: dict[str, dict[str, Any]] = {
    "short": {"schedule": "gpt-tiny", "eval_blocks": 32},
    "long": {"schedule": "gpt-tiny-long", "eval_blocks": 128},
    # The growth planner against the ladder's reverse (bench/planner.py compares them with the ladder):
    # the same stages, each at the ladder's FLOPs.
    "short-planned": {"schedule": "gpt-tiny-planned", "eval_blocks": 32},
    "short-reverse": {"schedule": "gpt-tiny-reverse", "eval_blocks": 32},
    "long-planned": {"schedule": "gpt-tiny-long-planned", "eval_blocks": 128},
    "long-reverse": {"schedule": "gpt-tiny-long-reverse", "eval_blocks": 128},
}
MAIN = ["loire", "loire-kd", "loire-er", "fixed-small", "fixed-large", "retrain", "token-kd", "replay", "elle"]
# Benchmark-only variants: (base strategy, replaced fields). `elle-er` is ELLE at the replay ratio that
# `replay` and `loire-er` use, so growth + distillation is compared with ELLE at equal replay.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "elle-er": ("elle", {"replay_ratio": REPLAY_RATIO}),
    # `loire` before its free parameters moved to std 0.1 (the runs under runs/loire-std0.02/ were made
    # as `loire` then, with distillation; their strategy_fields say growth_free_std None)
    "loire-std0.02": ("loire-kd", {"growth_free_std": None}),
    # what carries `loire` (one change at a time against the default it was measured against: the
    # 0.02 one with distillation, pinned so the runs on file keep their meaning)
    "loire-nokd": ("loire-kd", {"distill": "none", "growth_free_std": None}),
    "loire-kdfull": ("loire-kd", {"distill_fraction": None, "growth_free_std": None}),
    "loire-noreplay": ("loire-kd", {"replay_ratio": 0.0, "distill_fraction": None, "growth_free_std": None}),
    "loire-r10": ("loire-kd", {"replay_ratio": 0.1, "distill_fraction": None, "growth_free_std": None}),
    "loire-r10-nokd": ("loire-kd", {"replay_ratio": 0.1, "distill": "none", "growth_free_std": None}),
    "loire-split": ("loire-kd", {"growth_init": "split", "growth_free_std": None}),
    # exact growth whose free ("any value") parameters start at std 0.1 instead of 0.02 (the lever that
    # bench/forgetting_levers.py found at stage 2): the variant that became the default then, identical
    # to `loire-kd` now (its runs were moved to runs/loire/ then, and with them to runs/loire-kd/)
    "loire-free0.1": ("loire-kd", {"growth_free_std": 0.1}),
    # one change against `loire-kd` (free parameters at 0.1): does distillation earn its cost, and in
    # which regime (no replay) does it lower forgetting? `loire-nokd-std0.1` became the default `loire`
    # (its 3 seeds were moved to runs/loire/, each with a note); the same at a low replay ratio.
    "loire-nokd-std0.1": ("loire-kd", {"distill": "none"}),
    "loire-noreplay-std0.1": ("loire-kd-noreplay", {}),  # the same fields as that registered strategy
    "loire-noreplay-nokd-std0.1": ("loire-kd", {"replay_ratio": 0.0, "distill": "none"}),
    "loire-r10-std0.1": ("loire-kd", {"replay_ratio": 0.1, "distill_fraction": None}),
    "loire-r10-nokd-std0.1": ("loire-kd", {"replay_ratio": 0.1, "distill": "none"}),
    # the learning-rate re-decay lever (issue: "re-warming and re-decay per stage"): each stage re-warms
    # as before but stays at its peak rate instead of decaying to a tenth (bench/planner_horizon.py: at
    # stage 2 a constant rate reached a lower held-out loss than the stage's cosine for every candidate).
    # Against `replay` as well: a lever every strategy would get is a benchmark setting, not a LOIRE win.
    # (`loire-constlr` and `replay-constlr` are made with the other `-constlr` variants below)
    "elle-er-constlr": ("elle", {"replay_ratio": REPLAY_RATIO, "min_lr_ratio": 1.0}),  # the closest contender
    # the optimizer-state lever: AdamW's moments carried through every growth (loire.moments) instead of a
    # cold optimizer at each stage; one change against `loire`
    "loire-carry": ("loire", {"carry_moments": True}),
}
# The comparison again under a constant rate after each stage's warmup (docs/training.md: it helps the
# strategies that replay and hurts those that do not). Does the ranking hold under it?
CONSTLR = "-constlr"
for _name in ["loire", "replay", "loire-kd", "loire-er", "fixed-small", "fixed-large", "token-kd", "elle", "retrain"]:
    VARIANTS[_name + CONSTLR] = (_name, {"min_lr_ratio": 1.0})
ABLATION = ["loire-kd", "loire-zero", "loire-random"]  # all three distil (the paper's LOIRE)
# The `long` benchmark's run order (what `--budget long` runs when neither --runs nor --strategies is
# given). Finished runs are skipped, so a later session continues in this order. Done first: seed 0 of
# every strategy, then `loire-free0.1`'s seeds (which made it `loire`: its runs are under runs/loire/,
# the old default's under runs/loire-std0.02/). Next: the contenders' third seeds for mean ± std, the
# operator ablation's seeds, `retrain` (it retrains on everything seen at every stage: 4.3x the steps;
# seed 0 took 69 min of stage wall time, two runs at once), the remaining seeds and the one-change
# variants. About 12-30 min per run here, two at once; `--resume` continues an interrupted run.
PLANNED_LONG = [
    *[(n, s) for s in (1, 2) for n in ["loire", "elle-er", "replay", "loire-er"]],
    *[(n, s) for s in (1, 2) for n in ["loire-zero", "loire-random", "loire-std0.02"]],
    *[("loire", s) for s in (0, 1, 2)],  # run as loire-nokd-std0.1 (now the default: runs moved, with notes)
    *[(n, 0) for n in ["loire-noreplay-std0.1", "loire-noreplay-nokd-std0.1"]],
    *[(n, 0) for n in ["loire-constlr", "replay-constlr"]],  # the LR re-decay lever, against ER too
    *[(n, 0) for n in ["loire-r10-std0.1", "loire-r10-nokd-std0.1"]],  # distillation at low replay
    ("retrain", 0),
    *[(n, 0) for n in ["fixed-large", "token-kd", "fixed-small", "loire-noreplay", "loire-kdfull"]],
    *[(n, s) for s in (1, 2) for n in ["fixed-large", "elle", "token-kd", "fixed-small", "retrain"]],
    *[(n, s) for s in (1, 2) for n in ["loire-nokd"]],
    *[(n, 0) for n in ["loire-r10", "loire-r10-nokd", "loire-split"]],
    *[("loire-carry", s) for s in (0, 1, 2)],  # the optimizer-state lever
    *[("elle-er-constlr", s) for s in (0, 1, 2)],  # is LOIRE's lead over ELLE-ER the same at a constant LR?
    # the rest of the comparison under the constant rate, seed 0 (retrain last: it is the longest)
    *[(n + CONSTLR, 0) for n in ["loire-er", "elle", "fixed-large", "token-kd", "loire-kd", "fixed-small"]],
    ("retrain" + CONSTLR, 0),
]
# The comparison set for LOIRE's last-stage AP: every strategy except retrain.
COMPARED = ["loire-kd", "loire-er", "fixed-small", "fixed-large", "token-kd", "replay", "elle", "elle-er"]


def strategy_for(name: str):
    """The Strategy behind a benchmark name (registered in STRATEGIES so run_stage can look it up)."""
    if name in VARIANTS:
        base, fields = VARIANTS[name]
        STRATEGIES[name] = dataclasses.replace(STRATEGIES[base], name=name, **fields)
    if name not in STRATEGIES:
        raise SystemExit(f"--strategies: unknown {name!r}; known: {', '.join([*STRATEGIES, *VARIANTS])}")
    return STRATEGIES[name]


def run_file(budget: str, strategy: str, seed: int) -> Path:
    return RESULTS / "lifelong" / budget / "runs" / strategy / f"seed{seed}.json"


def label(args: argparse.Namespace) -> str:
    """Where a run's files go: the budget, or a separate smoke folder when --steps overrides it."""
    return args.budget if args.steps is None else f"{args.budget}-steps{args.steps}"


def worker(args: argparse.Namespace) -> None:
    """One (strategy, seed) run in this process, one thread; writes its run file last."""
    torch.set_num_threads(1)
    budget = BUDGETS[args.budget]
    strat = strategy_for(args.strategy)
    work = Path(args.work) / args.budget / args.strategy / f"seed{args.seed}"
    started = time.time()
    summary = run_lifelong(
        args.data,
        DOMAINS,
        work,
        strategy=args.strategy,
        schedule=budget["schedule"],
        steps=args.steps,
        seed=args.seed,
        max_eval_blocks=budget["eval_blocks"],
        progress=False,
        resume=args.resume,
    )
    summary.update(
        budget=args.budget,
        steps_override=args.steps,
        strategy_fields=dataclasses.asdict(strat),
        machine=machine_facts(1),
        started=started,
        work=str(work),
    )
    out = run_file(label(args), args.strategy, args.seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out)


def launch(args: argparse.Namespace, strategy: str, seed: int) -> tuple[str, int, int, float]:
    """Run one worker subprocess; its log goes beside the run file."""
    log = run_file(label(args), strategy, seed).with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", "--strategy", strategy, "--seed", str(seed)]
    cmd += ["--budget", args.budget, "--data", args.data, "--work", args.work]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.resume:
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, check=False).returncode
    wall = time.perf_counter() - started
    print(f"{'done' if rc == 0 else f'FAILED rc={rc}'}: {strategy} seed {seed} in {wall:.0f} s (log {log})", flush=True)
    return strategy, seed, rc, wall


# ---------------------------------------------------------------------------------------------- report


def load_runs(budget: str) -> list[dict[str, Any]]:
    root = RESULTS / "lifelong" / budget / "runs"
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/seed*.json"))]


def stage_frame(runs: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (strategy, seed, stage): AP, AP+, FLOPs, wall time and PPL per domain."""
    rows = []
    for run in runs:
        for st in run["stages"]:
            rows.append(
                {
                    "strategy": run["strategy"],
                    "seed": run["seed"],
                    "stage": st["stage"],
                    "domain": st["domain"],
                    "ap": st["ap"],
                    "ap_plus": st["ap_plus"],
                    "cumulative_flops": st["cumulative_flops"],
                    "wall_s": st["wall_time_s"],
                    "growth_diff": st["growth_max_abs_logit_diff"],
                    **{f"ppl_{d}": st["ppl"].get(d) for d in DOMAINS},
                }
            )
    return pd.DataFrame(rows)


def summary_frame(stages: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: last-stage AP, total FLOPs, AP+ per stage, wall time; mean and std over seeds."""
    last = stages[stages.stage == stages.stage.max()]
    per_run = last.set_index(["strategy", "seed"])[["ap", "cumulative_flops"]]
    per_run["wall_s"] = stages.groupby(["strategy", "seed"]).wall_s.sum()
    per_run["max_ap_plus"] = stages.groupby(["strategy", "seed"]).ap_plus.max()
    agg = per_run.groupby("strategy").agg(["mean", "std", "count"])
    agg.columns = [f"{a}_{b}" for a, b in agg.columns]
    ap_plus = stages.dropna(subset=["ap_plus"]).groupby(["strategy", "stage"]).ap_plus.agg(["mean", "std"])
    agg["ap_plus"] = [
        [(s, ap_plus.loc[(name, s), "mean"], ap_plus.loc[(name, s), "std"]) for s in sorted(stages.stage.unique())[1:]]
        if (name, 2) in ap_plus.index
        else []
        for name in agg.index
    ]
    return agg.sort_values("ap_mean")


def pm(mean: float, std: float, fmt: str = ".1f") -> str:
    return f"{mean:{fmt}}" if pd.isna(std) else f"{mean:{fmt}} ± {std:{fmt}}"


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated in (FLOPs, AP): no other point has both lower or equal, one strictly lower."""
    front = []
    for name, (f, a) in points.items():
        if not any((f2 <= f and a2 <= a) and (f2 < f or a2 < a) for n2, (f2, a2) in points.items() if n2 != name):
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def plot_ap_flops(summary: pd.DataFrame, path: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {n: (r.cumulative_flops_mean, r.ap_mean) for n, r in summary.iterrows()}
    front = pareto(points)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in summary.iterrows():
        on = name in front
        ax.errorbar(
            r.cumulative_flops_mean,
            r.ap_mean,
            xerr=0 if pd.isna(r.cumulative_flops_std) else r.cumulative_flops_std,
            yerr=0 if pd.isna(r.ap_std) else r.ap_std,
            fmt="o" if on else "s",
            capsize=4,
            ms=8 if on else 6,
            label=f"{name}{' (Pareto)' if on else ''}",
        )
        ax.annotate(name, (r.cumulative_flops_mean, r.ap_mean), textcoords="offset points", xytext=(6, 4), fontsize=8)
    fx, fy = zip(*(points[n] for n in front), strict=True)
    ax.step(fx, fy, where="post", color="black", lw=1, ls="--", label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("total training FLOPs over the five stages (incl. teacher passes)")
    ax.set_ylabel("last-stage AP (mean PPL over the five domains; lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return front


def plot_heatmaps(stages: pd.DataFrame, path: Path, order: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [f"ppl_{d}" for d in DOMAINS]
    mean = stages.groupby(["strategy", "stage"])[cols].mean()
    n = len(order)
    ncol = min(4, n)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 3.3 * nrow), squeeze=False)
    values = np.log10(mean.to_numpy(dtype=float))
    vmin, vmax = np.nanmin(values), np.nanmax(values)
    for ax, name in zip(axes.flat, order, strict=False):
        m = mean.loc[name].to_numpy(dtype=float)
        im = ax.imshow(np.log10(m), cmap="viridis", vmin=vmin, vmax=vmax)
        for (i, j), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_xticks(range(len(DOMAINS)), DOMAINS, fontsize=7)
        ax.set_yticks(range(len(m)), [f"after {i + 1}" for i in range(len(m))], fontsize=7)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="log10 PPL (validation)")
    fig.suptitle("PPL_{t,i}: perplexity on domain i (column) after stage t (row), mean over seeds")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(stages: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    present = [n for n in ABLATION if n in set(stages.strategy)]
    g = stages[stages.strategy.isin(present)].groupby(["strategy", "stage"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / max(1, len(present))
    for k, name in enumerate(present):
        ap = g.ap.agg(["mean", "std"]).loc[name]
        plus = g.ap_plus.agg(["mean", "std"]).loc[name].dropna(subset=["mean"])
        a1.bar(np.array(ap.index) + k * width, ap["mean"], width, yerr=ap["std"].fillna(0), capsize=3, label=name)
        a2.bar(np.array(plus.index) + k * width, plus["mean"], width, yerr=plus["std"].fillna(0), capsize=3, label=name)
    a1.set(title="AP per stage", xlabel="stage", ylabel="AP (lower is better)")
    a2.set(title="AP+ per stage", xlabel="stage", ylabel="AP+ (≤ 0: no forgetting)")
    a2.axhline(0, color="black", lw=0.8)
    a1.legend(fontsize=8)
    fig.suptitle("Are the function-preserving operators effective? exact vs zero vs random new parameters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def targets(summary: pd.DataFrame, suffix: str = "") -> list[str]:
    """The issue's targets for `loire`, with the seed spread said beside each comparison; with a suffix
    (`-constlr`), among the runs of that name: every strategy under the same changed setting."""
    mine = "loire" + suffix
    if mine not in summary.index:
        return []
    out, me = [], summary.loc[mine]
    plus = [(s, m, sd) for s, m, sd in me.ap_plus]
    ok = all(m <= 0 for _, m, _ in plus)
    out.append(
        f"`{mine}` AP+ ≤ 0 at every stage: {'met' if ok else 'NOT met'} ("
        + ", ".join(f"stage {s}: {pm(m, sd)}" for s, m, sd in plus)
        + ")"
    )
    for other in [n + suffix for n in COMPARED if n + suffix in summary.index]:
        o = summary.loc[other]
        diff = o.ap_mean - me.ap_mean
        spread = (0 if pd.isna(me.ap_std) else me.ap_std) + (0 if pd.isna(o.ap_std) else o.ap_std)
        if min(me.ap_count, o.ap_count) < 2:
            verdict = ("lower" if diff > 0 else "NOT lower") + " (one seed: spread not measured yet)"
        else:
            where = "beyond" if diff > spread else "within"
            verdict = "NOT lower" if diff <= 0 else f"lower, {where} the spread"
        out.append(
            f"`{mine}` last-stage AP {pm(me.ap_mean, me.ap_std)} vs `{other}` {pm(o.ap_mean, o.ap_std)}: "
            f"{verdict} (difference {diff:+.1f}, summed std {spread:.1f})"
        )
    if "fixed-large" + suffix in summary.index:
        ratio = me.cumulative_flops_mean / summary.loc["fixed-large" + suffix].cumulative_flops_mean
        verdict = "met" if ratio <= 0.65 else "NOT met"
        out.append(f"`{mine}` total FLOPs {ratio:.2f}x `fixed-large{suffix}`: {verdict} (≤ 0.65x)")
    if "retrain" + suffix in summary.index:
        r = summary.loc["retrain" + suffix]
        gap = me.ap_mean / r.ap_mean - 1
        ratio = me.cumulative_flops_mean / r.cumulative_flops_mean
        met = gap <= 0.05 and ratio <= 0.35
        out.append(
            f"stretch: AP within 5% of `retrain` at ≤ 0.35x its FLOPs: {'met' if met else 'NOT met'} "
            f"(AP {pm(me.ap_mean, me.ap_std)} vs retrain{suffix} {pm(r.ap_mean, r.ap_std)}: {gap:+.1%}, "
            f"FLOPs {ratio:.2f}x; "
            f"retrain over {int(r.ap_count)} seed(s))"
        )
    return out


def render(budget: str, stages: pd.DataFrame, summary: pd.DataFrame, runs: list[dict[str, Any]], front: list[str]):
    m = runs[0]["machine"]
    sched = BUDGETS[budget.split("-steps")[0]]
    lines = [
        f"# Lifelong benchmark, `{budget}` budget: WB → NEWS → REV → BIO → CS (gpt-tiny ladder, CPU)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, one torch thread per run (two runs at a time), "
        f"torch {m['torch']}. Schedule `{sched['schedule']}`, {sched['eval_blocks']} validation blocks of 64 "
        "tokens per domain. Every number is the mean ± std over the seeds run (n = seeds); FLOPs include "
        "teacher forward passes. Run files: `lifelong/" + budget + "/runs/<strategy>/seed<k>.json`. Replay "
        "memory: half the new domain's training blocks per earlier domain (`REPLAY_MEMORY_DIVISOR` = "
        f"{REPLAY_MEMORY_DIVISOR}); the replaying runs made with a tenth are kept under `runs-mem10/` "
        "(docs/training.md says why the memory changed).",
        "",
        "![AP vs FLOPs](lifelong-" + budget + "-ap-flops.png)",
        "",
        "## Summary (sorted by last-stage AP)",
        "",
        "| strategy | n | last-stage AP | AP+ per stage (2..5) | max AP+ | total FLOPs | FLOPs / fixed-large "
        "| wall s |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    large = summary.cumulative_flops_mean.get("fixed-large")
    for name, r in summary.iterrows():
        plus = ", ".join(pm(mu, sd) for _, mu, sd in r.ap_plus)
        ratio = f"{r.cumulative_flops_mean / large:.2f}" if large else "-"
        mark = " ★" if name in front else ""
        lines.append(
            f"| {name}{mark} | {int(r.ap_count)} | {pm(r.ap_mean, r.ap_std)} | {plus} | "
            f"{pm(r.max_ap_plus_mean, r.max_ap_plus_std)} | {r.cumulative_flops_mean:.3g} | {ratio} | "
            f"{r.wall_s_mean:.0f} |"
        )
    lines += ["", "★ on the Pareto front of (total FLOPs, last-stage AP).", ""]
    t = targets(summary)
    if t:
        lines += ["## Targets (issue: make LOIRE win)", ""] + [f"- {x}" for x in t] + [""]
    t = targets(summary, CONSTLR)
    if len(t) > 1:
        lines += (
            [
                "## The same comparison under a constant rate after each stage's warmup (`-constlr`)",
                "",
                "Every strategy's rate stays at its peak after the warmup instead of decaying to a tenth "
                "(`Strategy.min_lr_ratio` = 1.0): the replaying strategies learn more and end lower, those "
                "without replay forget more and end higher; the ranking is checked among the `-constlr` runs only.",
                "",
            ]
            + [f"- {x}" for x in t]
            + [""]
        )
    if set(ABLATION[1:]) & set(summary.index):
        g = stages[stages.strategy.isin(ABLATION)].groupby(["strategy", "stage"])
        ap, plus, diff = g.ap.agg(["mean", "std"]), g.ap_plus.agg(["mean", "std"]), g.growth_diff.mean()
        lines += [
            "## Operator ablation: exact vs zero vs random initialisation of the new parameters",
            "",
            "![ablation](lifelong-" + budget + "-ablation.png)",
            "",
            "| strategy | stage | AP | AP+ | max abs Δlogits at growth |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in [n for n in ABLATION if n in summary.index]:
            for stage in sorted(stages.stage.unique()):
                a, p = ap.loc[(name, stage)], plus.loc[(name, stage)]
                d = diff.loc[(name, stage)]
                lines.append(
                    f"| {name} | {stage} | {pm(a['mean'], a['std'])} | "
                    f"{'-' if pd.isna(p['mean']) else pm(p['mean'], p['std'])} | {'-' if pd.isna(d) else f'{d:.2g}'} |"
                )
        lines.append("")
    lines += ["## Perplexity matrices (mean over seeds)", "", "![heat maps](lifelong-" + budget + "-ppl.png)", ""]
    mean = stages.groupby(["strategy", "stage"])[[f"ppl_{d}" for d in DOMAINS]].agg(["mean", "std"])
    for name in summary.index:
        lines += [f"### {name}", "", "| after stage | " + " | ".join(DOMAINS) + " |", "|---" * 6 + "|"]
        for stage, row in mean.loc[name].iterrows():
            cells = [
                "" if pd.isna(row[(f"ppl_{d}", "mean")]) else pm(row[(f"ppl_{d}", "mean")], row[(f"ppl_{d}", "std")])
                for d in DOMAINS
            ]
            lines.append(f"| {stage} {DOMAINS[stage - 1]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def report(budget: str) -> str | None:
    runs = load_runs(budget)
    if not runs:
        print(f"no finished runs for budget {budget!r} yet")
        return None
    stages = stage_frame(runs)
    summary = summary_frame(stages)
    base = RESULTS / f"lifelong-{budget}"
    front = plot_ap_flops(summary, base.with_name(base.name + "-ap-flops.png"), f"Lifelong ({budget} budget)")
    plot_heatmaps(stages, base.with_name(base.name + "-ppl.png"), list(summary.index))
    if set(ABLATION[1:]) & set(summary.index):
        plot_ablation(stages, base.with_name(base.name + "-ablation.png"))
    text = render(budget, stages, summary, runs, front)
    base.with_suffix(".md").write_text(text)
    records = stages.to_dict(orient="records")
    base.with_suffix(".json").write_text(json.dumps({"budget": budget, "rows": records}, indent=1, default=float))
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="long")
    parser.add_argument("--strategies", default=None, help="default: all (the planned order for --budget long)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--runs", help="explicit STRATEGY:SEED,... order (instead of --strategies x --seeds)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="override every stage's steps (smoke runs)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "loire-bench"))
    parser.add_argument("--redo", action="store_true", help="rerun runs whose result file exists")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue interrupted runs from their stage folders and training checkpoints under --work",
    )
    parser.add_argument("--report", action="store_true", help="only rebuild the report from existing runs")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.report:
        names = (args.strategies or ",".join([*MAIN, "elle-er", *ABLATION[1:]])).split(",")
        for name in names:
            strategy_for(name)
        seeds = [int(s) for s in args.seeds.split(",")]
        # seed-major (every strategy's first seed before any second seed), or the order --runs gives
        if args.runs:
            order = [(n, int(k)) for n, k in (r.split(":") for r in args.runs.split(","))]
        elif args.strategies is None and args.budget == "long" and args.steps is None:
            order = PLANNED_LONG
        else:
            order = [(n, s) for s in seeds for n in names]
        for name, _ in order:
            strategy_for(name)
        todo = [(n, s) for n, s in order if args.redo or not run_file(label(args), n, s).exists()]
        print(f"{len(todo)} run(s) to do with {args.jobs} at a time: {todo}", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            for _ in pool.map(lambda job: launch(args, *job), todo):
                report(label(args))
    text = report(label(args))
    if text:
        print(text)


if __name__ == "__main__":
    main()
