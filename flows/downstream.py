"""Downstream fine-tuning of a stage model: one Prefect task per catalogue task, mapped in parallel.

A thin adapter over `loire.downstream.evaluate_task`: malformed task data fails that task only (a
`TaskFailure` in the results, logged as a warning); the other tasks still run and report.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from loire.downstream import evaluate_task, load_catalogue, select_tasks


@task(name="fine-tune-task", task_run_name="fine-tune {name}")
def fine_tune_task(
    model_dir: str,
    name: str,
    data_root: str,
    catalogue: str | None,
    budget: int | None,
    seeds: int,
) -> dict[str, Any]:
    """Fine-tune a copy of the stage model on one task; returns its result (or failure) as a dict."""
    spec = load_catalogue(catalogue)[name]
    result = evaluate_task(model_dir, spec, data_root, seeds=list(range(seeds)), budget=budget or None)
    if not result.ok:
        get_run_logger().warning("task %s failed: %s", name, result.error)  # type: ignore[union-attr]
    return result.to_dict()


def _table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "task": r["task"],
            "domain": r["domain"],
            "metric": r.get("metric", "-"),
            "score": round(100 * r["mean"], 2) if r["ok"] else "failed",
            "std": round(100 * r["std"], 2) if r["ok"] else "-",
            "majority": round(100 * r["majority"], 2) if r["ok"] else "-",
            "note": r.get("substitute") or r.get("error") or "",
        }
        for r in results
    ]


@flow(name="downstream-eval", log_prints=False)
def downstream_eval(
    model_dir: str,
    tasks: list[str],
    data_root: str | None = None,
    budget: int | None = 300,
    seeds: int = 1,
    catalogue: str | None = None,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune the model on each named task (in parallel task runs) and report mean ± std per task."""
    from loire.downstream import default_data_root

    root = data_root or default_data_root()
    names = [spec.name for spec in select_tasks(load_catalogue(catalogue), list(tasks))] if tasks else []
    futures = fine_tune_task.map(model_dir, names, root, catalogue, budget, seeds) if names else []
    results = [f.result() for f in futures]
    if results:
        create_table_artifact(
            _table(results), key="downstream-scores", description=f"downstream fine-tuning of {model_dir}"
        )
    if mlflow_run_id is not None and results:
        from flows.registry import Tracker

        Tracker(tracking_uri=tracking_uri).log_downstream(mlflow_run_id, results)
    return results
