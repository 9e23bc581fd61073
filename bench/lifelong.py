"""All strategies over the five real domains at gpt-tiny: the paper's AP / AP+ table, FLOPs and wall time.

Usage: python bench/lifelong.py [--data ../shared/data] [--strategies loire,fixed-small,...] [--steps N]
Writes bench/results/lifelong.md and .json (and one folder per strategy under --work).
Also measures the distillation overhead at stage 5 (four teachers): the hot-loop step time with the
cached teacher mixture against a plain step on the same model, interleaved, plus the one-off cost of
building the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine_facts  # noqa: E402
from loire.data import encode_corpus, load_corpus  # noqa: E402
from loire.distill import DistillConfig, build_teacher_cache, kd_loss  # noqa: E402
from loire.io import load_model  # noqa: E402
from loire.lifelong import corpus_uri, run_lifelong  # noqa: E402
from loire.strategies import STRATEGIES  # noqa: E402
from loire.tokenizer import load_tokenizer  # noqa: E402
from loire.train import lm_loss  # noqa: E402

DOMAINS = ["WB", "NEWS", "REV", "BIO", "CS"]
COMPARED = ["fixed-small", "token-kd", "replay", "elle"]  # LOIRE's last-stage AP should be the lowest of these


def distill_overhead(stage_dirs: list[Path], corpus: str, steps: int = 10) -> dict[str, float]:
    """Step time with the cached 4-teacher mixture vs a plain step on the stage-5 model (interleaved)."""
    student = load_model(stage_dirs[-1]).train()
    teachers = [load_model(d) for d in stage_dirs[:-1]]
    tok = load_tokenizer(stage_dirs[-1])
    blocks = encode_corpus(list(load_corpus(corpus).train), tok, 64, max_tokens=16 * 64 * steps)[: 16 * steps]
    batches = [blocks[i * 16 : (i + 1) * 16] for i in range(steps)]
    started = time.perf_counter()
    cache = build_teacher_cache(teachers, batches, DistillConfig(distill_steps=steps))
    cache_s = time.perf_counter() - started
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)

    def step(i: int, distil: bool) -> float:
        t0 = time.perf_counter()
        logits = student(input_ids=batches[i]).logits
        loss = lm_loss(logits, batches[i], True)
        if distil:
            loss = loss + kd_loss(logits, cache, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - t0

    step(0, True)  # warm up
    plain, distilled = [], []
    for i in range(steps):
        order = (False, True) if i % 2 == 0 else (True, False)
        for distil in order:
            (distilled if distil else plain).append(step(i, distil))
    p, d = statistics.median(plain), statistics.median(distilled)
    return {
        "teachers": len(teachers),
        "plain_step_s": p,
        "distill_step_s": d,
        "hot_loop_ratio": d / p,
        "cache_build_s": cache_s,
        "cache_build_per_step_s": cache_s / steps,
        "amortized_ratio": (d + cache_s / steps) / p,
        "cache_mb": cache.nbytes() / 1e6,
    }


def render(result: dict[str, Any]) -> str:
    lines = ["# Lifelong benchmark: all strategies over WB → NEWS → REV → BIO → CS (gpt-tiny, CPU)", ""]
    m = result["machine"]
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}.", ""]
    if result.get("machine_kept"):
        k = result["machine_kept"]
        lines += [f"Strategies not rerun on that date keep their results from {k['date']} (same machine type).", ""]
    lines += [f"Steps per stage: {result['steps'] or 'schedule default'}; schedule preset `gpt-tiny`.", ""]
    lines += [
        "## Summary",
        "",
        "| strategy | AP (last stage) | AP+ per stage (2..5) | total FLOPs | FLOPs / fixed-large | wall s |",
    ]
    lines += ["|---|---:|---|---:|---:|---:|"]
    large = result["strategies"].get("fixed-large", {}).get("total_flops")
    for name, s in result["strategies"].items():
        ap_plus = ", ".join(f"{st['ap_plus']:.1f}" for st in s["stages"][1:])
        ratio = f"{s['total_flops'] / large:.2f}" if large else "-"
        last_ap, wall = s["stages"][-1]["ap"], s["total_wall_time_s"]
        lines.append(f"| {name} | {last_ap:.1f} | {ap_plus} | {s['total_flops']:.3g} | {ratio} | {wall:.0f} |")
    for name, s in result["strategies"].items():
        lines += ["", f"## {name}: perplexity after each stage", ""]
        lines += [
            "| stage | " + " | ".join(DOMAINS) + " | AP | AP+ | growth max abs Δlogits |",
            "|---" * (len(DOMAINS) + 4) + "|",
        ]
        for st in s["stages"]:
            cells = [f"{st['ppl'][d]:.1f}" if d in st["ppl"] else "" for d in DOMAINS]
            ap_plus = "-" if st["ap_plus"] is None else f"{st['ap_plus']:.1f}"
            growth = "-" if st["growth_max_abs_logit_diff"] is None else f"{st['growth_max_abs_logit_diff']:.2g}"
            lines.append(
                f"| {st['stage']} {st['domain']} | " + " | ".join(cells) + f" | {st['ap']:.1f} | {ap_plus} | {growth} |"
            )
    if result.get("distill_overhead"):
        o = result["distill_overhead"]
        lines += ["", "## Distillation overhead at stage 5", ""]
        lines += [
            f"{o['teachers']} teachers: plain step {o['plain_step_s'] * 1e3:.0f} ms, with the cached mixture "
            f"{o['distill_step_s'] * 1e3:.0f} ms → hot-loop ratio **{o['hot_loop_ratio']:.2f}×** (goal ≤ 1.3×). "
            f"Building the cache once: {o['cache_build_s']:.1f} s ({o['cache_build_per_step_s'] * 1e3:.0f} ms per "
            f"distilled step, {o['cache_mb']:.1f} MB); amortised ratio {o['amortized_ratio']:.2f}×."
        ]
    if "targets" in result:
        lines += ["", "## Targets", ""] + [f"- {k}: {'met' if v else 'NOT met'}" for k, v in result["targets"].items()]
    return "\n".join(lines) + "\n"


def targets(result: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets, for LOIRE and for LOIRE with experience replay (`loire-er`) where present."""
    s, out = result["strategies"], {}
    for name in ("loire", "loire-er"):
        if name not in s:
            continue
        label = "LOIRE" if name == "loire" else "LOIRE+ER (loire-er)"
        out[f"{label} AP+ <= 0 at every stage"] = all(st["ap_plus"] <= 0 for st in s[name]["stages"][1:])
        compared = [n for n in COMPARED if n in s]
        if compared:
            last_ap = s[name]["stages"][-1]["ap"]
            out[f"{label} last-stage AP lowest among " + ", ".join(compared)] = last_ap < min(
                s[n]["stages"][-1]["ap"] for n in compared
            )
        if "fixed-large" in s:
            out[f"{label} FLOPs <= 0.7x fixed-large"] = s[name]["total_flops"] <= 0.7 * s["fixed-large"]["total_flops"]
    matched = result.get("elle_same_replay")
    if matched and "loire-er" in s:
        out[f"LOIRE+ER (loire-er) last-stage AP below ELLE's at the same replay ratio ({matched['ap']:.1f})"] = (
            s["loire-er"]["stages"][-1]["ap"] < matched["ap"]
        )
    if result.get("distill_overhead"):
        out["distillation hot-loop overhead <= 1.3x"] = result["distill_overhead"]["hot_loop_ratio"] <= 1.3
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--steps", type=int, default=None, help="override every stage's steps")
    parser.add_argument("--work", default=None, help="where stage folders go (default: a temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lifelong.md"))
    parser.add_argument(
        "--keep", action="store_true", help="keep the other strategies' results already in the output JSON"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    work = Path(args.work or tempfile.mkdtemp(prefix="loire-lifelong-"))
    result: dict[str, Any] = {"machine": machine_facts(torch.get_num_threads()), "steps": args.steps, "strategies": {}}
    out = Path(args.out)
    if args.keep and out.with_suffix(".json").exists():
        kept = json.loads(out.with_suffix(".json").read_text())
        if kept.get("steps") != args.steps:
            raise SystemExit(f"--keep: {out.with_suffix('.json')} was run with --steps {kept.get('steps')}")
        result["strategies"] = kept["strategies"]
        result["distill_overhead"] = kept.get("distill_overhead")
        result["machine_kept"] = kept.get("machine")
    for name in args.strategies.split(","):
        print(f"== {name}", flush=True)
        summary = run_lifelong(args.data, DOMAINS, work / name, strategy=name, steps=args.steps, progress=False)
        result["strategies"][name] = summary
        out.with_suffix(".json").write_text(json.dumps(result, indent=2))
        out.write_text(render(result))
    ran = args.strategies.split(",")
    if "loire" in ran:
        dirs = [work / "loire" / f"stage-{i + 1}-{d}" for i, d in enumerate(DOMAINS)]
        result["distill_overhead"] = distill_overhead(dirs, corpus_uri(args.data, "CS"))
    ablation = out.with_name("lifelong_ablation.json")
    if ablation.exists() and "elle-r50" in (variants := json.loads(ablation.read_text())["variants"]):
        result["elle_same_replay"] = {"ap": variants["elle-r50"]["stages"][-1]["ap"], "source": ablation.name}
    result["targets"] = targets(result)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
