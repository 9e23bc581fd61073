"""Cost of the growth operators on a GPT-2-small-sized (124M) LoireForCausalLM in float32, on CPU.

For each operator alone (hidden 768→1024, ffn 3072→4096, heads 12→16, layers 12→16) and all four
combined in one `loire.grow.grow()` call, this measures
- the wall time of the grow call (median of `--repeats` calls; the first, cold call is reported too),
- the peak extra resident memory during the call relative to the original model's size
  (float32 parameter + buffer bytes, tied weights counted once),
- max |Δlogits| of the grown model vs the original on a probe batch (eval mode, float32).

Every case runs in a fresh subprocess, so no case inherits another's heap. Peak memory: before each
call the script runs `gc.collect()` and `malloc_trim(0)`, resets the kernel's peak-RSS counter of the
process (`echo 5 > /proc/self/clear_refs`, which resets VmHWM and ru_maxrss) and reads VmRSS; after the
call VmHWM − VmRSS(before) is the peak extra memory, including the new model that the call returns. A
background thread sampling /proc/self/statm every ~0.5 ms on one extra call cross-checks it (and is the
fallback where clear_refs is not writable). Goals: < 2 s per call, peak extra < 3× the model size.

    .venv/bin/python bench/grow.py                      # all cases, writes bench/results/grow.{md,json}
    .venv/bin/python bench/grow.py --cases hidden all   # a subset
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import loire  # noqa: E402
from bench.common import cpu_counters, foreign_share, machine_facts  # noqa: E402
from loire.grow import grow  # noqa: E402
from loire.model import num_parameters  # noqa: E402

# case -> grow() targets (new totals) on the gpt2 preset: hidden 768, ffn 3072, heads 12 (head_dim 64), layers 12
CASES: dict[str, dict[str, int]] = {
    "hidden": {"hidden": 1024},
    "ffn": {"ffn": 4096},
    "heads": {"heads": 16},
    "layers": {"layers": 16},
    "all": {"hidden": 1024, "ffn": 4096, "heads": 16, "layers": 16},
}
TIME_GOAL_S = 2.0
MEMORY_GOAL_X = 3.0
PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------- memory probes
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_hwm() -> bool:
    """Reset the process's peak RSS (VmHWM, ru_maxrss) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Give freed heap memory back to the OS, so the baseline RSS holds only live data."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class RssSampler(threading.Thread):
    """Samples the resident set size from /proc/self/statm every `interval` seconds; keeps the max."""

    def __init__(self, interval: float = 0.0005) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        with open("/proc/self/statm") as f:
            while not self._stop_event.is_set():
                f.seek(0)
                self.peak = max(self.peak, int(f.read().split()[1]) * PAGE)
                self.samples += 1
                time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


# ----------------------------------------------------------------------------- facts
def model_bytes(model: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def dims(config: loire.LoireConfig) -> dict[str, int]:
    return {
        "hidden": config.hidden_size,
        "ffn": config.intermediate_size,
        "heads": config.num_attention_heads,
        "layers": config.num_hidden_layers,
    }


# ----------------------------------------------------------------------------- worker (one case, own process)
def worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    targets = CASES[args.worker]
    torch.manual_seed(0)
    model = loire.LoireForCausalLM(loire.preset(args.preset)).eval()
    size = model_bytes(model)
    probe = torch.randint(
        0, model.config.vocab_size, (args.probe_batch, args.probe_seq), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        base_logits = model(input_ids=probe, use_cache=False).logits

    times: list[float] = []
    foreign: list[float] = []
    extra: list[int] = []
    retained: list[int] = []
    hwm_ok = True
    dlogits = rel = None
    grown_info: dict[str, Any] = {}
    for i in range(args.repeats):
        trim_heap()
        hwm_ok = reset_hwm() and hwm_ok
        before = rss_bytes()
        counters = cpu_counters()
        start = time.perf_counter()
        grown = grow(model, **targets)
        times.append(time.perf_counter() - start)
        foreign.append(foreign_share(counters, cpu_counters(), times[-1]))
        extra.append(hwm_bytes() - before)
        retained.append(rss_bytes() - before)
        if i == 0:
            with torch.no_grad():
                logits = grown(input_ids=probe, use_cache=False).logits
            dlogits = (logits - base_logits).abs().max().item()
            rel = dlogits / base_logits.abs().max().item()
            grown_info = {"dims": dims(grown.config), "params": num_parameters(grown), "bytes": model_bytes(grown)}
            del logits
        del grown

    # Cross-check with a sampling thread on one extra call.
    trim_heap()
    before = rss_bytes()
    sampler = RssSampler()
    sampler.start()
    grown = grow(model, **targets)
    sampled_peak = sampler.stop()
    sampled_extra = sampled_peak - before
    del grown

    peak_extra = max(extra) if hwm_ok else sampled_extra
    return {
        "case": args.worker,
        "targets": targets,
        "from": dims(model.config),
        "to": grown_info["dims"],
        "params_before": num_parameters(model),
        "params_after": grown_info["params"],
        "model_bytes": size,
        "grown_bytes": grown_info["bytes"],
        "times_s": times,
        "cold_s": times[0],
        "median_s": statistics.median(times),
        "foreign_cpu_share_per_call": foreign,
        "max_foreign_cpu_share": max(foreign),
        "memory_method": "VmHWM reset via /proc/self/clear_refs" if hwm_ok else "RSS sampler thread (statm)",
        "peak_extra_bytes_per_call": extra if hwm_ok else [],
        "peak_extra_bytes": peak_extra,
        "peak_extra_x_model": peak_extra / size,
        "sampled_peak_extra_bytes": sampled_extra,
        "sampled_peak_extra_x_model": sampled_extra / size,
        "sampler_samples": sampler.samples,
        "retained_after_call_x_model": statistics.median(retained) / size,
        "grown_x_model": grown_info["bytes"] / size,
        "max_abs_dlogits": dlogits,
        "max_abs_dlogits_rel": rel,
        "time_ok": statistics.median(times) < TIME_GOAL_S,
        "memory_ok": peak_extra / size < MEMORY_GOAL_X,
    }


# ----------------------------------------------------------------------------- report
def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    rows = result["cases"]
    first = next(iter(rows.values()))
    lines = [
        "# Growth operators: time and memory (CPU, float32)",
        "",
        f'Written by `bench/grow.py`. Model: `loire.preset("{result["preset"]}")` LoireForCausalLM '
        f"({first['params_before']:,} parameters, {first['model_bytes'] / 2**20:,.0f} MiB float32), eval mode. "
        f"Each case runs in a fresh subprocess; time is the median of {result['repeats']} `grow()` calls "
        f"(the first, cold call also shown). Goals: < {TIME_GOAL_S:g} s, peak extra memory < {MEMORY_GOAL_X:g}× "
        "the model size.",
        "",
        f"Peak memory method: {first['memory_method']} — before each call `gc.collect()` + `malloc_trim(0)`, "
        "the kernel's peak-RSS counter is reset and VmRSS read; peak extra = VmHWM after the call − VmRSS before. "
        "It includes the grown model the call returns (its size is the *grown/model* column). *sampled* is a "
        "cross-check on one more call by a thread reading /proc/self/statm every ~0.5 ms (it can miss short peaks).",
        "",
        "| case | growth | params after | median s | cold s | time goal | peak extra ×model | sampled ×model "
        "| grown/model | memory goal | max abs Δlogits (rel) | others' CPU |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows.values():
        change = ", ".join(f"{k} {r['from'][k]}→{r['to'][k]}" for k in r["from"] if r["from"][k] != r["to"][k])
        lines.append(
            f"| {r['case']} | {change} | {r['params_after']:,} | {r['median_s']:.2f} | {r['cold_s']:.2f} "
            f"| {'ok' if r['time_ok'] else '**miss**'} | {r['peak_extra_x_model']:.2f}x "
            f"| {r['sampled_peak_extra_x_model']:.2f}x | {r['grown_x_model']:.2f}x "
            f"| {'ok' if r['memory_ok'] else '**miss**'} "
            f"| {r['max_abs_dlogits']:.2e} ({r['max_abs_dlogits_rel']:.1e}) | {r['max_foreign_cpu_share']:.0%} |"
        )
    lines += [
        "",
        f"Probe batch for Δlogits: {result['probe_batch']}×{result['probe_seq']} random token ids; "
        "*rel* divides by max |logits| of the original model. *others' CPU*: the largest share of the machine's CPU "
        "that other processes used during a timed call (from /proc/stat; the machine may be shared).",
        "",
        "## Machine",
        "",
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, {m['threads']} torch threads, "
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}, {m['date']}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--probe-batch", type=int, default=2)
    parser.add_argument("--probe-seq", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/grow.md"))
    parser.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    cases: dict[str, Any] = {}
    for case in args.cases:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker", case,
            "--preset", args.preset,
            "--repeats", str(args.repeats),
            "--threads", str(args.threads),
            "--probe-batch", str(args.probe_batch),
            "--probe-seq", str(args.probe_seq),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"worker for case {case!r} failed with exit code {proc.returncode}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        cases[case] = r
        print(
            f"{case:>6}: median {r['median_s']:.2f} s (cold {r['cold_s']:.2f} s), peak extra "
            f"{r['peak_extra_x_model']:.2f}x model (sampled {r['sampled_peak_extra_x_model']:.2f}x), "
            f"max |Δlogits| {r['max_abs_dlogits']:.2e}, others' CPU share <= {r['max_foreign_cpu_share']:.0%}",
            flush=True,
        )
    result = {
        "preset": args.preset,
        "repeats": args.repeats,
        "probe_batch": args.probe_batch,
        "probe_seq": args.probe_seq,
        "time_goal_s": TIME_GOAL_S,
        "memory_goal_x_model": MEMORY_GOAL_X,
        "machine": machine_facts(args.threads),
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.write_text(render(result))
    print(f"-> {args.out}, {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
