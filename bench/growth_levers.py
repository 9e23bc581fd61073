"""Why does inexact (ELLE) growth learn the next domain faster than exact growth? One lever at a time.

Usage: python bench/growth_levers.py [--data ../shared/data] [--variants a,b] [--steps 750]

Start: the stage-1 model of the `long` budget (gpt-tiny M1, 1000 steps on WB, seed 0; trained once and
kept under --work). Every variant grows it to M2 (hidden 64 → 128, the ladder's stage 2) and trains on
NEWS with the stage-2 settings of `gpt-tiny-long` (lr 1e-3, 50 warmup steps, cosine decay, batch 16 x 64),
without replay or distillation, so only the growth and the optimisation differ. Reported per variant:
max |Δlogits| at growth, NEWS and WB validation loss after 50 / 200 / all steps (WB: what is
forgotten), and the mean pairwise cosine of the new hidden dims' writer vectors after training
(every row a dim gets from the embeddings and the attention / FFN output projections; old dims for
reference). Writes bench/results/growth_levers.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import machine_facts  # noqa: E402
from loire.data import encode_corpus, load_corpus  # noqa: E402
from loire.grow import grow  # noqa: E402
from loire.io import load_model  # noqa: E402
from loire.lifelong import MOMENTS_FILE, corpus_uri, run_stage  # noqa: E402
from loire.metrics import max_abs_logit_diff, perplexity  # noqa: E402
from loire.model import LoirePreTrainedModel  # noqa: E402
from loire.moments import carry_moments, load_moments, trace_growth  # noqa: E402
from loire.schedule import schedule_preset  # noqa: E402
from loire.strategies import STRATEGIES, elle_expand, naive_expand  # noqa: E402
from loire.tokenizer import load_tokenizer  # noqa: E402
from loire.train import TrainConfig, train  # noqa: E402

CHECKPOINTS = (50, 200)
Grower = Callable[[LoirePreTrainedModel], LoirePreTrainedModel]


def with_free_std(std: float, init: str) -> Grower:
    """Exact growth with the free ("any value", R) parameters drawn at std `std` instead of the init range."""

    def g(m: LoirePreTrainedModel) -> LoirePreTrainedModel:
        m = copy.deepcopy(m)
        m.config.initializer_range = std  # the operators draw their free values at this std
        out = grow(m, hidden=128, init=init, seed=1)
        out.config.initializer_range = 0.02
        return out

    return g


# name -> (grower, TrainConfig overrides, what it tests)
VARIANTS: dict[str, tuple[Grower, dict[str, Any], str]] = {
    "exact-pad": (lambda m: grow(m, hidden=128, seed=1), {}, "today's exact operator: mean padding of the stream"),
    "elle": (lambda m: elle_expand(m, hidden=128, seed=1), {}, "ELLE / bert2BERT duplication, inexact"),
    "exact-split": (
        lambda m: grow(m, hidden=128, init="split", seed=1),
        {},
        "exact duplication: stream tiled, readers w/2 ± cancelling noise",
    ),
    "exact-split-sym": (
        with_free_std(0.0, "split"),
        {},
        "exact duplication without the cancelling noise (copies stay symmetric)",
    ),
    "exact-split-noise0.1": (with_free_std(0.1, "split"), {}, "split, cancelling noise std 0.1 (5x)"),
    "exact-pad-R0": (with_free_std(0.0, "pad"), {}, "mean padding, free reader columns 0"),
    "exact-pad-R0.1": (with_free_std(0.1, "pad"), {}, "mean padding, free reader columns std 0.1 (5x)"),
    "random": (lambda m: naive_expand(m, "random", hidden=128, seed=1), {}, "random new parameters (inexact)"),
    "exact-split-nowarm": (
        lambda m: grow(m, hidden=128, init="split", seed=1),
        {"warmup_steps": 0},
        "split, no LR re-warming (peak LR from the first step)",
    ),
    "exact-split-lr2e-3": (
        lambda m: grow(m, hidden=128, init="split", seed=1),
        {"lr": 2e-3},
        "split, re-warm to stage 1's peak LR 2e-3 instead of 1e-3",
    ),
    "no-growth": (lambda m: copy.deepcopy(m), {}, "M1 kept (fixed-small): what growth adds"),
    # the optimizer-state lever, against `loire`'s growth (exact-pad-R0.1): AdamW's stage-1 moments carried
    # through the growth (loire.moments) instead of a cold optimizer
    "exact-pad-R0.1-carry": (
        with_free_std(0.1, "pad"),
        {},
        "mean padding, free std 0.1, AdamW moments of stage 1 carried (copies keep theirs)",
    ),
    # the same with only the second moment carried: the step sizes stay calibrated, but no stage-1
    # direction is pushed into the new domain's first steps (the carried first moment lowered WB's early
    # forgetting and raised its late forgetting)
    "exact-pad-R0.1-carry-v": (
        with_free_std(0.1, "pad"),
        {},
        "mean padding, free std 0.1, stage 1's second moments carried, first moments zero",
    ),
}
CARRY = {"exact-pad-R0.1-carry", "exact-pad-R0.1-carry-v"}  # variants that start from the stage-1 moments
SECOND_ONLY = {"exact-pad-R0.1-carry-v"}  # of those, the ones whose first moments start at zero


@torch.no_grad()
def val_loss(model: LoirePreTrainedModel, blocks: torch.Tensor) -> float:
    return float(torch.tensor(perplexity(model, blocks)).log())


@torch.no_grad()
def writer_cosine(model: LoirePreTrainedModel, dims: slice) -> float:
    """Mean pairwise cosine between the writer vectors of the given hidden dims."""
    parts = [model.model.embed_tokens.weight.T, model.model.embed_positions.weight.T]
    for layer in model.model.layers:
        parts += [layer.attn.o_proj.weight, layer.mlp.down_proj.weight]
    w = torch.cat([p.detach().float() for p in parts], dim=1)[dims]  # (dims, features)
    w = F.normalize(w, dim=1)
    sim = w @ w.T
    n = sim.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def stage_one(data: str, work: Path) -> Path:
    """The stage-1 model, trained by a strategy that keeps AdamW's final moments (training is the same)."""
    out = work / "stage-1-WB-moments"
    if not (out / "stage.json").exists():
        carrying = dataclasses.replace(STRATEGIES["loire"], name="loire-carry", carry_moments=True)
        STRATEGIES.setdefault(carrying.name, carrying)
        run_stage("WB", corpus_uri(data, "WB"), out, schedule="gpt-tiny-long", strategy=carrying.name, progress=False)
    return out


def run_variant(name: str, parent: Path, data: str, steps: int) -> dict[str, Any]:
    grower, overrides, what = VARIANTS[name]
    spec = schedule_preset("gpt-tiny-long").stages[1]
    tok = load_tokenizer(parent)
    prev = load_model(parent).eval()
    news, wb = load_corpus(corpus_uri(data, "NEWS")), load_corpus(corpus_uri(data, "WB"))
    train_blocks = encode_corpus(list(news.train), tok, 64, max_tokens=spec.max_train_tokens)
    valid = {
        "NEWS": encode_corpus(list(news.valid), tok, 64)[:128],
        "WB": encode_corpus(list(wb.valid), tok, 64)[:128],
    }
    model = grower(prev)
    diff = max_abs_logit_diff(prev, model, train_blocks[:2, :32])
    moments = None
    if name in CARRY:
        moments, report = carry_moments(prev, load_moments(parent / MOMENTS_FILE), trace_growth(prev, grower))
        if name in SECOND_ONLY:
            moments = {n: {**state, "exp_avg": torch.zeros_like(state["exp_avg"])} for n, state in moments.items()}
        what = f"{what}; {100 * report.copied_fraction:.0f}% of entries carried"
    curve: dict[str, dict[int, float]] = {d: {} for d in valid}

    def on_log(_metrics: dict[str, float], step: int) -> None:
        if step in CHECKPOINTS:
            model.eval()
            for d, blocks in valid.items():
                curve[d][step] = val_loss(model, blocks)
            model.train()

    config = TrainConfig(
        **{
            "steps": steps,
            "batch_size": spec.batch_size,
            "lr": spec.lr,
            "warmup_steps": spec.warmup_steps,
            "seed": 1000 * 2,
            "log_every": 10,
            "progress": False,
            **overrides,
        }
    )
    started = time.perf_counter()
    train(model, train_blocks, config, on_log=on_log, initial_moments=moments)
    model.eval()
    for d, blocks in valid.items():
        curve[d][steps] = val_loss(model, blocks)
    h1 = prev.config.hidden_size
    grown = model.config.hidden_size > h1
    return {
        "what": what,
        "growth_max_abs_logit_diff": diff,
        "loss": {d: {str(k): v for k, v in c.items()} for d, c in curve.items()},
        "new_dim_writer_cosine": writer_cosine(model, slice(h1, None)) if grown else None,
        "old_dim_writer_cosine": writer_cosine(model, slice(0, h1)),
        "wall_s": time.perf_counter() - started,
    }


def render(result: dict[str, Any]) -> str:
    m, steps = result["machine"], result["steps"]
    lines = [
        "# Growth levers: how fast does the grown model learn the next domain?",
        "",
        f"Machine: {m['cpu']}, one thread, torch {m['torch']}, {m['date']}. Stage-1 model of the `long` budget "
        f"(gpt-tiny M1, 1000 steps on WB, seed 0) grown to hidden 128 and trained {steps} steps on NEWS "
        "(stage-2 settings, no replay, no distillation). Loss = validation cross-entropy (nats/token, 128 "
        "blocks of 64 tokens); WB is the earlier domain (forgetting). Cosine = mean pairwise cosine of the "
        "writer vectors of the new hidden dims (old dims in brackets) after training: 1 means the new dims "
        "are copies of each other.",
        "",
        f"| variant | what | max abs Δlogits | NEWS @50 | @200 | @{steps} | WB @50 | @200 | @{steps} "
        "| cosine new [old] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in result["variants"].items():
        news, wb = r["loss"]["NEWS"], r["loss"]["WB"]
        cos = "-" if r["new_dim_writer_cosine"] is None else f"{r['new_dim_writer_cosine']:.2f}"
        lines.append(
            f"| {name} | {r['what']} | {r['growth_max_abs_logit_diff']:.2g} | "
            + " | ".join(f"{news[str(k)]:.3f}" for k in (*CHECKPOINTS, steps))
            + " | "
            + " | ".join(f"{wb[str(k)]:.3f}" for k in (*CHECKPOINTS, steps))
            + f" | {cos} [{r['old_dim_writer_cosine']:.2f}] |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=schedule_preset("gpt-tiny-long").stages[1].steps)
    parser.add_argument("--work", default="/tmp/loire-levers")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "growth_levers.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    result: dict[str, Any] = {"machine": machine_facts(1), "steps": args.steps, "variants": {}}
    if out.with_suffix(".json").exists():
        kept = json.loads(out.with_suffix(".json").read_text())
        if kept.get("steps") == args.steps:
            result["variants"] = kept["variants"]
    parent = stage_one(args.data, Path(args.work))
    for name in args.variants.split(","):
        print(f"== {name}", flush=True)
        result["variants"][name] = run_variant(name, parent, args.data, args.steps)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.write_text(render(result))
        print(render(result), flush=True)


if __name__ == "__main__":
    main()
