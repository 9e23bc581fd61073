"""flows.tracking against a real `mlflow server`: registry, idempotency, promotion, download, lineage, outage."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException, RestException
from rich.console import Console

import flows.tracking
import loire
from flows.tracking import (
    CANDIDATE,
    CHAMPION,
    Gates,
    RetryPolicy,
    Tracker,
    call_with_retries,
    dataset_digest,
    flatten_params,
    is_retryable,
)
from loire.cli import render_lineage
from loire.grow import grow
from loire.io import load_model
from loire.lifelong import MOMENTS_FILE, read_stage
from loire.moments import load_moments, save_moments
from loire.tokenizer import load_tokenizer, train_tokenizer
from tests.conftest import tiny_lm
from tests.flows.servers_mlflow import MlflowServer

pytestmark = pytest.mark.integration

FAST = RetryPolicy(attempts=4, initial_delay_s=0.05, max_delay_s=0.2)
# Rides out a server restart (~10-20 s on two busy cores) without slowing the other tests.
OUTAGE = RetryPolicy(attempts=60, initial_delay_s=0.25, max_delay_s=1.0)
ETAG = '"0123456789abcdef0123456789abcdef"'  # S3 ETags come quoted


# ------------------------------------------------------------------------------- stage folders
def _tokenizer() -> Any:
    words = ["river", "model", "grows", "stage", "domain", "token", "learn", "forget", "data", "news"]
    texts = [" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) for i in range(40)]
    return train_tokenizer(texts, vocab_size=300)


def _tiny_model(tokenizer: Any) -> loire.LoireForCausalLM:
    dims = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8, intermediate_size=32)
    return tiny_lm(tokenizer, max_position_embeddings=64, **dims)


def _moments(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {
        n: {
            "exp_avg": torch.randn(p.shape, generator=g),
            "exp_avg_sq": torch.rand(p.shape, generator=g),
            "step": torch.tensor(4.0),
        }
        for n, p in model.named_parameters()
    }


def _record(stage: int, domain: str, folder: Path, corpus_uri: str, parent: dict[str, Any] | None) -> dict[str, Any]:
    """A stage.json as `run_stage` writes it (numbers made up)."""
    lineage = [
        *(parent["lineage"] if parent else []),
        {"stage": stage, "domain": domain, "model_dir": str(folder), "corpus_uri": corpus_uri},
    ]
    ppl = {e["domain"]: 100.0 + 10 * i for i, e in enumerate(lineage)}
    return {
        "format": 1,
        "stage": stage,
        "domain": domain,
        "strategy": "loire",
        "schedule": {"preset": "gpt-tiny"},
        "corpus": {"uri": corpus_uri, "etag": ETAG, "digest": "d" * 16, "files": ["part.jsonl"]},
        "parent": None if parent is None else {"dir": parent["lineage"][-1]["model_dir"], "stage": stage - 1},
        "lineage": lineage,
        "growth": {
            "targets": {"hidden": 24} if parent else {},
            "operator": "exact",
            "max_abs_logit_diff": 1e-7 if parent else None,
        },
        "dims": {"hidden_size": 24 if parent else 16},
        "distill": None,
        "ppl": ppl,
        "ppl_matrix": [*(parent["ppl_matrix"] if parent else []), ppl],
        "ap": 105.0 * stage,
        "ap_plus": 12.5 if parent else None,
        "flops": {"stage": 1e9, "teachers": 0.0, "cumulative": 1e9 * stage},
        "wall_time_s": 3.0,
        "train": {"steps": 4, "tokens": 512, "final_loss": 5.5, "history": []},
    }


def _write_stage(model: loire.LoireForCausalLM, tokenizer: Any, record: dict[str, Any], folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "stage.json").write_text(json.dumps(record, indent=2))
    return folder


# ------------------------------------------------------------------------------------ fixtures
@dataclass
class Registered:
    tracker: Tracker
    dirs: list[Path]
    runs: list[str]
    versions: list[ModelVersion]
    uris: list[str]
    metrics: Any  # the on_log hook of stage 1


@pytest.fixture(scope="module")
def registered(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """Two stages (WB, then NEWS grown from it) tracked, measured and registered on a fresh model name."""
    root = tmp_path_factory.mktemp("stages")
    tag = uuid.uuid4().hex[:8]
    tracker = Tracker(mlflow_server.uri, model_name=f"loire-test-{tag}", experiment=f"loire-test-{tag}", retry=FAST)
    tokenizer = _tokenizer()
    first = _tiny_model(tokenizer)
    models = [first, grow(first, hidden=24, seed=1).eval()]
    reg = Registered(tracker, [], [], [], [], None)
    parent_record = None
    for stage, (domain, model) in enumerate(zip(["WB", "NEWS"], models, strict=True), start=1):
        uri = f"s3://landing/corpora/{domain.lower()}/batch-{tag}"
        folder = root / f"stage-{stage}-{domain}"
        record = _record(stage, domain, folder, uri, parent_record)
        _write_stage(model, tokenizer, record, folder)
        if stage == 2:  # as a strategy that carries AdamW's state leaves it (loire.moments)
            save_moments(_moments(model), folder / MOMENTS_FILE)
        params = {"schedule": {"preset": "gpt-tiny", "stages": [1, 2]}, "steps": 4, "note": "x" * 7000}
        run_id = tracker.start_stage_run(
            stage=stage,
            domain=domain,
            flow_run_id=f"flow-{tag}-{stage}",
            params=params,
            corpus_uri=uri,
            corpus_etag=ETAG,
        )
        hook = tracker.on_log(run_id)
        for step in (1, 2, 3):
            hook({"train/loss": 6.0 - step, "train/lr": 1e-3}, step)
        tracker.log_stage_metrics(run_id, record)
        parent = reg.versions[-1].version if reg.versions else None
        reg.versions.append(tracker.register_stage(run_id, folder, parent_version=parent))
        reg.dirs.append(folder)
        reg.runs.append(run_id)
        reg.uris.append(uri)
        reg.metrics = hook if stage == 1 else reg.metrics
        parent_record = record
    return reg


# --------------------------------------------------------------------------------------- tests
def test_two_stages_registered_with_parent_tags_and_lineage(registered: Registered) -> None:
    tracker, (v1, v2) = registered.tracker, registered.versions
    assert (v1.version, v2.version) == ("1", "2") and v1.status == v2.status == "READY"
    assert v1.tags["loire.parent_version"] == "none" and v2.tags["loire.parent_version"] == "1"
    assert v2.tags["loire.stage"] == "2" and v2.tags["loire.domain"] == "NEWS"
    assert v2.tags["loire.corpus_uri"] == registered.uris[1] and v2.tags["loire.corpus_etag"] == ETAG
    assert json.loads(v2.tags["loire.growth"]) == {
        "targets": {"hidden": 24},
        "operator": "exact",
        "max_abs_logit_diff": 1e-7,
    }
    assert tracker.resolve(CANDIDATE).version == "2"

    chain = tracker.lineage("2")
    assert [(e["version"], e["stage"], e["domain"]) for e in chain] == [("1", 1, "WB"), ("2", 2, "NEWS")]
    assert chain[1]["etag"] == ETAG and chain[1]["run_id"] == registered.runs[1]
    assert chain[1]["ap"] == 210.0 and chain[1]["ap_plus"] == 12.5 and chain[0]["ap_plus"] is None
    assert CANDIDATE in chain[1]["aliases"]
    console = Console(record=True, width=200)
    console.print(render_lineage(chain))
    assert "NEWS" in console.export_text()


def test_run_tags_params_dataset_and_stage_metrics(registered: Registered) -> None:
    client, run_id = registered.tracker.client, registered.runs[1]
    run = client.get_run(run_id)
    assert run.info.run_name == "stage-2-NEWS"
    assert run.data.tags["loire.stage"] == "2" and run.data.tags["loire.corpus_etag"] == ETAG
    assert run.data.tags["prefect.flow_run_id"].startswith("flow-")
    assert run.data.params["schedule/preset"] == "gpt-tiny" and run.data.params["schedule/stages"] == "[1, 2]"
    assert len(run.data.params["note"]) == 6000  # truncated to MLflow's limit
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == dataset_digest(ETAG) == ETAG.strip('"')
    assert registered.uris[1] in dataset_input.dataset.source and dataset_input.dataset.source_type == "s3"
    assert {(t.key, t.value) for t in dataset_input.tags} == {("mlflow.data.context", "training")}
    metrics = run.data.metrics
    assert metrics["eval/ppl/WB"] == 100.0 and metrics["eval/ppl/NEWS"] == 110.0 and metrics["eval/ap_plus"] == 12.5
    assert metrics["cost/flops_cumulative"] == 2e9 and metrics["grow/max_abs_logit_diff"] == 1e-7
    assert "eval/ap_plus" not in client.get_run(registered.runs[0]).data.metrics  # None at stage 1
    matrix = json.loads(Path(client.download_artifacts(run_id, "eval/ppl_matrix.json")).read_text())
    assert matrix["domains"] == ["WB", "NEWS"] and len(matrix["rows"]) == 2
    again = registered.tracker.start_stage_run(
        stage=2,
        domain="NEWS",
        flow_run_id=run.data.tags["prefect.flow_run_id"],
        params={"steps": 4},
        corpus_uri=registered.uris[1],
        corpus_etag=ETAG,
    )
    assert again == run_id  # a retried flow run continues its stage's run
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 1


def test_a_planned_growth_is_tagged_and_its_probes_logged_as_a_table(registered: Registered, tmp_path: Path) -> None:
    tracker = registered.tracker
    record = _record(1, "WB", tmp_path / "s", "s3://landing/corpora/wb/planned", None)
    probe = {"parameters": 10, "cost_ratio": 1.0, "steps": 8, "flops": 1e6, "loss_start": 6.0, "loss": 5.0}
    record["growth"]["decision"] = {
        "chosen": "hidden=32",
        "targets": {"hidden": 32},
        "reason": "grow: best growth hidden=32 ...",
        "probes": [
            {**probe, "name": "none", "gain": 0.0, "gain_se": 0.0},
            {**probe, "name": "hidden=32", "cost_ratio": 1.9, "steps": 4, "loss": 4.8, "gain": 0.2, "gain_se": 0.05},
        ],
    }
    run_id = tracker.start_stage_run(
        stage=1,
        domain="WB",
        flow_run_id=None,
        params={},
        corpus_uri="s3://landing/corpora/wb/planned",
        corpus_etag=ETAG,
    )
    tracker.log_stage_metrics(run_id, record)
    run = tracker.client.get_run(run_id)
    assert run.data.tags["loire.growth.decision"] == "hidden=32"
    table = json.loads(Path(tracker.client.download_artifacts(run_id, "growth/decision_table.json")).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [(r["name"], r["chosen"]) for r in rows] == [("none", False), ("hidden=32", True)]


def test_on_log_logs_batched_metrics_at_their_steps(registered: Registered) -> None:
    history = registered.tracker.client.get_metric_history(registered.runs[0], "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 5.0), (2, 4.0), (3, 3.0)]
    assert registered.metrics.pending == 0


def test_on_log_never_raises_and_keeps_unsent_metrics() -> None:
    with closed_port() as port:
        hook = Tracker(f"http://127.0.0.1:{port}", retry=FAST).on_log("no-such-run")
        hook({"train/loss": 1.0, "train/lr": 0.1}, 1)
        hook({"train/loss": 0.5}, 2)
    assert hook.pending == 3


def test_reregistering_an_arrival_returns_the_same_version(registered: Registered) -> None:
    tracker = registered.tracker
    again = tracker.register_stage(registered.runs[1], registered.dirs[1], parent_version="1")
    assert again.version == "2"
    assert tracker.find_arrival(registered.uris[1], ETAG).version == "2"
    assert tracker.find_arrival(registered.uris[1], '"another-etag"') is None
    names = tracker.client.search_model_versions(f"name = '{tracker.model_name}'")
    assert sorted(v.version for v in names) == ["1", "2"]


def test_promotion_gates_and_champion(registered: Registered, mlflow_server: MlflowServer) -> None:
    tracker = registered.tracker
    assert tracker.champion() is None
    assert Tracker(mlflow_server.uri, model_name=f"never-{uuid.uuid4().hex[:6]}").champion() is None
    first = tracker.log_downstream(
        registered.runs[0],
        [{"task": "chemprot", "mean": 0.6, "std": 0.01, "ok": True}, {"task": "acl", "error": "x", "ok": False}],
    )
    assert first == pytest.approx(0.6)
    decision = tracker.promote("1", Gates(), ap_plus=None, downstream_average=first)
    assert decision.promoted and decision.previous_champion is None
    assert tracker.champion().version == "1"
    assert tracker.client.get_model_version(tracker.model_name, "1").tags["loire.promoted"] == "true"

    rejected = tracker.promote("2", Gates(max_ap_plus=10.0), ap_plus=12.5, downstream_average=0.5)
    assert not rejected.promoted and rejected.previous_champion == "1"
    assert sum(r.startswith("fail:") for r in rejected.reasons) == 2  # AP+ and downstream both fail
    assert tracker.champion().version == "1"
    tag = tracker.client.get_model_version(tracker.model_name, "2").tags["loire.promotion"]
    assert tag.startswith("rejected: ") and "AP+ 12.5 > 10" in tag and "loire.promoted" not in tag

    # The gate compares the tasks both versions were scored on: a new domain's harder task (imdb) pulls the
    # plain average to 0.345, but on chemprot 0.59 is within the 0.02 tolerance of the champion's 0.6.
    scores = {"chemprot": 0.59, "imdb": 0.1}
    accepted = tracker.promote("2", Gates(), ap_plus=12.5, downstream_average=0.345, downstream_scores=scores)
    assert accepted.promoted and accepted.previous_champion == "1"
    assert "pass: downstream average over the 1 task(s) both were scored on 0.59 >= champion 0.6" in accepted.reasons[1]
    assert tracker.champion().version == "2" and tracker.resolve(CHAMPION).version == "2"
    assert [e["version"] for e in tracker.lineage()] == ["1", "2"]


def test_download_stage_round_trip(registered: Registered, tmp_path: Path) -> None:
    dest = registered.tracker.download_stage("2", tmp_path / "parent")
    original, copy = load_model(registered.dirs[1]), load_model(dest)
    ids = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(ids).logits, copy(ids).logits)
    text = "river model grows <NEWS> news data"
    assert load_tokenizer(dest)(text)["input_ids"] == load_tokenizer(registered.dirs[1])(text)["input_ids"]
    record = read_stage(dest)  # usable as run_stage(parent=dest)
    moments = load_moments(dest / MOMENTS_FILE)  # the carried optimizer state travels with the model
    expected = load_moments(registered.dirs[1] / MOMENTS_FILE)
    assert set(moments) == set(expected) and all(
        torch.equal(moments[n]["exp_avg"], expected[n]["exp_avg"]) for n in moments
    )
    assert record["stage"] == 2 and record["lineage"][-1]["model_dir"] == str(dest.resolve())
    marker = (dest / "registry.json").stat().st_mtime_ns
    assert registered.tracker.download_stage("2", dest) == dest  # complete: reused, not downloaded again
    assert (dest / "registry.json").stat().st_mtime_ns == marker
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_model_without_a_pipeline_is_registered_as_its_stage_folder(
    registered: Registered, mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No transformers pipeline for the task: the stage folder (tokenizer included) is what gets registered."""
    monkeypatch.setitem(flows.tracking._TASKS, "LoireForCausalLM", "no-such-task")
    tracker = Tracker(mlflow_server.uri, model_name=f"loire-folder-{uuid.uuid4().hex[:6]}", retry=FAST)
    run_id = tracker.start_stage_run(
        stage=1, domain="WB", flow_run_id=None, params={}, corpus_uri="file:///corpora/wb", corpus_etag="d41d8cd9"
    )
    version = tracker.register_stage(run_id, registered.dirs[0], parent_version=None)
    assert tracker.promote(version.version, Gates(), ap_plus=None, downstream_average=None).promoted
    dest = tracker.download_stage(CHAMPION, tmp_path / "stage")
    assert (dest / "tokenizer.json").is_file() and read_stage(dest)["stage"] == 1
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(load_model(registered.dirs[0])(ids).logits, load_model(dest)(ids).logits)


def test_retry_helper_retries_transient_errors_only() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise MlflowException("API request to http://x/api failed with exception Connection refused")
        return "ok"

    assert call_with_retries(flaky, what="flaky", policy=FAST, sleep=lambda _: None) == "ok" and len(calls) == 3

    def invalid() -> None:
        calls.append(1)
        raise RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "bad"})

    calls.clear()
    with pytest.raises(RestException):
        call_with_retries(invalid, what="invalid", policy=FAST, sleep=lambda _: None)
    assert len(calls) == 1
    assert is_retryable(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "503"}))
    assert is_retryable(requests.ConnectionError("refused"))
    assert not is_retryable(MlflowException("Both `artifact_path` and `name` were given"))
    assert not is_retryable(ValueError("nope"))
    assert list(RetryPolicy(attempts=5, initial_delay_s=1, max_delay_s=3).delays()) == [1, 2, 3, 3]
    assert flatten_params({"a": {"b": 1, "c d": None}, "e?": [1]}) == {"a/b": "1", "a/c d": "None", "e_": "[1]"}


def test_outage_of_the_server_is_ridden_out(registered: Registered, mlflow_server: MlflowServer) -> None:
    """Stop the server, restart it 3 s later in a thread: a logging call made meanwhile completes."""
    tracker = Tracker(mlflow_server.uri, model_name=registered.tracker.model_name, retry=OUTAGE)
    mlflow_server.stop()
    restart = threading.Thread(target=lambda: (time.sleep(3), mlflow_server.start()))
    restart.start()
    try:
        started = time.monotonic()
        tracker.log_metrics(registered.runs[1], {"outage/ok": 1.0})
        waited = time.monotonic() - started
    finally:
        restart.join()
    assert waited > 2.5  # it really waited for the restart
    assert tracker.client.get_run(registered.runs[1]).data.metrics["outage/ok"] == 1.0
    assert tracker.resolve(CANDIDATE).version == "2"  # the registry survived the restart (same database)


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port with nothing listening on it (bound, never listened)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_retried_stage_is_its_own_run_and_version_of_the_same_arrival(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """Policy retry (flows.stage): attempt 2 of an arrival gets its own run and version beside attempt 1, both found
    again by a resumed flow run, and a twice-rejected arrival is owed once (loire.arrivals)."""
    from flows.carry import registered as registered_versions
    from flows.carry import retry_tags
    from loire.arrivals import owed

    tag = uuid.uuid4().hex[:8]
    tracker = Tracker(mlflow_server.uri, model_name=f"loire-retry-{tag}", experiment=f"loire-retry-{tag}", retry=FAST)
    tokenizer, uri = _tokenizer(), f"s3://landing/corpora/rev/batch-{tag}"
    model = _tiny_model(tokenizer)
    runs, versions = [], []
    for attempt in (1, 2):
        folder = tmp_path / f"attempt-{attempt}"
        _write_stage(model, tokenizer, _record(1, "REV", folder, uri, None), folder)
        start = dict(stage=1, domain="REV", flow_run_id=f"flow-{tag}", params={}, corpus_uri=uri, corpus_etag=ETAG)
        runs.append(tracker.start_stage_run(**start, attempt=attempt))
        retry = {"attempt": 2, "seed": 1, "of_version": "1"} if attempt == 2 else None
        version = tracker.register_stage(
            runs[-1], folder, parent_version=None, attempt=attempt, extra_tags=retry_tags(retry)
        )
        versions.append(version)
        assert tracker.start_stage_run(**start, attempt=attempt) == runs[-1]  # a resumed flow run finds its run
    assert runs[0] != runs[1] and [v.version for v in versions] == ["1", "2"]
    assert "loire.attempt" not in versions[0].tags and versions[1].tags["loire.attempt"] == "2"
    assert versions[1].tags["loire.retry_of"] == "1" and versions[1].tags["loire.seed"] == "1"
    assert tracker.find_arrival(uri, ETAG).version == "1" and tracker.find_arrival(uri, ETAG, 2).version == "2"
    assert tracker.register_stage(runs[1], tmp_path / "attempt-2", parent_version=None, attempt=2).version == "2"
    for version in ("1", "2"):
        assert not tracker.promote(version, Gates(max_ap_plus=1.0), ap_plus=12.5, downstream_average=None).promoted
    (debt,) = owed(registered_versions(tracker), [], "k-next")
    assert debt.version == 1 and debt.domain == "REV"
