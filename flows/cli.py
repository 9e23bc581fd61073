"""The pipeline's commands of the `loire` CLI: demo, lineage, resume-crashed.

They join the library's typer app (`loire.cli.app`) when this module is imported, which
`loire.cli.load_pipeline_commands` does for the console entry point. Prefect and MLflow are imported inside each
command, so `loire --help` stays fast; without the `pipeline` extra this module refuses to load and the commands
are stubs that say what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer

from loire.cli import app, clean_errors, console, render_lineage

_MISSING = [name for name in ("prefect", "mlflow", "boto3") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"the pipeline needs {', '.join(_MISSING)}: pip install 'loire[pipeline]'")


@app.command("demo")
@clean_errors
def demo(
    quick: Annotated[
        bool, typer.Option("--quick", help="The micro schedule and a small downstream budget (~3 min).")
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(help="Real corpora and tasks laid out like shared/data (default: the synthetic generator)."),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Folder for the landing zone, MLflow DB, Prefect home, stages, logs.")
    ] = Path("loire-demo"),
) -> None:
    """The whole event-driven pipeline on this machine: local Prefect server, MLflow on SQLite, five domains."""
    from flows.demo import run_demo

    results = run_demo(quick=quick, data=data, out=out, console=console)
    if any("error" in r for r in results):
        raise typer.Exit(code=1)


@app.command("lineage")
@clean_errors
def lineage(
    model: Annotated[str, typer.Option("--model", help="Registered model name.")] = "loire-lm",
    alias: Annotated[str, typer.Option(help="Start from this alias or version number.")] = "champion",
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI).")
    ] = None,
) -> None:
    """The chain of stage versions in the MLflow registry, from stage 1 to the alias (default: champion)."""
    from flows.registry import Tracker

    chain = Tracker(tracking_uri=tracking_uri, model_name=model).lineage(alias)
    if not chain:
        raise ValueError(f"--model {model}: no version behind {alias!r} in the registry")
    console.print(render_lineage(chain))


@app.command("resume-crashed")
@clean_errors
def resume_crashed(
    deployment: Annotated[
        str, typer.Option(help="The stage deployment (flow-name/deployment-name).")
    ] = "lifelong-stage/lifelong-stage",
    failed: Annotated[
        bool,
        typer.Option("--failed", help="Also reschedule Failed runs (after fixing the cause, e.g. an MLflow outage)."),
    ] = False,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only this flow-run id (repeatable).")] = None,
    max_resumes: Annotated[
        int, typer.Option(help="Skip a run that already ended Crashed/Failed more than this many times.")
    ] = 3,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be rescheduled.")] = False,
) -> None:
    """Reschedule crashed stage runs in place: same flow run, same MLflow run, training resumes from the last
    complete checkpoint (the Prefect server is PREFECT_API_URL)."""
    from flows.serve import resume_crashed as resume

    done = resume(deployment, include_failed=failed, run_ids=run, max_resumes=max_resumes, dry_run=dry_run)
    if not done:
        console.print(f"no {'crashed or failed' if failed else 'crashed'} runs of {deployment}")
        return
    for r in done:
        closed = f", {r.orphans} orphaned subflow run(s) marked Crashed" if r.orphans else ""
        console.print(
            f"{r.action}: flow run {r.name} {r.run_id} ({r.state}, arrival {r.arrival or '-'}){closed}",
            highlight=False,
            soft_wrap=True,
        )
    if any(r.action.startswith("skipped") for r in done):
        raise typer.Exit(code=1)


__all__ = ["app"]
