"""One lifelong stage, started by the watcher for one arrival (a `_SUCCESS` marker in the landing zone).

The story of a stage:
  1. skip it if this arrival (batch URI + ETag) already has a complete registered version whose
     promotion was decided (exactly once; a version registered by a run that died before promoting
     is picked up again: the stage goes on, re-registers nothing and promotes);
  2. resolve the parent: the registry's `champion` (none for the first stage) and its ancestors,
     downloaded as stage folders (the parent to grow, the teachers to distil from); with `base_model` set and
     nothing registered yet, the base is first imported exactly and registered as stage 0, the champion;
  3. fetch the new corpus (and the earlier domains' corpora) to a local cache and validate it;
  4. grow, distil and train: the `train-stage` flow, a subflow here in embedded mode or a
     `run_deployment` on the GPU work pool;
  5. log perplexity on every seen domain, AP, AP+, FLOPs and growth |Δlogits| to the stage's MLflow run;
  6. fine-tune on the downstream tasks of the seen domains (mapped task runs);
  7. register the model as a new version (alias `candidate`), then promote it to `champion` only
     if the gates pass; otherwise say why and leave the champion where it is;
  8. publish Prefect artifacts: the stage × domain table, the lineage with MLflow links, the PPL plot.

Everything between tasks is a URI, a path or an id. Retries are on I/O tasks only; a failed
training, a bad corpus or a diverged loss fails the flow run (the exception propagates). Tasks that talk
to MLflow have no Prefect retries: `flows.tracking` retries every request with one bounded backoff
(`flows.retry.RetryPolicy`), so an outage longer than that budget fails the stage after the budget, not after
four times it. S3 fetches are retried by Prefect on I/O errors only (a `LandingError` fails at once).

Resume. A crashed or failed run is rescheduled in place (`loire resume-crashed`): the same flow run id
finds its MLflow run again, the stage folder and its checkpoints are keyed by the arrival and by the
parent version it grows from (a resumed stage whose champion moved meanwhile starts afresh from the new
parent instead of loading checkpoints of another model), and the promotion is conditional on the
champion still being that parent (`Tracker.promote(parent_version=...)`).
"""

from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows import carry
from flows.automation import crash_guard
from flows.downstream import downstream_eval
from flows.landing import Arrival, fetch_batch, fetch_model_folder, fetch_uri
from flows.redact import redact
from flows.registry import Tracker
from flows.retry import RetryPolicy, retry_condition
from flows.settings import PipelineSettings, load_settings, resolve_schedule
from flows.train import train_stage
from loire.arrivals import lineage_frame, retry_seed, should_retry
from loire.base import check_base, import_base, weights_sha256
from loire.data import CorpusError, load_corpus
from loire.lifelong import STAGE_FILE, plan_stage, read_stage, seen_corpora, stage_ppl_frame, stage_spec
from loire.planner import probes_frame
from loire.promotion import Gates
from loire.schedule import Schedule

if TYPE_CHECKING:
    import pandas as pd

IO_RETRIES = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_condition,
)
# MLflow tasks: retried per request by the tracker (one budget); results never cached across attempts of a
# flow run, so a resumed run sees the registry as it is now.
MLFLOW_TASK = dict(retries=0, cache_policy=NO_CACHE)


def _safe(text: str) -> str:
    """A file-name-safe rendering of an id (ETags can hold quotes and dashes)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]


# ------------------------------------------------------------------------------------------- I/O tasks
@task(name="find-existing-version", **MLFLOW_TASK)
def find_existing(settings: PipelineSettings, batch_uri: str, etag: str) -> dict[str, Any] | None:
    """The arrival's complete version, if any, and whether its promotion was decided."""
    tracker = _tracker(settings)
    version = tracker.find_arrival(batch_uri, etag)
    if version is None:
        return None
    return {"version": str(version.version), "run_id": version.run_id, "decided": tracker.is_decided(version)}


@task(name="import-base", **MLFLOW_TASK)
def import_base_model(settings: PipelineSettings) -> str | None:
    """With `base_model` set and no stage registered yet: fetch the base, import it exactly (`loire.base`), register
    it as stage 0 and make it the champion, so the arrival grows from it. Its version (None when nothing to do).

    A wrong-format base (pickle weights, another architecture, no tokenizer) fails the stage with loire.base's one
    line before anything is registered."""
    source, tracker = settings.base_model, _tracker(settings)
    if source is None or not tracker.awaits_base():
        return None
    local = fetch_model_folder(source, Path(settings.work_dir) / "base", max_object_bytes=settings.max_object_bytes)
    check_base(local)
    out = Path(settings.work_dir) / "models" / settings.model_name / f"base-{_safe(source)}"
    if not (out / STAGE_FILE).is_file() or read_stage(out)["base"]["sha256"] != weights_sha256(local):
        import_base(local, out, uri=source)
    get_run_logger().info("base model %s imported as stage 0 (%s)", source, out)
    return str(tracker.register_base(out, flow_run_id=flow_run.get_id()).version)


@task(name="resolve-parent", **MLFLOW_TASK)
def resolve_parent(settings: PipelineSettings) -> dict[str, Any]:
    """The champion's stage folder and those of all its ancestors (teachers), downloaded to the work dir."""
    tracker = _tracker(settings)
    champion = tracker.champion()
    if champion is None:
        return {"version": None, "parent_dir": None, "teacher_dirs": [], "lineage": []}
    chain = tracker.lineage(champion.version)
    models = Path(settings.work_dir) / "models" / settings.model_name
    dirs = [str(tracker.download_stage(entry["version"], models / f"v{entry['version']}")) for entry in chain]
    return {"version": champion.version, "parent_dir": dirs[-1], "teacher_dirs": dirs, "lineage": chain}


@task(name="fetch-corpus", **IO_RETRIES)
def fetch_corpus(settings: PipelineSettings, arrival: dict[str, Any]) -> str:
    """The arrival's data files as a local folder (S3 objects downloaded once, atomically)."""
    arr = Arrival.from_params(arrival)
    dest = Path(settings.work_dir) / "corpora" / arr.domain / f"{_safe(arr.batch)}-{_safe(arr.etag)}"
    return str(fetch_batch(arr, dest, max_object_bytes=settings.max_object_bytes))


@task(name="fetch-earlier-corpora", **IO_RETRIES)
def fetch_earlier(settings: PipelineSettings, parent_dir: str | None) -> dict[str, str]:
    """Local copies of the corpora of every domain seen before (replay, evaluation, retraining)."""
    if parent_dir is None:
        return {}
    cache = Path(settings.work_dir) / "corpora"
    return {  # carried domains included: seen from the stage that carried them (loire.lifelong.seen_corpora)
        domain: str(fetch_uri(uri, cache / "by-uri", max_object_bytes=settings.max_object_bytes))
        for domain, uri in seen_corpora(read_stage(parent_dir)["lineage"]).items()
    }


@task(name="owed-arrivals", **MLFLOW_TASK)
def owed_arrivals(
    settings: PipelineSettings, arr: Arrival, parent: dict[str, Any], parent_stage: int | None
) -> dict[str, Any]:
    """Which pending arrivals (registered, not promoted, not covered by the champion) this stage owes and, by the
    `rejected_policy` setting, trains on as well; what the new version will cover (loire.arrivals)."""
    from flows.tracking import arrival_key

    chain = [str(e["version"]) for e in parent["lineage"]]
    return carry.stage_plan(
        _tracker(settings),
        settings.rejected_policy,
        chain,
        arrival_key(arr.batch_uri, arr.etag),
        arr.domain,
        parent_stage,
    )


@task(name="fetch-carried-corpora", **IO_RETRIES)
def fetch_carried(settings: PipelineSettings, carried: list[dict[str, Any]]) -> dict[str, str]:
    """Local copies of the pending arrivals' corpora (domain -> folder) that this stage trains on as well."""
    cache = Path(settings.work_dir) / "corpora"
    return {
        c["domain"]: str(fetch_uri(c["corpus_uri"], cache / "by-uri", max_object_bytes=settings.max_object_bytes))
        for c in carried
    }


def landed_error(exc: CorpusError, corpus_dir: str, batch_uri: str) -> CorpusError:
    """`exc` naming the landed object (batch URI + the file's path in the batch) instead of the local cache copy."""
    try:
        rel = Path(exc.path).resolve().relative_to(Path(corpus_dir).resolve())
    except ValueError:  # not a file of the fetched batch: keep what the library named
        return exc
    return CorpusError(f"{batch_uri.rstrip('/')}/{rel.as_posix()}", exc.reason, exc.line, unit=exc.unit)


@task(name="validate-corpus")
def validate_corpus(corpus_dir: str, batch_uri: str) -> dict[str, int]:
    """Load the corpus once before any training: a `CorpusError` names the landed file (and line) and fails the
    stage (a corrupt or truncated `.gz` included)."""
    try:
        corpus = load_corpus(corpus_dir)
    except CorpusError as exc:
        raise landed_error(exc, corpus_dir, batch_uri) from None
    get_run_logger().info(
        "corpus %s: %d train / %d validation documents from %d file(s)",
        batch_uri,
        len(corpus.train),
        len(corpus.valid),
        len(corpus.files),
    )
    return {"train_documents": len(corpus.train), "valid_documents": len(corpus.valid)}


@task(name="start-mlflow-run", **MLFLOW_TASK)
def start_run(
    settings: PipelineSettings,
    arr: Arrival,
    stage: int,
    parent_version: str | None,
    retry: dict[str, Any] | None = None,
) -> str:
    params = {
        "stage": stage,
        "domain": arr.domain,
        "parent_version": parent_version or "none",
        "schedule": settings.schedule,
        "strategy": settings.strategy,
        "steps": settings.steps,
        "device": settings.device,
        "lambda_policy": "scheduled to 0 over the distillation warmup, then consolidated",
        "gates.max_ap_plus": settings.max_ap_plus,
        "gates.downstream_tolerance": settings.downstream_tolerance,
        "arrival.key": arr.key,
        **({"retry": retry} if retry else {}),  # attempt, seed and the rejected version it re-runs
    }
    return _tracker(settings).start_stage_run(
        stage=stage,
        domain=arr.domain,
        flow_run_id=flow_run.get_id(),
        params=params,
        corpus_uri=arr.batch_uri,
        corpus_etag=arr.etag,
        attempt=retry["attempt"] if retry else 1,
    )


@task(name="log-stage", **MLFLOW_TASK)
def log_stage(settings: PipelineSettings, run_id: str, out_dir: str, plot: str | None) -> None:
    record = read_stage(out_dir)
    carried = record.get("carried") or []
    tracker = _tracker(settings)
    tracker.log_stage_metrics(run_id, record, plot=plot)
    schedule = stage_spec(Schedule.from_dict(record["schedule"]), record["stage"]).to_dict()
    tracker.log_params(
        run_id,
        {
            "dims": record["dims"],
            "growth": record["growth"]["targets"],
            "beta": schedule.get("beta"),
            "distill_steps": schedule.get("distill_steps"),
            "train_tokens": record["train"]["tokens"],
            "carried": {
                c["domain"]: {"share": round(c["share"], 4), "train_blocks": c["train_blocks"]} for c in carried
            }
            or "none",
        },
    )
    if carried:
        tracker.log_metrics(run_id, {f"eval/ppl_carried/{c['domain']}": c["ppl"] for c in carried})


@task(name="register-model", **MLFLOW_TASK)
def register(
    settings: PipelineSettings,
    run_id: str,
    out_dir: str,
    parent_version: str | None,
    owed: dict[str, Any],
    retry: dict[str, Any] | None = None,
) -> str:
    record = read_stage(out_dir)
    return str(
        _tracker(settings)
        .register_stage(
            run_id,
            Path(out_dir),
            parent_version=parent_version,
            extra_tags={**carry.version_tags(owed), **carry.retry_tags(retry)},
            description=carry.description(record, owed, "promotion pending", settings.max_ap_plus),
            attempt=retry["attempt"] if retry else 1,
        )
        .version
    )


@task(name="promote", **MLFLOW_TASK)
def promote(
    settings: PipelineSettings,
    version: str,
    ap_plus: float | None,
    downstream_average: float | None,
    downstream_scores: dict[str, float],
    parent_version: str | None,
) -> dict[str, Any]:
    gates = Gates(max_ap_plus=settings.max_ap_plus, downstream_tolerance=settings.downstream_tolerance)
    decision = _tracker(settings).promote(
        version,
        gates,
        ap_plus=ap_plus,
        downstream_average=downstream_average,
        downstream_scores=downstream_scores,
        parent_version=parent_version,
    )
    return {"promoted": decision.promoted, "reasons": decision.reasons, "previous": decision.previous_champion}


# ------------------------------------------------------------------------------------------- helpers
def _tracker(settings: PipelineSettings) -> Tracker:
    return Tracker(
        tracking_uri=settings.resolved_tracking_uri(), model_name=settings.model_name, experiment=settings.experiment
    )


def _stage_dir(
    settings: PipelineSettings, arr: Arrival, parent_version: str | None, retry: dict[str, Any] | None = None
) -> Path:
    """Keyed by the arrival and the parent version, so a retried flow run finds its checkpoints and resumes,
    and never resumes checkpoints of a model grown from another parent; a stage's retry (policy `retry`) has its own."""
    parent = "root" if parent_version is None else f"v{_safe(str(parent_version))}"
    again = f"-retry{retry['attempt'] - 1}" if retry else ""
    return (
        Path(settings.work_dir) / "stages" / f"{arr.domain}-{_safe(arr.batch)}-{_safe(arr.etag)}-from-{parent}{again}"
    )


def _seen_task_names(settings: PipelineSettings, domains: list[str]) -> list[str]:
    from loire.downstream import load_catalogue

    choice = settings.downstream_tasks.strip()
    if choice == "none":
        return []
    catalogue = load_catalogue(settings.downstream_catalogue)
    if choice == "seen":
        return [name for name, spec in catalogue.items() if spec.domain in domains]
    return [n.strip() for n in choice.split(",") if n.strip()]


def _train(settings: PipelineSettings, params: dict[str, Any]) -> dict[str, Any]:
    if settings.train_mode == "in-process":
        return train_stage(**params)
    from prefect.deployments import run_deployment

    run = run_deployment(name=settings.train_deployment, parameters=params, as_subflow=True)
    if run.state is None or not run.state.is_completed():
        raise RuntimeError(f"train-stage run {run.id} ended {run.state.name if run.state else 'unknown'}")
    return run.state.result()


def _plot(out_dir: str) -> str | None:
    """PPL per domain across stages (from the stage's matrix), as a PNG beside the stage folder."""
    from loire.lifelong import plot_ppl

    record = read_stage(out_dir)
    domains = list(seen_corpora(record["lineage"]))
    stages = [{"stage": i + 1, "ppl": row} for i, row in enumerate(record["ppl_matrix"])]
    path = Path(out_dir).parent / f"{Path(out_dir).name}.ppl.png"
    try:
        plot_ppl({"strategy": record["strategy"], "domains": domains, "stages": stages}, path)
    except Exception as exc:  # a plot is nice to have, never a reason to fail a stage
        get_run_logger().warning("PPL plot failed: %s", exc)
        return None
    return str(path)


def ppl_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Stage × domain perplexity rows with AP and AP+ per stage (the Prefect table artifact).

    AP+ of stage t is ELLE's mean rise of each earlier domain's perplexity since it was trained; stage 1
    has none ("—": Prefect renders cells as markdown, where a lone "-" is an empty list). Every row
    carries every key: Prefect takes a table's columns from its first row.
    """
    frame = stage_ppl_frame(record)
    domains = [c for c in frame.columns if c not in ("domain", "AP", "AP+")]
    rows = []
    for stage, values in frame.iterrows():
        out: dict[str, Any] = {"stage": int(stage), "domain": values["domain"]}  # plain types: JSON for Prefect
        out.update({d: "" if math.isnan(values[d]) else round(float(values[d]), 2) for d in domains})
        out["AP"] = round(float(values["AP"]), 2)
        out["AP+"] = "—" if math.isnan(values["AP+"]) else round(float(values["AP+"]), 2)
        rows.append(out)
    if record["ap_plus"] is not None:  # the stage's own figure, as logged to MLflow
        rows[-1]["AP+"] = round(record["ap_plus"], 2)
    return rows


def _end_run(settings: PipelineSettings, run_id: str, *, failed: bool) -> None:
    # A failing stage does not wait out a second full retry budget just to mark its run FAILED.
    tracker = _tracker(settings)
    if failed:
        tracker.retry = RetryPolicy(attempts=2, initial_delay_s=1.0)
    try:
        tracker.end_stage_run(run_id, failed=failed)
    except Exception as exc:  # the stage's outcome stands; the run's status is cosmetic
        get_run_logger().warning("could not close MLflow run %s: %s", run_id, exc)


def _decision_line(settings: PipelineSettings, decision: dict[str, Any], retry: dict[str, Any] | None = None) -> str:
    """The decision in words; `retry`: the retry about to run after this rejection (policy `retry`)."""
    if decision["promoted"]:
        return "promoted to champion"
    failed = "; ".join(r.removeprefix("fail: ") for r in decision["reasons"] if r.startswith("fail")) or "rejected"
    if retry is not None:
        after = f"re-running the stage once with seed {retry['seed']} (policy retry)"
    elif settings.rejected_policy == "skip":
        after = "its data is dropped (policy skip)"
    else:
        after = "its data stays owed (carried by the next stage)"
    return f"not promoted ({failed}); {after}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mlflow_links(settings: PipelineSettings, version: str, run_id: str) -> tuple[str, str]:
    """Links into the MLflow UI: the configured tracking server (else `mlflow ui`'s default address) and the
    experiment the stage runs live in."""
    uri = redact(settings.resolved_tracking_uri() or "")
    base = (
        uri.rstrip("/") if uri.startswith("http") else (settings.mlflow_ui_url or "http://127.0.0.1:5000").rstrip("/")
    )
    try:
        experiment = _tracker(settings).experiment_id()
    except Exception:  # a link is cosmetic
        experiment = "0"
    return (
        f"{base}/#/models/{settings.model_name}/versions/{version}",
        f"{base}/#/experiments/{experiment}/runs/{run_id}",
    )


def _publish(
    settings: PipelineSettings,
    record: dict[str, Any],
    version: str,
    run_id: str,
    decision: dict[str, Any],
    downstream: list[dict[str, Any]],
    plot: str | None,
    owed: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
) -> None:
    owed = owed or {"covers": [], "pending": [], "carry": [], "policy": settings.rejected_policy}
    create_table_artifact(
        ppl_rows(record),
        key="lifelong-ppl",
        description=f"PPL per seen domain after each stage (stage {record['stage']})",
    )
    planned = (record.get("growth") or {}).get("decision")  # the growth planner's choice, when it decided
    if planned is not None:
        create_table_artifact(
            probes_frame(planned).to_dict(orient="records"),
            key="growth-decision",
            description=f"Growth planner, stage {record['stage']}: {planned['reason']}",
        )
    chain = _tracker(settings).lineage(version)
    model_link, run_link = _mlflow_links(settings, version, run_id)
    lines = [
        f"# Stage {record['stage']} ({record['domain']}): `{settings.model_name}` version {version}"
        + (f" (retry of v{retry['of_version']}, seed {retry['seed']})" if retry else ""),
        "",
        f"- promotion: **{'champion' if decision['promoted'] else 'not promoted'}**"
        + ("" if decision["promoted"] else f" — {'; '.join(decision['reasons'])}"),
        f"- gates checked: {'; '.join(decision['reasons'])}",
        f"- AP {record['ap']:.2f}, AP+ {_fmt(record['ap_plus'])}"
        + (f" (gate: AP+ <= {settings.max_ap_plus:g})" if settings.max_ap_plus is not None else ""),
        f"- covers (domains trained on, in arrival order): **{', '.join(owed['covers']) or '-'}**; "
        f"pending (still owed): {', '.join(owed['pending']) or 'none'}; rejected-arrival policy `{owed['policy']}`"
        + (" — **rejected arrivals are dropped**" if owed["policy"] == "skip" else ""),
        *(
            [
                "- carried into this stage: "
                + ", ".join(
                    f"{c['domain']} ({100 * c['share']:.0f}% of the training blocks)"
                    for c in record.get("carried") or []
                )
            ]
            if record.get("carried")
            else []
        ),
        f"- growth {json.dumps(record['growth']['targets'])}, max |Δlogits| {record['growth']['max_abs_logit_diff']}",
        f"- MLflow: [model version]({model_link}) · [run]({run_link})"
        + ("" if (settings.resolved_tracking_uri() or "").startswith("http") else " (start `mlflow ui` to open)"),
        "",
    ]
    frame = lineage_frame(chain)[["version", "stage", "domain", "covers", "pending", "corpus", "aliases"]]
    lines += _markdown_table(frame.assign(corpus="`" + frame["corpus"] + "`"))
    if downstream:
        lines += ["", "| task | domain | score | majority |", "|---|---|---|---|"]
        lines += [
            f"| {r['task']} | {r['domain']} | "
            + (
                f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f} | {100 * r['majority']:.1f} |"
                if r["ok"]
                else "failed | - |"
            )
            for r in downstream
        ]
    if plot is not None and os.path.getsize(plot) < 400_000:
        encoded = base64.b64encode(Path(plot).read_bytes()).decode()
        lines += ["", f"![perplexity per domain](data:image/png;base64,{encoded})"]
    create_markdown_artifact("\n".join(lines), key="lifelong-lineage", description="lineage and promotion")


# ------------------------------------------------------------------------------------------- the flow
def _markdown_table(frame: pd.DataFrame) -> list[str]:
    """The lines of a markdown table of `frame` (pandas' `to_markdown` needs tabulate, not a dependency)."""
    rows = [" | ".join(str(value) for value in row) for row in frame.itertuples(index=False)]
    return [f"| {' | '.join(frame.columns)} |", "|" + "---|" * len(frame.columns), *(f"| {row} |" for row in rows)]


@flow(name="lifelong-stage", log_prints=False)
def lifelong_stage(arrival: dict[str, Any], settings: PipelineSettings | None = None) -> dict[str, Any]:
    """Grow, distil, train, evaluate, register and (maybe) promote the stage model for one arrival.

    Long on purpose: it is the flow's script, each step one task or subflow call in the order the Prefect UI
    shows them, and the steps share the run, the stage folder and the settings; the work is in the tasks."""
    logger = get_run_logger()
    cfg = load_settings(settings)
    arr = Arrival.from_params(arrival)
    crashes = crash_guard(cfg.crash_resumes)  # bounded automatic recovery (flows.automation)
    if crashes:
        logger.warning("this run crashed %d time(s) before: resuming it (from the last checkpoint)", crashes)
    logger.info("arrival %s (domain %s, ETag %s)", arr.batch_uri, arr.domain, arr.etag)

    existing = find_existing(cfg, arr.batch_uri, arr.etag)
    if existing is not None and existing["decided"]:
        logger.info("arrival already registered as version %s: nothing to do", existing["version"])
        return {"version": existing["version"], "skipped": True}
    if existing is not None:
        logger.warning(
            "arrival registered as version %s but its promotion was never decided (an earlier attempt stopped): "
            "finishing the stage",
            existing["version"],
        )

    if cfg.base_model is not None:
        import_base_model(cfg)
    parent = resolve_parent(cfg)
    corpus_dir = fetch_corpus(cfg, arrival)
    validate_corpus(corpus_dir, arr.batch_uri)
    earlier = fetch_earlier(cfg, parent["parent_dir"])
    stage = plan_stage(resolve_schedule(cfg.schedule), cfg.strategy, parent["parent_dir"], steps=cfg.steps).stage
    owed = owed_arrivals(cfg, arr, parent, None if stage == 1 else stage - 1)
    for note in owed["notes"]:
        (logger.warning if owed["dropped"] else logger.info)(note)
    carried = fetch_carried(cfg, owed["carry"])
    inputs = dict(parent=parent, stage=stage, owed=owed, corpus_dir=corpus_dir, earlier=earlier, carried=carried)
    result = _attempt(cfg, arr, **inputs)
    retry = _retry_of(cfg, result)
    if retry is not None:  # policy retry: the rejected stage once more, same arrival and champion, another seed
        logger.warning(
            "version %s not promoted: re-running the stage once with seed %s", result["version"], retry["seed"]
        )
        first = result
        result = _attempt(cfg, arr, **inputs, retry=retry)
        result["retried"] = {k: first[k] for k in ("version", "reasons", "run_id")}
    return result


def _retry_of(cfg: PipelineSettings, result: dict[str, Any]) -> dict[str, Any] | None:
    """The retry of a first attempt that was not promoted, under the `retry` policy (None: no retry)."""
    if not should_retry(cfg.rejected_policy, result["promoted"], 1):
        return None
    seed = retry_seed(resolve_schedule(cfg.schedule).seed, 2)
    return {"attempt": 2, "seed": seed, "of_version": result["version"]}


def _attempt(
    cfg: PipelineSettings,
    arr: Arrival,
    *,
    parent: dict[str, Any],
    stage: int,
    owed: dict[str, Any],
    corpus_dir: str,
    earlier: dict[str, str],
    carried: dict[str, str],
    retry: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One attempt of the stage (`retry`: the re-run of a rejected one): its own MLflow run and stage folder; train,
    evaluate, register and promote. Long for the same reason as the flow: it is the stage's script."""
    logger = get_run_logger()
    run_id = start_run(cfg, arr, stage, parent["version"], retry)

    try:
        out_dir = _stage_dir(cfg, arr, parent["version"], retry)
        summary = _train(
            cfg,
            dict(
                domain=arr.domain,
                corpus_dir=corpus_dir,
                source_uri=arr.batch_uri,
                etag=arr.etag,
                out_dir=str(out_dir),
                parent_dir=parent["parent_dir"],
                teacher_dirs=parent["teacher_dirs"],
                earlier_corpora=earlier,
                schedule=cfg.schedule,
                strategy=cfg.strategy,
                steps=cfg.steps,
                device=cfg.device,
                nproc=cfg.nproc,
                fsdp=cfg.fsdp,
                extra_corpora=carried,
                extra_sources={c["domain"]: c["corpus_uri"] for c in owed["carry"]},
                seed=retry["seed"] if retry else None,
                mlflow_run_id=run_id,
                tracking_uri=cfg.resolved_tracking_uri(),
            ),
        )
        plot = _plot(str(out_dir))
        log_stage(cfg, run_id, str(out_dir), plot)

        record = read_stage(out_dir)
        names = _seen_task_names(cfg, list(seen_corpora(record["lineage"])))
        downstream = (
            downstream_eval(
                str(out_dir),
                names,
                data_root=cfg.downstream_data_root,
                budget=cfg.downstream_budget,
                seeds=cfg.downstream_seeds,
                catalogue=cfg.downstream_catalogue,
                mlflow_run_id=run_id,
                tracking_uri=cfg.resolved_tracking_uri(),
            )
            if names
            else []
        )
        scores = [r["mean"] for r in downstream if r["ok"]]
        average = sum(scores) / len(scores) if scores else None

        version = register(cfg, run_id, str(out_dir), parent["version"], owed, retry)
        decision = promote(
            cfg,
            version,
            summary["ap_plus"],
            average,
            {r["task"]: r["mean"] for r in downstream if r["ok"]},
            parent["version"],
        )
        next_try = None if retry else _retry_of(cfg, {"promoted": decision["promoted"], "version": version})
        line = _decision_line(cfg, decision, next_try)
        carry.describe(_tracker(cfg), version, carry.description(record, owed, line, cfg.max_ap_plus))
        if decision["promoted"]:
            logger.info("version %s is the new champion (was %s)", version, decision["previous"])
        else:
            logger.warning(
                "version %s not promoted: %s; champion stays %s",
                version,
                "; ".join(decision["reasons"]),
                decision["previous"],
            )
        _publish(cfg, record, version, run_id, decision, downstream, plot, owed, retry)
    except BaseException:
        _end_run(cfg, run_id, failed=True)
        raise
    _end_run(cfg, run_id, failed=False)
    return {
        "version": version,
        "stage": record["stage"],
        "domain": record["domain"],
        "ap": record["ap"],
        "ap_plus": record["ap_plus"],
        "downstream_average": average,
        "promoted": decision["promoted"],
        "reasons": decision["reasons"],
        "run_id": run_id,
        "skipped": False,
        "covers": owed["covers"],
        "pending": owed["pending"],
        "carried": [c["domain"] for c in owed["carry"]],
        "gates": decision["reasons"],
        "attempt": retry["attempt"] if retry else 1,
        "seed": record["schedule"]["seed"],
    }
