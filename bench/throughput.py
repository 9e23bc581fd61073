"""Training throughput (tokens/s) of LoireForCausalLM vs Hugging Face GPT2LMHeadModel, same size, on CPU.

Both models are built with the same dimensions (vocab, hidden, layers, heads, FFN, positions), dropout 0,
tied embeddings, GELU-new, pre-LN LayerNorm; HF uses attn_implementation="sdpa". The Loire weights are
copied into the HF model, so before timing the script checks that both have the same parameter count and
compute the same loss and logits. A training step is forward with labels + backward + AdamW step.

Measurement rounds alternate between the models in one process (A B, B A, A B, ... after a warmup), so
slow drifts of the machine hit both equally; each round times `--steps-per-round` steps of one model.
The result is the median tokens/s over rounds. Results of each `--size` are kept side by side in the
JSON (keyed by size) and the Markdown table is re-rendered from all of them.

    .venv/bin/python bench/throughput.py --size small
    .venv/bin/python bench/throughput.py --size gpt2 --batch 4 --seq 256 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import loire  # noqa: E402
from bench.common import cpu_counters, foreign_share, machine_facts  # noqa: E402
from loire.model import num_parameters  # noqa: E402

# name -> (vocab, hidden, layers, heads, ffn, positions)
SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (4096, 128, 4, 4, 512, 256),  # ~1M params: a smoke test
    "small": (16384, 384, 6, 6, 1536, 512),  # ~17M params: GPT-2-like, suited to 2 CPU cores
    "gpt2": (50257, 768, 12, 12, 3072, 1024),  # GPT-2 small, 124M params
}
# name -> (batch, seq) defaults
DEFAULT_SHAPE: dict[str, tuple[int, int]] = {"tiny": (8, 128), "small": (8, 256), "gpt2": (4, 256)}


QUIET_SHARE = 0.10  # a round is "quiet" when other processes used < 10% of the machine's CPU meanwhile


def build_models(size: str, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    vocab, hidden, layers, heads, ffn, positions = SIZES[size]
    config = loire.preset(
        "gpt2",
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=ffn,
        max_position_embeddings=positions,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=min(50256, vocab - 1),
        eos_token_id=min(50256, vocab - 1),
    )
    torch.manual_seed(seed)
    ours = loire.LoireForCausalLM(config)
    hf_config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_inner=ffn,
        activation_function="gelu_new",
        layer_norm_epsilon=config.norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    hf = transformers.GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
    copy_weights(ours, hf)
    return ours, hf


@torch.no_grad()
def copy_weights(ours: torch.nn.Module, hf: torch.nn.Module) -> None:
    """Load the Loire weights into the HF GPT-2 (Conv1D stores (in, out), so Linear weights are transposed)."""
    base, tr = ours.model, hf.transformer
    tr.wte.weight.copy_(base.embed_tokens.weight)
    tr.wpe.weight.copy_(base.embed_positions.weight)
    tr.ln_f.weight.copy_(base.norm.weight)
    tr.ln_f.bias.copy_(base.norm.bias)
    for block, h in zip(base.layers, tr.h, strict=True):
        a, m = block.attn, block.mlp
        h.ln_1.weight.copy_(block.attn_norm.weight)
        h.ln_1.bias.copy_(block.attn_norm.bias)
        h.ln_2.weight.copy_(block.mlp_norm.weight)
        h.ln_2.bias.copy_(block.mlp_norm.bias)
        h.attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0).T)
        h.attn.c_attn.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0))
        h.attn.c_proj.weight.copy_(a.o_proj.weight.T)
        h.attn.c_proj.bias.copy_(a.o_proj.bias)
        h.mlp.c_fc.weight.copy_(m.up_proj.weight.T)
        h.mlp.c_fc.bias.copy_(m.up_proj.bias)
        h.mlp.c_proj.weight.copy_(m.down_proj.weight.T)
        h.mlp.c_proj.bias.copy_(m.down_proj.bias)
    if hf.lm_head.weight.data_ptr() != tr.wte.weight.data_ptr():
        raise RuntimeError("HF GPT-2 lm_head is not tied to wte")
    if ours.lm_head.weight.data_ptr() != base.embed_tokens.weight.data_ptr():
        raise RuntimeError("Loire lm_head is not tied to embed_tokens")


def check_same(ours: torch.nn.Module, hf: torch.nn.Module, vocab: int, seq: int) -> dict[str, Any]:
    """Same parameter count, and the same loss / logits on a probe batch (train mode, dropout 0)."""
    n_ours, n_hf = num_parameters(ours), num_parameters(hf)
    if n_ours != n_hf:
        raise RuntimeError(f"parameter counts differ: loire {n_ours:,} vs hf {n_hf:,}")
    probe = torch.randint(0, vocab, (2, min(seq, 64)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(input_ids=probe, labels=probe)
        b = hf(input_ids=probe, labels=probe)
    dlogits = (a.logits - b.logits).abs().max().item()
    dloss = abs(a.loss.item() - b.loss.item())
    if dlogits > 1e-3 or dloss > 1e-4:
        raise RuntimeError(f"models disagree: max |Δlogits| {dlogits:.2e}, |Δloss| {dloss:.2e}")
    return {"params": n_ours, "max_abs_dlogits": dlogits, "abs_dloss": dloss}


def make_step(model: torch.nn.Module, lr: float) -> Any:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(batch: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        return loss.item()

    return step


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    vocab = SIZES[args.size][0]
    batch, seq = args.batch, args.seq
    ours, hf = build_models(args.size, args.seed)
    same = check_same(ours, hf, vocab, seq)
    print(f"[{args.size}] params {same['params']:,} (equal); max |Δlogits| {same['max_abs_dlogits']:.2e}", flush=True)
    ours.train()
    hf.train()
    gen = torch.Generator().manual_seed(args.seed)
    data = [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(4)]
    steps = {"loire": make_step(ours, args.lr), "hf": make_step(hf, args.lr)}
    counter = {"loire": 0, "hf": 0}

    def timed(name: str, n: int) -> tuple[float, float]:
        """(seconds, share of the machine's CPU used by other processes meanwhile)."""
        fn = steps[name]
        before = cpu_counters()
        start = time.perf_counter()
        for _ in range(n):
            loss = fn(data[counter[name] % len(data)])
            counter[name] += 1
        elapsed = time.perf_counter() - start
        if not loss == loss:  # NaN
            raise RuntimeError(f"{name} loss is NaN")
        return elapsed, foreign_share(before, cpu_counters(), elapsed)

    for name in ("loire", "hf"):
        timed(name, args.warmup)
    tokens = batch * seq * args.steps_per_round
    rates: dict[str, list[float]] = {"loire": [], "hf": []}
    foreign: dict[str, list[float]] = {"loire": [], "hf": []}
    for r in range(args.rounds):
        order = ("loire", "hf") if r % 2 == 0 else ("hf", "loire")
        for name in order:
            seconds, share = timed(name, args.steps_per_round)
            rates[name].append(tokens / seconds)
            foreign[name].append(share)
        print(
            f"  round {r + 1}/{args.rounds}: loire {rates['loire'][-1]:,.0f} tok/s, hf {rates['hf'][-1]:,.0f} tok/s "
            f"(other processes' CPU share {foreign['loire'][-1]:.0%} / {foreign['hf'][-1]:.0%})",
            flush=True,
        )
    paired = [a / b for a, b in zip(rates["loire"], rates["hf"], strict=True)]
    quiet = [i for i in range(args.rounds) if max(foreign["loire"][i], foreign["hf"][i]) < QUIET_SHARE]
    med = {name: statistics.median(v) for name, v in rates.items()}
    vocab_, hidden, layers, heads, ffn, positions = SIZES[args.size]
    return {
        "size": args.size,
        "dims": {
            "vocab": vocab_,
            "hidden": hidden,
            "layers": layers,
            "heads": heads,
            "ffn": ffn,
            "positions": positions,
        },
        "params": same["params"],
        "equivalence": {"max_abs_dlogits": same["max_abs_dlogits"], "abs_dloss": same["abs_dloss"]},
        "batch": batch,
        "seq": seq,
        "tokens_per_step": batch * seq,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "optimizer": f"torch.optim.AdamW(lr={args.lr}) defaults",
        "loire_tokens_per_s": med["loire"],
        "hf_tokens_per_s": med["hf"],
        "ratio_loire_over_hf": med["loire"] / med["hf"],
        "ratio_paired_median": statistics.median(paired),
        "quiet_rounds": len(quiet),
        "quiet_ratio_loire_over_hf": (
            statistics.median(rates["loire"][i] for i in quiet) / statistics.median(rates["hf"][i] for i in quiet)
            if quiet
            else None
        ),
        "rounds_tokens_per_s": rates,
        "rounds_foreign_cpu_share": foreign,
        "machine": machine_facts(args.threads),
    }


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Training throughput: Loire vs Hugging Face GPT-2 (CPU)",
        "",
        "Written by `bench/throughput.py`. One training step = forward with labels + backward + AdamW step, "
        'float32, dropout 0, HF with `attn_implementation="sdpa"`, identical weights (copied from the Loire model; '
        "equal parameter counts and logits checked before timing). Rounds alternate between the models in one process "
        "after a warmup (A B, B A, ...); tokens/s is the median over rounds. Goal: loire/hf >= 1.0x.",
        "",
        "The models run the same matmuls and attention kernel (Loire's q/k/v are three matmuls where HF's c_attn is "
        "one; measured as equal here). Loire's loss is its own cross-entropy (`loire.model._CrossEntropy`), which "
        "keeps no (N, V) log-softmax and builds the gradient in place; HF uses `F.cross_entropy`.",
        "",
        "The machine may be shared: for every round the script records the share of the machine's CPU that other "
        "processes used meanwhile (from /proc/stat). *paired* is the median of per-round ratios (each round's two "
        f"measurements are adjacent in time); *quiet* uses only rounds where other processes took < {QUIET_SHARE:.0%}.",
        "",
        "| size | params | vocab/hidden/layers/heads/ffn/pos | batch×seq | rounds×steps | loire tok/s | hf tok/s "
        "| loire/hf | paired | quiet rounds: loire/hf |",
        "|---|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"].values():
        d = r["dims"]
        dims = f"{d['vocab']}/{d['hidden']}/{d['layers']}/{d['heads']}/{d['ffn']}/{d['positions']}"
        quiet = "n/a" if r["quiet_ratio_loire_over_hf"] is None else f"{r['quiet_ratio_loire_over_hf']:.3f}x"
        lines.append(
            f"| {r['size']} | {r['params']:,} | {dims} | {r['batch']}×{r['seq']} "
            f"| {r['rounds']}×{r['steps_per_round']} | {r['loire_tokens_per_s']:,.0f} | {r['hf_tokens_per_s']:,.0f} "
            f"| {r['ratio_loire_over_hf']:.3f}x "
            f"| {r['ratio_paired_median']:.3f}x | {r['quiet_rounds']}/{r['rounds']}: {quiet} |"
        )
    lines += ["", "## Machine", ""]
    for r in results["runs"].values():
        m = r["machine"]
        lines.append(
            f"- `{r['size']}`: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}, "
            f"transformers {m['transformers']}, Python {m['python']}, {m['date']}"
        )
    lines += ["", "Per-round tokens/s and other processes' CPU shares are in the JSON next to this file.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=None, help="default: per size (small 8, gpt2 4)")
    parser.add_argument("--seq", type=int, default=None, help="default: per size (256)")
    parser.add_argument("--rounds", type=int, default=6, help="measurement rounds per model")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model before the rounds")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/throughput.md"))
    args = parser.parse_args(argv)
    default_batch, default_seq = DEFAULT_SHAPE[args.size]
    args.batch = args.batch or default_batch
    args.seq = args.seq or default_seq
    if args.seq > SIZES[args.size][5]:
        parser.error(f"--seq {args.seq} exceeds the {args.size} model's {SIZES[args.size][5]} positions")

    result = run(args)
    out_md = args.out
    out_json = out_md.with_suffix(".json")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"runs": {}}
    if out_json.exists():
        try:
            results = json.loads(out_json.read_text())
            results.setdefault("runs", {})
        except json.JSONDecodeError:
            results = {"runs": {}}
    # Keep other sizes' results (same schema only), replace this size's.
    results["runs"] = {k: v for k, v in results["runs"].items() if "ratio_paired_median" in v}
    results["runs"][args.size] = result
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    out_md.write_text(render(results))
    print(
        f"[{args.size}] loire {result['loire_tokens_per_s']:,.0f} tok/s, hf {result['hf_tokens_per_s']:,.0f} tok/s, "
        f"ratio {result['ratio_loire_over_hf']:.3f}x (paired {result['ratio_paired_median']:.3f}x) "
        f"-> {out_md}, {out_json}"
    )


if __name__ == "__main__":
    main()
