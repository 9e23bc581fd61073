"""How far ahead must the growth planner look? Each candidate growth trained for a whole stage's FLOPs.

From a finished stage's model (a lifelong run's `stage-k-<domain>` folder), every candidate of
`loire.planner.candidates` is grown exactly (the `loire` strategy's operators and free-parameter std) and
trained for the *whole* next stage's FLOP budget on the stage's own mix (the new domain plus the replay
memory of the earlier ones, at the strategy's replay ratio), at a constant learning rate after warmup, as the
planner's probes are. Held-out loss (mean over the seen domains of the log-perplexity on their validation
splits: what AP averages) is recorded at log-spaced FLOPs. A probe of share p is the prefix of this curve, so
the file tells which horizon ranks the candidates as the whole stage does, and how well a rule that
extrapolates a short prefix does.

    python bench/planner_horizon.py --budget long --parent /tmp/loire-bench/long/loire/seed0/stage-1-WB
    python bench/planner_horizon.py --report        # bench/results/planner_horizon.md and .png from the files
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loire.data import load_corpus  # noqa: E402
from loire.flops import flops_per_step, head_of  # noqa: E402
from loire.io import load_model  # noqa: E402
from loire.lifelong import REPLAY_MEMORY_DIVISOR, _blocks, _grow_exact, corpus_uri  # noqa: E402
from loire.metrics import perplexity  # noqa: E402
from loire.planner import PlannerConfig, candidates  # noqa: E402
from loire.schedule import schedule_preset, stage_flops  # noqa: E402
from loire.strategies import STRATEGIES  # noqa: E402
from loire.tokenizer import load_tokenizer  # noqa: E402
from loire.train import TrainConfig, train  # noqa: E402

DOMAINS = ("WB", "NEWS", "REV", "BIO", "CS")
SCHEDULES = {"long": "gpt-tiny-long", "short": "gpt-tiny"}
RESULTS = ROOT / "bench" / "results" / "planner_horizon"


SHARES = (0.033, 0.1, 0.3, 1.0)  # a probe's share of the stage (the planner's default probe: ~3.3%)
PLOT_SHARES = (0.01, 0.02, 0.033, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def _mean(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


def loss_at(row: dict, flops: float) -> float:
    """Mean held-out loss of a run at `flops`, interpolated linearly in log-FLOPs between its points."""
    points = [(p["flops"], _mean(p["loss"])) for p in row["curve"]]
    for (f0, l0), (f1, l1) in itertools.pairwise(points):
        if f0 <= flops <= f1:
            w = flops / f1 if f0 == 0 else (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return l0 + w * (l1 - l0)
    return points[-1][1]


def gap(row: dict, none: dict, flops: float) -> float:
    """A candidate's held-out loss minus no growth's at equal FLOPs (negative: the growth is ahead)."""
    return loss_at(row, flops) - loss_at(none, flops)


def final(row: dict) -> float:
    """A run's mean held-out loss at its end."""
    return _mean(row["curve"][-1]["loss"])


def report() -> None:
    """A table per result file: each candidate's loss minus no growth's at equal FLOPs, by the share of the
    stage trained (negative: the growth is ahead); and a plot of the same curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(RESULTS.glob("*.json"))
    lines = [
        "# How far ahead must the growth planner look? (`bench/planner_horizon.py`)",
        "",
        "Every planner candidate grown exactly from a finished stage-1 model and trained for the whole stage-2",
        "FLOP budget on the stage's mix (NEWS + replay of WB at a half), seed 0, CPU. Held-out loss = mean over",
        "WB and NEWS of the validation log-perplexity (24 blocks each). Each cell: candidate minus no growth",
        "at equal FLOPs, after that share of the stage (nats; negative = the growth is ahead). `constant`: the",
        "planner's probe shape (constant rate after a short warmup); `stage`: the stage's own shape (warmup,",
        "cosine decay to a tenth, mask window) compressed to each run's length, so a share < 1 there is a",
        "separate, shorter run.",
        "",
    ]
    fig, axes = plt.subplots(1, len(files), figsize=(5 * len(files), 4), squeeze=False)
    for ax, path in zip(axes[0], files, strict=True):
        data = json.loads(path.read_text())
        budget, rows = data["stage_budget_flops"], data["candidates"]
        lines += [f"## {path.stem}: `{data['budget']}` budget, stage {data['stage']} ({data['domain']}), "
                  f"{data['lr']} learning rate", ""]  # fmt: skip
        by_fraction: dict[float, dict[str, dict]] = {}
        for row in rows:
            by_fraction.setdefault(row.get("fraction", 1.0), {})[row["name"]] = row
        if data["lr"] == "constant":  # one run per candidate: every share is a prefix of it
            full = by_fraction[1.0]
            lines += ["| candidate | steps (whole stage) | " + " | ".join(f"{s:.1%}" for s in SHARES) + " |"]
            lines += ["|---|---:|" + "---:|" * len(SHARES)]
            none = full["none"]
            for name, row in full.items():
                if name == "none":
                    cells = [f"{loss_at(row, s * budget):.3f}" for s in SHARES]
                else:
                    cells = [f"{gap(row, none, s * budget):+.3f}" for s in SHARES]
                    gaps = [gap(row, none, x * budget) for x in PLOT_SHARES]
                    ax.plot(PLOT_SHARES, gaps, marker="o", ms=3, label=name)
                lines.append(f"| {name} | {row['steps']} | " + " | ".join(cells) + " |")
        else:  # one run per (candidate, share), each with its own compressed schedule
            shares = sorted(by_fraction)
            lines += ["| candidate | " + " | ".join(f"{s:.0%} run" for s in shares) + " |"]
            lines += ["|---|" + "---:|" * len(shares)]
            for name in by_fraction[shares[-1]]:
                if name == "none":
                    cells = [f"{final(by_fraction[s][name]):.3f}" for s in shares]
                else:
                    gaps = [final(by_fraction[s][name]) - final(by_fraction[s]["none"]) for s in shares]
                    cells = [f"{g:+.3f}" for g in gaps]
                    ax.plot(shares, gaps, marker="o", label=name)
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
        ax.axhline(0, color="black", lw=0.8)
        ax.axvline(0.033, color="grey", ls=":", lw=0.8)
        ax.set(xscale="log", xlabel="share of the stage's FLOPs", ylabel="loss − no growth (nats)",
               title=f"{data['budget']} stage {data['stage']}, {data['lr']} LR")  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS.with_suffix(".png"), dpi=110)
    lines += ["![horizon](planner_horizon.png)", ""]
    RESULTS.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {RESULTS.with_suffix('.md')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(SCHEDULES), default="long")
    p.add_argument("--parent", help="a finished stage folder, e.g. .../stage-1-WB")
    p.add_argument("--report", action="store_true", help="only rebuild the report from the result files")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-blocks", type=int, default=24, help="validation blocks per seen domain")
    p.add_argument("--points", type=int, default=16, help="log-spaced evaluation points")
    p.add_argument("--lr", choices=("constant", "stage"), default="constant", help="learning-rate shape")
    p.add_argument("--fractions", default="1", help="run lengths as shares of the stage budget, comma-separated")
    p.add_argument("--tag", default="", help="suffix of the result file")
    p.add_argument("--only", default=None, help="candidate names, comma-separated (default: all)")
    args = p.parse_args()
    if args.report:
        report()
        return
    if args.parent is None:
        p.error("--parent is required (unless --report)")
    torch.set_num_threads(1)

    parent = Path(args.parent)
    stage = int(parent.name.split("-")[1]) + 1
    seen, domain = list(DOMAINS[: stage - 1]), DOMAINS[stage - 1]
    schedule = schedule_preset(SCHEDULES[args.budget])
    spec = schedule.stages[stage - 1]
    strat = STRATEGIES["loire"]
    start = load_model(parent)
    tok = load_tokenizer(parent)
    corpora = {d: load_corpus(corpus_uri(args.data, d)) for d in [*seen, domain]}
    train_blocks = _blocks(corpora[domain], "train", tok, spec, spec.max_train_tokens)
    per_domain = max(spec.batch_size, train_blocks.shape[0] // REPLAY_MEMORY_DIVISOR)
    memory = torch.cat([_blocks(corpora[d], "train", tok, spec, spec.max_train_tokens)[:per_domain] for d in seen])
    valid = {d: _blocks(c, "valid", tok, spec, None)[: args.eval_blocks] for d, c in corpora.items()}
    base_step = flops_per_step(start.config, spec.batch_size, spec.block_size, head=head_of(start.config))
    budget = stage_flops(schedule, stage - 1)  # the stage's budget as the ladder spends it (planned: the same)

    def held_out(model) -> dict[str, float]:
        return {d: math.log(perplexity(model, b)) for d, b in valid.items()}

    wanted = set(args.only.split(",")) if args.only else None
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = []
    for cand in candidates(start.config, PlannerConfig()):
        if wanted is not None and cand.name not in wanted:
            continue
        for fraction in fractions:
            model = _grow_exact(start, cand.targets, args.seed, strat) if cand.targets else copy.deepcopy(start)
            step_flops = flops_per_step(model.config, spec.batch_size, spec.block_size, head=head_of(model.config))
            steps = max(4, int(fraction * budget // step_flops))
            marks = sorted({max(1, round(steps ** (i / (args.points - 1)))) for i in range(args.points)})
            curve: list[dict] = [{"step": 0, "flops": 0.0, "loss": held_out(model)}]

            def on_log(_m: dict[str, float], step: int, model=model, marks=marks, curve=curve, sf=step_flops) -> None:
                if step in marks:
                    curve.append({"step": step, "flops": step * sf, "loss": held_out(model)})

            if args.lr == "constant":  # the planner's probes: constant after a short warmup, devices open
                shape = dict(min_lr_ratio=1.0, warmup_steps=min(spec.warmup_steps, 10, steps // 4))
            else:  # the stage's own shape, compressed to the run: warmup share, cosine decay, device window
                shape = dict(
                    warmup_steps=max(1, round(spec.warmup_steps / spec.steps * steps)),
                    device_steps=max(1, round(strat.distill_fraction * steps)) if cand.targets else 0,
                )
            config = TrainConfig(
                steps=steps,
                batch_size=spec.batch_size,
                lr=spec.lr,
                seed=args.seed,
                replay_ratio=strat.replay_ratio,
                log_every=1,
                progress=False,
                **shape,
            )
            t0 = time.perf_counter()
            train(model, train_blocks, config, replay=memory, on_log=on_log)
            row = {"name": cand.name, "fraction": fraction, "targets": cand.targets, "steps": steps}
            row |= {"step_flops": step_flops, "cost_ratio": step_flops / base_step, "curve": curve}
            rows.append(row | {"wall_s": time.perf_counter() - t0})
            mean = _mean(curve[-1]["loss"])
            print(f"{cand.name} x{fraction:g}: {steps} steps, mean held-out loss {mean:.4f}", flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.budget}-stage{stage}-{args.lr}-seed{args.seed}{args.tag}.json"
    meta = {
        "budget": args.budget,
        "stage": stage,
        "domain": domain,
        "seen": seen,
        "parent": str(parent),
        "stage_budget_flops": budget,
        "lr": args.lr,
        "spec": dataclasses.asdict(spec),
        "seed": args.seed,
    }
    out.write_text(json.dumps({**meta, "candidates": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
