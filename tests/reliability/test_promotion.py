"""Promotion safety: `champion` moves only to a version whose artifacts are complete and whose gates passed.

- A reader thread polls `models:/<name>@champion` (resolve the alias, download the version with
  `Tracker.download_stage`, `loire.io.load_model`, a forward pass) for the whole test while stages run:
  before the first promotion it may only see "no champion yet"; after it, every read loads a complete model.
  Meanwhile a stage runs in the test process with its weight upload silently lost (the artifact store
  answers the PUT of every *.safetensors file but keeps nothing): that version is never aliased `champion`
  (nor `candidate`), it does not remain in the registry, and a later run of the same arrival, served as
  usual, registers a complete version that becomes the champion.
- A stage whose evaluation fails a gate is registered but not promoted, and a redelivery of that arrival
  does not try again (the decision is recorded on the version).
- The promotion is conditional on the lineage: a stage grown from a version that is no longer the champion
  is not promoted.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

from flows.landing import list_arrivals, s3_client
from flows.stage import lifelong_stage
from flows.tracking import CANDIDATE, PROMOTION_TAG, Gates, RetryPolicy, Tracker
from loire.io import load_model
from tests.flows.pipeline_harness import Pipeline, pipeline_fixture

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

pipeline = pipeline_fixture(settings={"downstream_tasks": "none"})


class ChampionReader(threading.Thread):
    """Loads whatever `champion` points at, over and over, and records what happened."""

    def __init__(self, uri: str, model_name: str, root: Path) -> None:
        super().__init__(daemon=True)
        self.tracker = Tracker(tracking_uri=uri, model_name=model_name, retry=RetryPolicy(attempts=3))
        self.root = root
        self.stopped = threading.Event()
        self.no_champion = 0  # reads before the first promotion
        self.loaded: list[str] = []  # the version of every successful read
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopped.is_set():
            self.read()
            self.stopped.wait(0.2)

    def read(self) -> None:
        try:
            champion = self.tracker.champion()
            if champion is None:
                if self.loaded:
                    self.errors.append("the champion disappeared")
                self.no_champion += 1
                return
            version = str(champion.version)
            folder = self.tracker.download_stage(version, self.root / f"v{version}")
            model = load_model(folder)
            with torch.no_grad():
                logits = model(input_ids=torch.arange(8).unsqueeze(0)).logits
            if not torch.isfinite(logits).all():
                raise ValueError("non-finite logits")
            self.loaded.append(version)
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=60)
        self.read()  # one last read after everything settled


def _arrival(pipeline: Pipeline, domain: str) -> dict[str, Any]:
    arrivals = list_arrivals(pipeline.landing, s3=s3_client(pipeline.endpoint))
    return next(a for a in arrivals if a.domain == domain).to_params()


def _aliases(pipeline: Pipeline) -> dict[str, str]:
    model = pipeline.tracker.client.get_registered_model(pipeline.model_name)
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


@pytest.mark.slow  # ~1-1.5 min of concurrent readers; the gate tests below stay in make test
def test_champion_reads_always_load_and_a_lost_upload_is_never_promoted(
    pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reader = ChampionReader(pipeline.env["MLFLOW_TRACKING_URI"], pipeline.model_name, tmp_path / "reader")
    reader.start()
    try:
        pipeline.upload("WB", "2026-01")
        (wb,) = pipeline.wait(pipeline.watch())
        assert wb.state.is_completed(), pipeline.describe(wb)
        (v1,) = pipeline.versions()
        pipeline.wait_until(lambda: str(v1.version) in reader.loaded, 60, "the reader to load the first champion")

        # Stage NEWS in this process, with the weights' upload lost on the way.
        pipeline.upload("NEWS", "2026-02")
        real = HttpArtifactRepository.log_artifact

        def lossy(self: Any, local_file: str, artifact_path: str | None = None) -> None:
            if not str(local_file).endswith(".safetensors"):
                real(self, local_file, artifact_path)

        monkeypatch.setattr(HttpArtifactRepository, "log_artifact", lossy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", pipeline.endpoint)
        try:
            lifelong_stage(_arrival(pipeline, "NEWS"), pipeline.settings())
            outcome = "the stage completed"
        except RuntimeError as exc:
            outcome = str(exc)
        monkeypatch.setattr(HttpArtifactRepository, "log_artifact", real)
        reads = len(reader.loaded) + len(reader.errors)
        pipeline.wait_until(lambda: len(reader.loaded) + len(reader.errors) > reads + 1, 60, "two more reads")
        assert not reader.errors, reader.errors[:3]  # whatever happened, the champion always loaded
        assert "incomplete artifacts" in outcome, outcome
        assert _aliases(pipeline) == {"champion": str(v1.version), CANDIDATE: str(v1.version)}
        assert pipeline.versions(pipeline.batch_uri("NEWS", "2026-02")) == []  # not left behind

        # The same arrival, served as usual (its notification is still queued): one complete version, promoted.
        (news,) = pipeline.wait(pipeline.watch())
        assert news.state.is_completed(), pipeline.describe(news)
        (v2,) = pipeline.versions(pipeline.batch_uri("NEWS", "2026-02"))
        assert pipeline.champion() == str(v2.version) and v2.tags["loire.parent_version"] == str(v1.version)
        pipeline.wait_until(lambda: str(v2.version) in reader.loaded, 60, "the reader to load the new champion")
    finally:
        reader.stop()
    assert not reader.errors, reader.errors[:5]
    assert reader.loaded and set(reader.loaded) == {str(v1.version), str(v2.version)}
    first = reader.loaded.index(str(v2.version))
    assert all(v == str(v2.version) for v in reader.loaded[first:])  # it never went back


def test_stage_failing_a_gate_is_registered_not_promoted_and_not_retried(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", pipeline.endpoint)
    if pipeline.champion() is None:  # run alone: a first stage to be the champion
        pipeline.upload("WB", "2026-01")
        assert all(r.state.is_completed() for r in pipeline.wait(pipeline.watch()))
    champion = pipeline.champion()
    pipeline.upload("REV", "2026-03")
    rev = _arrival(pipeline, "REV")
    result = lifelong_stage(rev, pipeline.settings(max_ap_plus=-1e9))  # no AP+ can pass this gate
    assert not result["promoted"] and any(r.startswith("fail: AP+") for r in result["reasons"]), result
    assert pipeline.champion() == champion
    (version,) = pipeline.versions(pipeline.batch_uri("REV", "2026-03"))
    assert version.tags[PROMOTION_TAG].startswith("rejected: fail: AP+")
    assert _aliases(pipeline) == {"champion": champion, CANDIDATE: str(version.version)}

    again = lifelong_stage(rev, pipeline.settings())  # redelivered, with gates it would pass: decided already
    assert again == {"version": str(version.version), "skipped": True}
    assert pipeline.champion() == champion


def test_promotion_is_conditional_on_the_champion_being_the_parent(pipeline: Pipeline) -> None:
    """The gate `promote(parent_version=...)` adds: what a stage resumed after the champion moved runs into."""
    versions = pipeline.versions()
    latest = versions[-1]
    parent = latest.tags["loire.parent_version"]
    if parent != pipeline.champion() or latest.tags.get(PROMOTION_TAG, "").startswith("promoted"):
        pytest.skip("needs the rejected stage of the test above, grown from the champion")
    gates = Gates(max_ap_plus=None)
    # As if this stage had started as a first stage (no champion yet) and another first stage had been
    # promoted while it was crashed: not promoted.
    moved = pipeline.tracker.promote(
        str(latest.version), gates, ap_plus=None, downstream_average=None, parent_version=None
    )
    assert not moved.promoted and any("champion moved" in r for r in moved.reasons), moved
    assert pipeline.champion() == parent
    # Grown from the champion (the truth), and the gates pass: promoted.
    kept = pipeline.tracker.promote(
        str(latest.version), gates, ap_plus=None, downstream_average=None, parent_version=parent
    )
    assert kept.promoted and kept.previous_champion == parent and pipeline.champion() == str(latest.version)
