"""GPU benchmark in one run (never part of CI): needs a CUDA device; writes bench/results/gpu.{json,md}.

Measures, on the visible card(s), with the card's name and torch/CUDA versions recorded:
1. **throughput**: bf16-autocast training tokens/s of a GPT-2-small Loire model against HF
   GPT2LMHeadModel of the same size and weights (`bench/throughput.py`'s pair: checked equal first),
   rounds alternating between the two, median over rounds;
2. **distillation**: `loire.train.train` tokens/s of the GPT-2-small student alone and with four
   GPT-2-small teachers over the whole run (the teachers' top-k cache is built inside `train`, so its
   cost is included); overhead = 1 − distilled/plain;
3. **growth**: wall time of each growth operator (hidden, ffn, heads, layers) on the GPU, from the
   `gpt2-gpu` schedule's start (384/1536/6/6) to GPT-2 small, and the max |Δlogits| it preserved;
4. **DDP scaling**: `train` under `torchrun --nproc_per_node=k` for k = 1, 2, 4, ... up to the visible
   GPUs, weak scaling (the per-GPU batch fixed), tokens/s and efficiency against k × the 1-GPU figure.

    .venv/bin/python bench/gpu.py                     # everything, defaults sized for an H100
    .venv/bin/python bench/gpu.py --only growth,ddp --steps 20
    .venv/bin/python bench/gpu.py --smoke --device cpu   # logic check on CPU: tiny sizes, nothing written
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import loire  # noqa: E402
from bench.throughput import build_models, check_same  # noqa: E402
from loire.grow import grow  # noqa: E402
from loire.metrics import max_abs_logit_diff  # noqa: E402
from loire.train import TrainConfig, train  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PARTS = ("throughput", "distill", "growth", "ddp")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def bench_throughput(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    ours, hf = build_models(args.size, seed=0)
    same = check_same(ours, hf, ours.config.vocab_size, args.seq)
    models = {"loire": ours.to(device).train(), "hf": hf.to(device).train()}
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=device.type == "cuda") for n, m in models.items()}
    batch = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq), device=device)
    rates: dict[str, list[float]] = {n: [] for n in models}

    def steps(name: str, count: int) -> float:
        model, opt = models[name], optimizers[name]
        _sync(device)
        start = time.perf_counter()
        for _ in range(count):
            with _autocast(device):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return count * batch.numel() / (time.perf_counter() - start)

    for name in models:
        steps(name, args.warmup)
    for r in range(args.rounds):
        for name in ("loire", "hf") if r % 2 == 0 else ("hf", "loire"):
            rates[name].append(steps(name, args.steps))
    out = {n: statistics.median(v) for n, v in rates.items()}
    return {
        **same,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_s": out,
        "ratio_loire_over_hf": out["loire"] / out["hf"],
    }


def bench_distill(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from loire.distill import DistillConfig

    student, _ = build_models(args.size, seed=0)
    vocab = student.config.vocab_size
    blocks = torch.randint(0, vocab, (max(64, 4 * args.batch), args.seq), generator=torch.Generator().manual_seed(0))
    teachers = [build_models(args.size, seed=s + 1)[0] for s in range(4)]
    results = {}
    for name, teacher_list, distill in (
        ("plain", None, None),
        ("four_teachers", teachers, DistillConfig(distill_steps=args.steps)),
    ):
        model = build_models(args.size, seed=0)[0]
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch,
            device=str(device),
            progress=False,
            log_every=10**9,
            distill=distill,
        )
        _sync(device)
        start = time.perf_counter()
        result = train(model, blocks, config, teachers=teacher_list)
        _sync(device)
        wall = time.perf_counter() - start
        results[name] = {"wall_s": wall, "tokens_per_s": result.tokens / wall, "teacher_flops": result.teacher_flops}
        del model
    overhead = 1 - results["four_teachers"]["tokens_per_s"] / results["plain"]["tokens_per_s"]
    return {"steps": args.steps, "batch": args.batch, "seq": args.seq, **results, "overhead": overhead}


def bench_growth(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    start_dims = dict(hidden_size=96, intermediate_size=384, num_attention_heads=2, num_hidden_layers=2)
    targets = {"hidden": 192, "ffn": 768, "heads": 4, "layers": 4}
    if not args.smoke:
        start_dims = dict(hidden_size=384, intermediate_size=1536, num_attention_heads=6, num_hidden_layers=6)
        targets = {"hidden": 768, "ffn": 3072, "heads": 12, "layers": 12}
    config = loire.preset(
        "gpt2", vocab_size=50257 if not args.smoke else 512, head_dim=64 if not args.smoke else 48, **start_dims
    )
    torch.manual_seed(0)
    base = loire.LoireForCausalLM(config).to(device).eval()
    probe = torch.randint(0, config.vocab_size, (2, 64), device=device)
    out = {}
    for op, value in targets.items():
        grow(base, **{op: value}, seed=0)  # warm up kernels and allocator
        _sync(device)
        start = time.perf_counter()
        grown = grow(base, **{op: value}, seed=0)
        _sync(device)
        seconds = time.perf_counter() - start
        out[op] = {"to": value, "seconds": seconds, "max_abs_dlogits": max_abs_logit_diff(base, grown, probe)}
        del grown
    return {"from": start_dims, "operators": out}


def bench_ddp(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    visible = torch.cuda.device_count() if device.type == "cuda" else 2
    counts = [k for k in (1, 2, 4, 8, 16) if k <= visible]
    runs = {}
    for k in counts:
        with tempfile.TemporaryDirectory() as scratch:
            result = Path(scratch) / "ddp.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={k}"]
            command += [str(Path(__file__).resolve()), "--ddp-worker", str(result), "--device", str(device.type)]
            command += [
                "--size",
                args.size,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
            ]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                runs[k] = {"error": (done.stdout + done.stderr)[-2000:]}
                continue
            runs[k] = json.loads(result.read_text())
    one = runs.get(1, {}).get("tokens_per_s")
    for k, r in runs.items():
        if one and "tokens_per_s" in r:
            r["efficiency"] = r["tokens_per_s"] / (k * one)
    return {"per_gpu_batch": args.batch, "seq": args.seq, "steps": args.steps, "runs": runs}


def ddp_worker(args: argparse.Namespace) -> None:
    """One rank of `bench_ddp` (under torchrun): train() with DDP, rank 0 writes tokens/s of the global batch."""
    from loire import distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, _ = build_models(args.size, seed=0)
    blocks = torch.randint(0, model.config.vocab_size, (256, args.seq), generator=torch.Generator().manual_seed(0))
    config = TrainConfig(
        steps=args.steps + 2, batch_size=args.batch * world, device=args.device, progress=False, log_every=1
    )
    stamps: list[float] = []

    def on_log(metrics: dict[str, float], step: int) -> None:
        _sync(torch.device(args.device, distributed.local_rank()) if args.device == "cuda" else torch.device("cpu"))
        stamps.append(time.perf_counter())

    result = train(model, blocks, config, on_log=on_log)
    if distributed.is_main():
        seconds = stamps[-1] - stamps[1]  # after two warmup steps
        tokens = args.steps * args.batch * world * args.seq
        Path(args.ddp_worker).write_text(
            json.dumps({"world": world, "tokens_per_s": tokens / seconds, "loss": result.final_loss})
        )
    distributed.destroy()


def render(result: dict[str, Any]) -> str:
    lines = [
        f"# GPU benchmark: {result['device_name']}",
        "",
        f"torch {result['torch']}, CUDA {result['cuda']}, {result['gpus']} visible GPU(s), {result['date']}",
        "",
    ]
    if "throughput" in result:
        t = result["throughput"]
        lines += ["## bf16 training throughput, GPT-2 small", "", "| model | tokens/s |", "|---|---|"]
        lines += [f"| {n} | {v:,.0f} |" for n, v in t["tokens_per_s"].items()]
        lines += ["", f"Loire / HF: {t['ratio_loire_over_hf']:.3f} (batch {t['batch']} × {t['seq']})", ""]
    if "distill" in result:
        d = result["distill"]
        lines += [
            "## Distillation with four teachers",
            "",
            f"plain {d['plain']['tokens_per_s']:,.0f} tokens/s, "
            f"four teachers {d['four_teachers']['tokens_per_s']:,.0f} tokens/s: overhead {100 * d['overhead']:.1f}%",
            "",
        ]
    if "growth" in result:
        lines += ["## Growth operators", "", "| operator | to | seconds | max abs dlogits |", "|---|---|---|---|"]
        for op, g in result["growth"]["operators"].items():
            lines.append(f"| {op} | {g['to']} | {g['seconds']:.3f} | {g['max_abs_dlogits']:.2e} |")
        lines.append("")
    if "ddp" in result:
        lines += ["## DDP weak scaling", "", "| GPUs | tokens/s | efficiency |", "|---|---|---|"]
        for k, r in result["ddp"]["runs"].items():
            if "error" in r:
                lines.append(f"| {k} | failed | - |")
            else:
                lines.append(f"| {k} | {r['tokens_per_s']:,.0f} | {r.get('efficiency', float('nan')):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device; writes nothing")
    parser.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.seq, args.steps, args.warmup, args.rounds = "tiny", 4, 64, 4, 1, 2
    if args.ddp_worker:
        ddp_worker(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA device (use --smoke --device cpu to check the script)")
    result: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "gpus": torch.cuda.device_count() if device.type == "cuda" else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": vars(args),
    }
    for part in [p.strip() for p in args.only.split(",") if p.strip()]:
        started = time.perf_counter()
        result[part] = {
            "throughput": bench_throughput,
            "distill": bench_distill,
            "growth": bench_growth,
            "ddp": bench_ddp,
        }[part](args, device)
        print(f"{part}: {time.perf_counter() - started:.0f} s", json.dumps(result[part], default=str)[:400], flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = render(result)
    print(text)
    if not args.smoke:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "gpu.json").write_text(json.dumps(result, indent=2, default=str))
        (RESULTS / "gpu.md").write_text(text)


if __name__ == "__main__":
    main()
