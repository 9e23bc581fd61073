"""The `loire` command line: inspect, import-hf, grow, train-stage, lifelong, eval-downstream.

The pipeline's commands (demo, lineage, resume-crashed) live in flows/cli.py and join `app` through
`load_pipeline_commands` (the console entry point calls it), so the library installs and imports without
Prefect, MLflow or boto3."""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="LOIRE: grow pre-trained language models without changing what they compute.", no_args_is_help=True
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def clean_errors(fn: F) -> F:
    """Turn expected failures (bad input) into one clear line and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    import transformers

    transformers.utils.logging.disable_progress_bar()


def probe_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@torch.no_grad()
def max_logit_diff(
    old: torch.nn.Module, new: torch.nn.Module, seed: int = 0, batch: int = 2, length: int = 32
) -> tuple[float, float]:
    """max |Δlogits| and max |logits| of two models on a seeded random probe batch (eval mode)."""
    config = old.config
    generator = torch.Generator().manual_seed(seed)
    length = min(length, config.max_position_embeddings)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    was = old.training, new.training
    old.eval()
    new.eval()
    a, b = probe_logits(old, ids), probe_logits(new, ids)
    old.train(was[0])
    new.train(was[1])
    return float((a - b).abs().max()), float(a.abs().max())


@app.command()
@clean_errors
def inspect(
    path: Annotated[Path, typer.Argument(help="A Loire model folder (save_pretrained layout).")],
    seq_len: Annotated[int | None, typer.Option(help="Sequence length for FLOPs (default: max positions).")] = None,
) -> None:
    """Show a model's config, parameter count, FLOPs per token and growth devices."""
    from loire.flops import flops_per_token
    from loire.io import load_model
    from loire.model import num_parameters

    model = load_model(path)
    config = model.config
    head = {
        "LoireForCausalLM": "causal_lm",
        "LoireForMaskedLM": "masked_lm",
        "LoireForSequenceClassification": "sequence_classification",
    }.get(type(model).__name__, "base")
    t = seq_len or config.max_position_embeddings
    table = Table(title=f"{path} ({type(model).__name__})")
    table.add_column("field")
    table.add_column("value")
    from loire.config import ARCHITECTURE_FIELDS

    for name in ARCHITECTURE_FIELDS:
        table.add_row(name, str(getattr(config, name)))
    table.add_row("parameters", f"{num_parameters(model):,}")
    table.add_row(f"inference FLOPs/token (T={t})", f"{flops_per_token(config, t, training=False, head=head):.4g}")
    table.add_row(f"training FLOPs/token (T={t})", f"{flops_per_token(config, t, training=True, head=head):.4g}")
    lambdas = model.plugin_lambdas()
    table.add_row("plug-in layers (λ)", ", ".join(f"{i}: {v:.3g}" for i, v in lambdas.items()) or "none")
    mask = model.loire_base.hidden_mask
    table.add_row("hidden mask", "none" if mask is None else f"{int((mask == 1).sum())}/{mask.numel()} dims open")
    console.print(table)


@app.command("import-hf")
@clean_errors
def import_hf(
    src: Annotated[Path, typer.Argument(help="A Hugging Face GPT-2 / BERT / Llama folder.")],
    dst: Annotated[Path, typer.Argument(help="Where to write the Loire model folder.")],
) -> None:
    """Convert a local HF GPT-2, BERT or Llama checkpoint into an equivalent Loire model."""
    import transformers

    from loire.convert import from_hf
    from loire.io import check_destination, check_hf_folder, save_model_atomic

    check_hf_folder(src)
    check_destination(src, dst)
    config = transformers.AutoConfig.from_pretrained(src)
    names = config.architectures or []
    if not names or not hasattr(transformers, names[0]):
        raise ValueError(f"{src}/config.json: cannot tell the model class (architectures={names})")
    hf_model = getattr(transformers, names[0]).from_pretrained(src, use_safetensors=True)
    model = from_hf(hf_model)
    diff, scale = max_logit_diff(hf_model, model)
    save_model_atomic(model, dst, tokenizer_from=str(src))
    console.print(
        f"imported {names[0]} → {type(model).__name__} at {dst}; max |Δlogits| {diff:.3g} (max |logits| {scale:.3g})"
    )


@app.command()
@clean_errors
def grow(
    src: Annotated[Path, typer.Argument(help="A Loire model folder.")],
    dst: Annotated[Path, typer.Argument(help="Where to write the grown model folder.")],
    hidden: Annotated[int | None, typer.Option(help="New hidden_size.")] = None,
    ffn: Annotated[int | None, typer.Option(help="New intermediate_size.")] = None,
    heads: Annotated[int | None, typer.Option(help="New num_attention_heads.")] = None,
    layers: Annotated[int | None, typer.Option(help="New num_hidden_layers.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the new parameters' random values.")] = 0,
) -> None:
    """Grow a model function-preservingly and report the measured max |Δlogits|."""
    from loire.grow import grow as grow_model
    from loire.io import check_destination, load_model, save_model_atomic

    check_destination(src, dst)
    model = load_model(src)
    grown = grow_model(model, hidden=hidden, ffn=ffn, heads=heads, layers=layers, seed=seed)
    diff, scale = max_logit_diff(model, grown)
    save_model_atomic(grown, dst, tokenizer_from=str(src))
    c = grown.config
    console.print(
        f"grown {src} → {dst}: hidden {c.hidden_size}, ffn {c.intermediate_size}, heads {c.num_attention_heads}, "
        f"layers {c.num_hidden_layers}\nmax |Δlogits| on the probe batch: {diff:.3g} "
        f"(relative {diff / max(1.0, scale):.3g}, {next(grown.parameters()).dtype})"
    )


# `--schedule planned`: the preset with the growth planner deciding every later stage's growth, each stage
# at the preset's FLOPs (`<preset>-planned`; `reverse` likewise: the paper's ladder in reverse order).
SCHEDULE_KEYWORDS = ("planned", "reverse")


def _schedule(preset: str, schedule_file: Path | None):
    from loire.schedule import Schedule, schedule_preset

    if schedule_file is not None and str(schedule_file) in SCHEDULE_KEYWORDS and not schedule_file.exists():
        return schedule_preset(f"{preset}-{schedule_file}")
    return Schedule.from_yaml(schedule_file) if schedule_file is not None else schedule_preset(preset)


def _import_base(base: Path, dst: Path) -> Path:
    """Import a HF checkpoint as a stage-0 folder (rank 0 under torchrun; the others wait for it)."""
    from loire import distributed
    from loire.base import check_base, import_base

    check_base(base)  # every rank refuses a bad base the same way, before any waiting
    if distributed.is_main():
        record = import_base(base, dst)
        console.print(
            f"base {base} ({record['base']['architecture']}) imported as stage 0 at {dst}; "
            f"max |Δlogits| {record['base']['import_max_abs_logit_diff']:.3g}"
        )
    distributed.barrier()
    return dst


def _log_to_console(metrics: dict[str, float], step: int) -> None:
    logging.getLogger("loire.train").info(
        "step %d loss %.4f kd %.4f lr %.2e tok/s %.0f",
        step,
        metrics["train/loss"],
        metrics["train/kd_loss"],
        metrics["train/lr"],
        metrics["train/tokens_per_s"],
    )


@app.command("train-stage")
@clean_errors
def train_stage_command(
    domain: Annotated[str, typer.Option(help="Name of the new domain (e.g. NEWS).")],
    corpus: Annotated[str, typer.Option(help="Corpus folder, file or s3:// prefix.")],
    out: Annotated[Path, typer.Option(help="Stage folder to write (replaced only when complete).")],
    parent: Annotated[Path | None, typer.Option(help="The previous stage's folder (none: first stage).")] = None,
    base: Annotated[
        Path | None,
        typer.Option(help="First stage only: a HF GPT-2/BERT/Llama folder (safetensors + tokenizer) to grow from."),
    ] = None,
    preset: Annotated[
        str | None, typer.Option(help="Schedule preset (default gpt-tiny; from-base with --base).")
    ] = None,
    schedule: Annotated[
        Path | None,
        typer.Option(help="Schedule YAML (overrides --preset), or `planned` / `reverse`: the preset's variant."),
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="loire, loire-er, fixed-small, fixed-large, retrain, token-kd, replay, elle.")
    ] = "loire",
    steps: Annotated[int | None, typer.Option(help="Override the stage's optimizer steps.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last complete checkpoint.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    fsdp: Annotated[bool, typer.Option(help="Under torchrun: shard the model with FSDP instead of DDP.")] = False,
) -> None:
    """Grow the parent by the schedule, train on the new corpus, evaluate every seen domain.

    Runs as is under `torchrun --nproc_per_node=N` (rank 0 writes the folder and prints). With --base the
    checkpoint is imported as stage 0 into OUT's sibling `stage-0-base` and the stage grows from it."""
    from loire import distributed
    from loire.lifelong import run_stage

    if base is not None:
        if parent is not None:
            raise ValueError("--base starts a chain and --parent continues one: give only one of them")
        parent = _import_base(base, out.parent / "stage-0-base")
    try:
        result = run_stage(
            domain,
            corpus,
            out,
            parent=parent,
            schedule=_schedule(preset or ("from-base" if base is not None else "gpt-tiny"), schedule),
            strategy=strategy,
            steps=steps,
            resume=resume,
            device=device,
            on_log=_log_to_console,
            fsdp=fsdp,
        )
    finally:
        distributed.destroy()
    if not distributed.is_main():
        return
    table = Table(title=f"stage {result.stage} ({domain}, {result.strategy}) → {out}")
    for column in (*result.ppl, "AP", "AP+", "max |Δlogits| at growth", "FLOPs", "wall s"):
        table.add_column(column)
    growth = "-" if result.growth_max_abs_logit_diff is None else f"{result.growth_max_abs_logit_diff:.2g}"
    ap_plus = "-" if result.ap_plus is None else f"{result.ap_plus:.2f}"
    table.add_row(
        *(f"{v:.2f}" for v in result.ppl.values()),
        f"{result.ap:.2f}",
        ap_plus,
        growth,
        f"{result.flops:.3g}",
        f"{result.wall_time_s:.0f}",
    )
    console.print(table)


@app.command()
@clean_errors
def lifelong(
    corpora: Annotated[str, typer.Option(help="Folder (or s3:// prefix) with one corpus folder per domain.")],
    out: Annotated[Path, typer.Option(help="Output folder: one stage folder per domain, JSON and PNG.")],
    domains: Annotated[str, typer.Option(help="Comma-separated domains, in order.")] = "WB,NEWS,REV,BIO,CS",
    strategy: Annotated[
        str, typer.Option(help="loire, loire-er, fixed-small, fixed-large, retrain, token-kd, replay, elle.")
    ] = "loire",
    preset: Annotated[
        str | None, typer.Option(help="Schedule preset (default gpt-tiny; from-base with --base).")
    ] = None,
    schedule: Annotated[
        Path | None,
        typer.Option(help="Schedule YAML (overrides --preset), or `planned` / `reverse`: the preset's variant."),
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Override every stage's optimizer steps.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    base: Annotated[
        Path | None,
        typer.Option(help="A HF GPT-2/BERT/Llama folder (safetensors + tokenizer) imported as stage 0 to grow from."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue an interrupted run in --out: finished stages are read back, the next one continues "
            "from its newest training checkpoint.",
        ),
    ] = False,
) -> None:
    """Run every stage of a strategy and print the PPL / AP / AP+ table.

    With --base, each stage is also evaluated right after growth: the init → final table is printed."""
    from loire.lifelong import run_lifelong

    names = [d.strip() for d in domains.split(",") if d.strip()]
    if base is not None:
        from loire.base import check_base

        check_base(base)  # refuse a bad base before anything is written
    summary = run_lifelong(
        corpora,
        names,
        out,
        strategy=strategy,
        schedule=_schedule(preset or ("from-base" if base is not None else "gpt-tiny"), schedule),
        steps=steps,
        device=device,
        base=base,
        eval_init=base is not None,
        resume=resume,
    )
    console.print(ppl_table(summary))
    if any("ppl_init" in s for s in summary["stages"]):
        console.print(init_final_table(summary))
    console.print(f"wrote {out / 'lifelong.json'} and {out / 'ppl.png'}")


def ppl_table(summary: dict[str, Any]) -> Table:
    """Stage × domain perplexities with AP and AP+, laid out like ELLE's and LOIRE's tables."""
    table = Table(title=f"{summary['strategy']}: perplexity after each stage")
    table.add_column("stage")
    for domain in summary["domains"]:
        table.add_column(domain, justify="right")
    for column in ("AP", "AP+", "FLOPs (cum.)"):
        table.add_column(column, justify="right")
    for s in summary["stages"]:
        cells = [f"{s['ppl'][d]:.2f}" if d in s["ppl"] else "" for d in summary["domains"]]
        ap_plus = "-" if s["ap_plus"] is None else f"{s['ap_plus']:.2f}"
        table.add_row(f"{s['stage']} {s['domain']}", *cells, f"{s['ap']:.2f}", ap_plus, f"{s['cumulative_flops']:.3g}")
    return table


def render_lineage(chain: Sequence[Mapping[str, Any]]) -> Table:
    """A rich table of a `Tracker.lineage` chain (`loire.arrivals.lineage_frame`)."""
    from loire.arrivals import lineage_frame

    frame = lineage_frame(chain)
    table = Table(title="LOIRE lineage (oldest first)")
    for column in frame.columns:
        table.add_column(column, overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*(_fmt_or_dash(v) if isinstance(v, float) else str(v) for v in row))
    return table


def _fmt_or_dash(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.4g}"


def downstream_table(results: list[Any], title: str) -> Table:
    """Task × (domain, metric, mean ± std, majority-class baseline); stand-in tasks marked †."""
    from loire.downstream import average_score

    table = Table(title=title)
    for column in ("task", "domain", "metric", "score (mean ± std)", "majority class", "train/dev/test", "wall s"):
        table.add_column(column, justify="left" if column in ("task", "domain", "metric") else "right")
    done = []
    for r in results:
        if not r.ok:
            table.add_row(r.task, r.domain, "-", "[red]failed[/]", "-", "-", "-")
            continue
        done.append(r)
        name = f"{r.task} †" if r.substitute else r.task
        table.add_row(
            name,
            r.domain,
            r.metric,
            f"{100 * r.mean:.1f} ± {100 * r.std:.1f}",
            f"{100 * r.majority:.1f}",
            f"{r.n_train}/{r.n_dev}/{r.n_test}",
            f"{r.wall_time_s:.0f}",
        )
    if done:
        mean, majority = average_score(done), average_score(done, "majority")
        table.add_row("average", "", "", f"{100 * mean:.1f}", f"{100 * majority:.1f}", "", "")
    return table


def init_final_table(summary: dict[str, Any]) -> Table:
    """Per stage and domain: perplexity right after growth ("init") and after training ("final"),
    laid out like the paper's LOIRE-Bert table (pseudo-perplexity for a masked LM)."""
    base = summary.get("base")
    title = f"{summary['strategy']}: perplexity init (after growth) → final (after training)"
    if base is not None:
        title += f", from base {base['source']}"
    table = Table(title=title)
    table.add_column("stage")
    table.add_column("")
    for domain in summary["domains"]:
        table.add_column(domain, justify="right")
    for s in summary["stages"]:
        for label, row in (("init", s.get("ppl_init", {})), ("final", s["ppl"])):
            cells = [f"{row[d]:.2f}" if d in row else "" for d in summary["domains"]]
            table.add_row(f"{s['stage']} {s['domain']}", label, *cells)
    return table


@app.command("eval-downstream")
@clean_errors
def eval_downstream(
    model_dir: Annotated[Path, typer.Argument(help="A stage (or Loire model) folder with its tokenizer.")],
    tasks: Annotated[str, typer.Option(help="all, or comma-separated task names of the catalogue.")] = "all",
    data_root: Annotated[
        str | None,
        typer.Option(
            help="Folder (or s3:// prefix) laid out like shared/data (default: $LOIRE_DATA or ../shared/data)."
        ),
    ] = None,
    budget: Annotated[
        int | None,
        typer.Option(help="Max training examples per task; dev/test capped to match (default 500; 0 = all data)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON to this file.")] = None,
    seeds: Annotated[int, typer.Option(help="Fine-tuning runs per task (seeds 0..N-1), reported as mean ± std.")] = 1,
    catalogue: Annotated[Path | None, typer.Option(help="Task catalogue YAML (default: loire/tasks/dsp.yaml).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")] = None,
) -> None:
    """Fine-tune the model on the DSP downstream tasks and print score, std and majority baseline."""
    import json
    import os
    import time

    from loire.downstream import DEFAULT_BUDGET, TaskFailure, default_data_root, evaluate_downstream, summary

    if budget is not None and budget < 0:
        raise ValueError(f"--budget {budget}: must be >= 0 (0 = all data)")
    cap = DEFAULT_BUDGET if budget is None else (budget or None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads}: must be >= 1")
        torch.set_num_threads(threads)
    root = data_root or default_data_root()

    started = time.perf_counter()
    with console.status("fine-tuning") as status:

        def progress(result: Any) -> None:
            status.update(f"fine-tuning: {result.task} done")

        results = evaluate_downstream(
            model_dir, tasks, root, budget=cap, seeds=seeds, catalogue=catalogue, device=device, on_result=progress
        )
    wall = time.perf_counter() - started
    console.print(
        downstream_table(results, title=f"{model_dir}: downstream fine-tuning (budget {cap or 'all'}, {seeds} seed(s))")
    )
    stand_ins = [r for r in results if getattr(r, "substitute", None)]
    for r in stand_ins:
        console.print(f"† {r.task}: {r.substitute}", highlight=False)
    if out is not None:
        record = summary(
            results, model_dir=str(model_dir), data_root=str(root), budget=cap, seeds=seeds, wall_time_s=wall
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, out)
        console.print(f"wrote {out} ({wall:.0f} s)")
    failures = [r for r in results if isinstance(r, TaskFailure)]
    for failure in failures:
        err_console.print(f"[bold red]error:[/] task {failure.task}: {failure.error}", highlight=False, soft_wrap=True)
    if failures:
        raise typer.Exit(code=2)


PIPELINE_COMMANDS = ("demo", "lineage", "resume-crashed")


def load_pipeline_commands() -> None:
    """Add the pipeline's commands (flows/cli.py) to `app`. Called by the console entry point, never at import,
    so `import loire.cli` stays free of the pipeline; without `flows` on the path the commands are stubs that
    say what to install."""
    try:
        import flows.cli  # noqa: F401  (registers demo, lineage, resume-crashed on `app`)
    except ImportError:
        for name in PIPELINE_COMMANDS:
            app.command(
                name,
                help="Needs the pipeline extra: pip install 'loire\\[pipeline]'.",
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
            )(_pipeline_missing)


def _pipeline_missing() -> None:
    """Needs the pipeline: pip install 'loire[pipeline]'."""
    err_console.print("[bold red]error:[/] this command needs the pipeline: pip install 'loire\\[pipeline]'")
    raise typer.Exit(code=2)


def run() -> None:  # pragma: no cover - console entry point
    load_pipeline_commands()
    app(prog_name="loire")


if __name__ == "__main__":  # pragma: no cover
    # `python -m loire.cli` (torchrun, accelerate, the demo test): run the importable module `loire.cli`, whose
    # `app` flows/cli.py registers its commands on, not this `__main__` copy.
    from loire.cli import run as run_cli

    sys.exit(run_cli())
