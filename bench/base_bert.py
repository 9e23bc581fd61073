"""LOIRE-Bert at CPU scale: a BERT-family base imported as stage 0 and grown through all five domains
(from-base preset: Hidden -> FFN -> MHA -> Layer), pseudo-perplexity per stage "init" (right after growth)
and "final" (after training), as the paper's LOIRE-Bert table. Writes bench/results/base_bert.{json,md}.

The base is a tiny BertForMaskedLM with random weights and a WordPiece tokenizer trained locally on
WikiText-2 validation text (tests/hf_bases.py): no pretrained checkpoint is downloaded. Small budget:
`--steps` optimizer steps per stage, `--tokens` training tokens per domain.

    .venv/bin/python -m bench.base_bert --steps 60 --tokens 32768
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from loire.lifelong import run_lifelong
from loire.schedule import Schedule, schedule_preset
from tests.conftest import DATA_ROOT
from tests.hf_bases import make_base

RESULTS = Path(__file__).resolve().parent / "results"


def schedule(steps: int, tokens: int) -> Schedule:
    d = schedule_preset("from-base").to_dict()
    for stage in d["stages"]:
        stage.update(steps=steps, warmup_steps=max(1, steps // 10), max_train_tokens=tokens)
        stage["distill_steps"] = min(stage["distill_steps"], steps)
    return Schedule.from_dict(d)


def table(summary: dict) -> str:
    domains = summary["domains"]
    lines = ["| stage | | " + " | ".join(domains) + " | AP |", "|---|---|" + "---:|" * (len(domains) + 1)]
    for s in summary["stages"]:
        for label, row in (("init", s.get("ppl_init", {})), ("final", s["ppl"])):
            cells = [f"{row[d]:.2f}" if d in row else "" for d in domains]
            ap = f"{s['ap']:.2f}" if label == "final" else ""
            dims = s["dims"]
            name = f"{s['stage']} {s['domain']} (h{dims['hidden_size']} f{dims['intermediate_size']} "
            name += f"a{dims['num_attention_heads']} l{dims['num_hidden_layers']})"
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {ap} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=32_768)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = make_base("bert", Path(tmp) / "bert-base")
        summary = run_lifelong(
            str(DATA_ROOT), ["WB", "NEWS", "REV", "BIO", "CS"], Path(tmp) / "run", strategy="loire",
            schedule=schedule(args.steps, args.tokens), device="cpu", base=base, eval_init=True, progress=False,
        )  # fmt: skip
    summary["base"]["source"] = "tests/hf_bases.py make_base('bert') (random weights, local WordPiece)"
    summary["budget"] = {"steps_per_stage": args.steps, "train_tokens_per_domain": args.tokens, "device": "cpu"}
    summary["wall_s"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "base_bert.json").write_text(json.dumps(summary, indent=2))
    growth = [
        f"{s['stage']}: {s['growth_max_abs_logit_diff']:.2g}"
        for s in summary["stages"]
        if s["growth_max_abs_logit_diff"] is not None
    ]
    md = [
        "# LOIRE-Bert at CPU scale: pseudo-perplexity init (after growth) / final (after training)",
        "",
        f"Base: a tiny BertForMaskedLM (hidden 32, 2 heads, 2 layers, FFN 64), **random weights**, WordPiece "
        f"tokenizer trained locally on WikiText-2 text; grown by the `from-base` preset (Hidden x1.25 -> FFN "
        f"x1.25 -> MHA x1.25 -> Layer +2 -> none), strategy `loire`, {args.steps} steps per stage, "
        f"{args.tokens} training tokens per domain, 32 validation blocks per domain, CPU "
        f"({summary['wall_s']:.0f} s on a shared 2-core machine). Far too small to compare with the paper's "
        "numbers: it shows the mechanics (exact growth: init of the old domains = final of the previous stage).",
        "",
        table(summary),
        "",
        "max |Δlogits| at growth per stage: " + ", ".join(growth),
    ]
    (RESULTS / "base_bert.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
