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
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", choices=sorted(SCHEDULES), default="long")
    p.add_argument("--parent", required=True, help="a finished stage folder, e.g. .../stage-1-WB")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-blocks", type=int, default=24, help="validation blocks per seen domain")
    p.add_argument("--points", type=int, default=16, help="log-spaced evaluation points")
    p.add_argument("--lr", choices=("constant", "stage"), default="constant", help="learning-rate shape")
    p.add_argument("--fractions", default="1", help="run lengths as shares of the stage budget, comma-separated")
    p.add_argument("--tag", default="", help="suffix of the result file")
    p.add_argument("--only", default=None, help="candidate names, comma-separated (default: all)")
    args = p.parse_args()
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
            last = curve[-1]["loss"]
            mean = sum(last.values()) / len(last)
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
