"""MLflow model registry of lifelong stages: registration, completeness, promotion, download and lineage.

One registered version of `model_name` per corpus arrival. A version carries its arrival (`loire.corpus_uri` +
`loire.corpus_etag`), its parent version and the growth it went through; the alias `candidate` points at the
newest registered stage and `champion` at the promoted one. Setting `champion` is the single commit point of a
promotion; the gates themselves are the library's (`loire.promotion`).

Registration commits in this order: upload the model's artifacts (a logged model), create the version,
check that every artifact is there, tag the version `loire.artifacts=complete`, move `candidate`.
`find_arrival` counts only complete versions, so a version left behind by an interrupted registration
never makes its arrival look done; the next registration of that arrival deletes it. `champion` moves
only in `promote`, after the same completeness check and the gates.

A model that no transformers pipeline can be built for is logged as its stage folder (`_log_transformers`).
The retry budget is the tracker's one `RetryPolicy` (`RetryPolicy.from_env`: `LOIRE_MLFLOW_RETRY_ATTEMPTS`,
`LOIRE_MLFLOW_RETRY_MAX_DELAY_S`); the stage flow adds no retries of its own on top of it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import LoggedModel, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

import loire
from flows.retry import RetryPolicy, is_transient, short
from flows.runs import ATTEMPT_TAG, RunLog, _error_code, _literal, _tag, arrival_key, attempt_of
from loire.io import MODEL_INIT_LOCK, load_model, publish_dir
from loire.lifelong import MOMENTS_FILE, STAGE_FILE, learnt_domains, read_stage
from loire.promotion import UNCHECKED, Decision, Gates, common_averages, decide
from loire.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
ARTIFACTS_TAG = "loire.artifacts"  # "complete" once register_stage has checked every artifact of the version
BASE_TAG = "loire.base"  # on the version of an imported base model (stage 0): where it came from
PROMOTION_TAG = "loire.promotion"  # "promoted" or "rejected: <reasons>": the stage's decision was made
MODEL_ARTIFACT = "model"
REGISTRY_FILE = "registry.json"  # written into a downloaded stage folder: which version it is
# Top-level artifacts a registered version must hold before it may become champion.
REQUIRED_ARTIFACTS = frozenset({"MLmodel", "model", "components", STAGE_FILE})
FOLDER_ARTIFACTS = frozenset({"config.json", "tokenizer.json", STAGE_FILE})  # a stage folder logged as is
_TASKS = {
    "LoireForCausalLM": "text-generation",
    "LoireForMaskedLM": "fill-mask",
    "LoireForSequenceClassification": "text-classification",
    "LoireModel": "feature-extraction",
}
_GLOBAL_URI_LOCK = threading.Lock()


def _model_id(version: ModelVersion) -> str:
    """The logged model behind a registered version (its source is `models:/<model_id>`)."""
    if version.model_id:
        return version.model_id
    if version.source and version.source.startswith("models:/m-"):
        return version.source.removeprefix("models:/")
    raise ValueError(f"version {version.version}: source {version.source!r} is not a logged model")


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri` for the duration (flavor `log_model` reads only
    the global one); serialised so that two trackers in different threads do not interleave."""
    with _GLOBAL_URI_LOCK:
        before = mlflow.get_tracking_uri()
        if before == uri:
            yield
            return
        env_before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(before)
            if env_before is None:  # set_tracking_uri exports the URI; keep the environment as it was
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env_before


def _pip_requirements() -> list[str]:
    """Pinned explicitly: MLflow's inference of requirements loads the model in a subprocess (slow) and
    cannot import the custom `loire` model type there."""
    import tokenizers
    import torch
    import transformers

    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"tokenizers=={tokenizers.__version__}",
        "safetensors",
    ]


@dataclass(frozen=True)
class _Target:
    """Where a stage's model is logged: its run, the run's experiment, tags of the logged model."""

    run_id: str
    experiment_id: str
    tags: dict[str, str]


# -------------------------------------------------------------------------------------- tracker
class Tracker(RunLog):
    """Runs, metrics, registry and promotion of lifelong stages on one MLflow tracking server."""

    # --------------------------------------------------------------------------- registry
    def find_arrival(self, corpus_uri: str, etag: str, attempt: int = 1) -> ModelVersion | None:
        """The complete registered version of this corpus arrival's `attempt` (1: the first stage of the arrival,
        2: its retry under the `retry` policy); the oldest when there are several.

        Complete: READY, and tagged `loire.artifacts=complete` by `register_stage` or, for a version
        without the tag (registered by an older release, or interrupted just before tagging), holding
        every artifact. A version left behind by an interrupted registration does not count."""
        for version in self._arrival_versions(corpus_uri, etag, attempt):
            if version.status == "READY" and self._is_complete(version):
                return version
        return None

    def is_decided(self, version: ModelVersion) -> bool:
        """Whether the stage of `version` reached its promotion decision (promoted or rejected)."""
        return bool(version.tags.get(PROMOTION_TAG)) or CHAMPION in (version.aliases or [])

    def _arrival_versions(self, corpus_uri: str, etag: str, attempt: int = 1) -> list[ModelVersion]:
        """Every version of this arrival's `attempt`, oldest first, whatever its state."""
        query = (
            f"name = {_literal(self.model_name)} AND tags.`loire.arrival` = {_literal(arrival_key(corpus_uri, etag))}"
        )
        found = self._call("search_model_versions", self.client.search_model_versions, query)
        same = [
            v
            for v in found
            if v.tags.get("loire.corpus_uri") == _tag(corpus_uri)
            and v.tags.get("loire.corpus_etag") == _tag(etag)
            and attempt_of(v.tags) == attempt
        ]
        return sorted(same, key=lambda v: int(v.version))

    def _is_complete(self, version: ModelVersion) -> bool:
        if version.tags.get(ARTIFACTS_TAG) == "complete":
            return True
        try:
            self._check_artifacts(version)
        except MlflowException as exc:  # e.g. its logged model was deleted
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.info("%s v%s does not count: %s", self.model_name, version.version, short(exc))
            return False
        except (RuntimeError, ValueError) as exc:
            logger.info("%s v%s does not count: %s", self.model_name, version.version, exc)
            return False
        return True

    def _drop_incomplete(self, corpus_uri: str, etag: str, attempt: int = 1) -> None:
        """Delete the versions of this arrival's attempt that are not complete: what interrupted registrations left."""
        for version in self._arrival_versions(corpus_uri, etag, attempt):
            if version.status == "READY" and self._is_complete(version):
                continue
            logger.warning(
                "deleting %s v%s (%s): an incomplete registration of arrival %s",
                self.model_name,
                version.version,
                version.status,
                corpus_uri,
            )
            self._delete_version(version.version)

    def _delete_version(self, version: str) -> None:
        try:
            self._call("delete_model_version", self.client.delete_model_version, self.model_name, str(version))
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                raise

    def register_stage(
        self,
        run_id: str,
        stage_dir: str | os.PathLike[str],
        *,
        parent_version: str | None,
        extra_tags: Mapping[str, str] | None = None,
        description: str | None = None,
        attempt: int = 1,
    ) -> ModelVersion:
        """Log the stage folder as a transformers model (+ tokenizer + stage.json) and register it as a new
        version of `model_name` with alias `candidate`; an arrival already registered returns its version.
        `extra_tags` (e.g. the pipeline's `loire.covers` / `loire.pending`) override the default tags. `attempt` 2
        registers the retry of an arrival's stage (tag `loire.attempt`) beside its first version."""
        record = read_stage(stage_dir)
        run = self._call("get_run", self.client.get_run, run_id)
        corpus_uri, etag = _arrival_of(run, record)
        existing = self.find_arrival(corpus_uri, etag, attempt)
        if existing is not None:
            logger.info(
                "arrival %s (%s) is already version %s: not registering again", corpus_uri, etag, existing.version
            )
            self._point_candidate(existing.version)
            return existing
        if parent_version is not None:
            self._version(parent_version)  # fail before uploading anything when the parent is unknown
        self._drop_incomplete(corpus_uri, etag, attempt)
        model_id = self._log_stage_model(run, Path(stage_dir), record)
        tags = {**self._version_tags(record, corpus_uri, etag, parent_version), **(extra_tags or {})}
        if attempt > 1:
            tags[ATTEMPT_TAG] = str(attempt)
        # A database registry store resolves `models:/<id>` through MLflow's process-wide tracking URI.
        with _global_tracking_uri(self.tracking_uri):
            version = self._call(
                "create_model_version",
                self.client.create_model_version,
                self.model_name,
                source=f"models:/{model_id}",
                run_id=run_id,
                tags=tags,
                description=description,
                model_id=model_id,
                await_creation_for=0,
            )
        ready = self._wait_ready(version.version)
        try:
            self._check_artifacts(ready)
        except RuntimeError:
            logger.error("%s v%s: artifacts incomplete after upload; deleting it", self.model_name, ready.version)
            self._delete_version(ready.version)
            raise
        self._set_tag(ready.version, ARTIFACTS_TAG, "complete")  # from here on the arrival counts as registered
        version = self._keep_first_of_arrival(self._version(ready.version), corpus_uri, etag, attempt)
        self._point_candidate(version.version)
        logger.info("stage %s registered as %s version %s", record["stage"], self.model_name, version.version)
        return version

    # --------------------------------------------------------------------------- base model (stage 0)
    def awaits_base(self) -> bool:
        """Whether a base model may still start the chain: no champion and no stage registered after a base."""
        if self.champion() is not None:
            return False
        query = f"name = {_literal(self.model_name)}"
        found = self._call("search_model_versions", self.client.search_model_versions, query)
        return all(v.tags.get("loire.stage") == "0" for v in found)

    def register_base(self, stage_dir: str | os.PathLike[str], *, flow_run_id: str | None) -> ModelVersion:
        """Register an imported base (a stage-0 folder of `loire.base.import_base`) and make it the champion.

        Its run `stage-0-base` and version carry the base as their arrival (source URI + weights' sha256; the run
        logs it as its input), so a retried import finds the version instead of adding one; tags `loire.stage=0`,
        `loire.base=<source>`. No gate applies: nothing came before it to compare with.
        """
        record = read_stage(stage_dir)
        base = record["base"]
        run_id = self.start_stage_run(
            stage=0,
            domain="base",
            flow_run_id=flow_run_id,
            params={"base": base["source"], "architecture": base["architecture"]},
            corpus_uri=base["source"],
            corpus_etag=base["sha256"],
        )
        version = self.register_stage(
            run_id,
            stage_dir,
            parent_version=None,
            # No domain: the base covers none, so `loire.covers` of later stages lists only arrived domains.
            extra_tags={BASE_TAG: _tag(base["source"]), "loire.domain": "", "loire.strategy": "", "loire.covers": ""},
            description=f"stage 0: base model {base['source']} ({base['architecture']}), imported exactly",
        )
        self._set_alias(CHAMPION, version.version)
        self._set_tag(version.version, "loire.promoted", "true")
        self._set_tag(version.version, PROMOTION_TAG, "promoted")
        self.end_stage_run(run_id)
        logger.info("%s v%s: base %s imported as stage 0, champion", self.model_name, version.version, base["source"])
        return version

    def _version_tags(
        self, record: Mapping[str, Any], corpus_uri: str, etag: str, parent_version: str | None
    ) -> dict[str, str]:
        growth = record.get("growth") or {}
        return {
            "loire.stage": str(record["stage"]),
            "loire.domain": str(record["domain"]),
            "loire.strategy": str(record.get("strategy")),
            "loire.parent_version": parent_version or "none",
            "loire.corpus_uri": _tag(corpus_uri),
            "loire.corpus_etag": _tag(etag),
            "loire.arrival": arrival_key(corpus_uri, etag),
            "loire.growth": _tag(json.dumps({k: growth.get(k) for k in ("targets", "operator", "max_abs_logit_diff")})),
            # Domains the model was trained on, in arrival order (the pipeline passes the registry's view,
            # which adds domains carried by earlier stages) and those still owed (see loire.arrivals).
            "loire.covers": ",".join(
                dict.fromkeys(
                    [
                        *(str(d) for learnt in learnt_domains((record.get("lineage") or [])[:-1]) for d in learnt),
                        *(str(c["domain"]) for c in record.get("carried") or []),
                        str(record["domain"]),
                    ]
                )
            ),
            "loire.pending": "",
        }

    def _ensure_registered_model(self) -> None:
        try:
            self._call("create_registered_model", self.client.create_registered_model, self.model_name)
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise

    def _log_stage_model(self, run: Run, stage_dir: Path, record: Mapping[str, Any]) -> str:
        """Upload the model, its tokenizer and stage.json as one MLflow logged model (in the run's experiment);
        returns its id."""
        self._ensure_registered_model()
        run_id = run.info.run_id
        # An absolute name_or_path: MLflow looks a relative one ("runs/stage-1") up on the Hugging Face Hub.
        folder = stage_dir.resolve()
        model = load_model(folder)
        components = {"model": model, "tokenizer": load_tokenizer(folder)}
        target = _Target(
            run_id, run.info.experiment_id, {"loire.stage": str(record["stage"]), "loire.domain": str(record["domain"])}
        )
        task = _TASKS[type(model).__name__]
        model_id = self._call("log_model", self._log_transformers, target, components, folder, task)
        stage_file = str(folder / STAGE_FILE)
        self._call("log_model_artifact(stage.json)", self.client.log_model_artifact, model_id, stage_file)
        self._call("log_artifact(stage.json)", self.client.log_artifact, run_id, stage_file, "stage")
        moments = folder / MOMENTS_FILE
        if moments.is_file():  # a carrying strategy's AdamW state: the next stage grows it with the model
            self._call("log_model_artifact(moments)", self.client.log_model_artifact, model_id, str(moments))
        return model_id

    def _log_transformers(self, target: _Target, components: dict[str, Any], folder: Path, task: str) -> str:
        """`mlflow.transformers.log_model` of the in-memory model + tokenizer (a `task` pipeline). When no
        pipeline can be built, the stage folder itself (weights, tokenizer, stage.json) becomes the logged
        model's artifacts: MLflow's documented alternative, logging a checkpoint path, fails with
        transformers 5 (`build_flavor_config_from_local_checkpoint`: 'str' object has no attribute '__name__')."""
        try:
            return self._log_model_attempt(target, components, task)
        except Exception as exc:
            if is_transient(exc):
                raise
            logger.warning(
                "no %s pipeline for this model (%s): logging the stage folder as is", task, short(exc), exc_info=True
            )
            return self._log_folder_attempt(target, folder)

    def _log_folder_attempt(self, target: _Target, folder: Path) -> str:
        logged = self._new_logged_model(target, layout="folder")
        try:
            self.client.log_model_artifacts(logged.model_id, str(folder))
            self.client.finalize_logged_model(logged.model_id, "READY")
        except Exception:
            self._abandon(logged.model_id)
            raise
        return logged.model_id

    def _new_logged_model(self, target: _Target, layout: str) -> LoggedModel:
        tags = {**target.tags, "loire.layout": layout}
        return self.client.create_logged_model(
            target.experiment_id, name=MODEL_ARTIFACT, source_run_id=target.run_id, tags=tags
        )

    def _log_model_attempt(self, target: _Target, transformers_model: Any, task: str) -> str:
        """One upload into a fresh logged model: MLflow links a logged model to its run once only, so a retry
        cannot reuse the model of a failed attempt (which is marked FAILED)."""
        logged = self._new_logged_model(target, layout="transformers")
        try:
            with _global_tracking_uri(self.tracking_uri), MODEL_INIT_LOCK:  # it builds a pipeline (models)
                mlflow.transformers.log_model(
                    transformers_model=transformers_model,
                    name=MODEL_ARTIFACT,
                    task=task,
                    run_id=target.run_id,
                    model_id=logged.model_id,
                    pip_requirements=_pip_requirements(),
                    metadata={"loire_version": loire.__version__, "load_note": "import loire first (model_type loire)"},
                )
        except Exception:
            self._abandon(logged.model_id)
            raise
        return logged.model_id

    def _abandon(self, model_id: str) -> None:
        try:
            self._call(
                "finalize_logged_model",
                self.client.finalize_logged_model,
                model_id,
                "FAILED",
                policy=RetryPolicy(attempts=1),
            )
        except Exception as exc:  # best effort: the attempt's own error is the one to report
            logger.warning("could not mark logged model %s FAILED: %s", model_id, short(exc))

    def _version(self, version: str) -> ModelVersion:
        return self._call("get_model_version", self.client.get_model_version, self.model_name, str(version))

    def _wait_ready(self, version: str) -> ModelVersion:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            current = self._version(version)
            if current.status == "READY":
                return current
            if current.status == "FAILED_REGISTRATION":
                raise RuntimeError(f"{self.model_name} v{version}: registration failed ({current.status_message})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.model_name} v{version}: not READY after {self.ready_timeout_s} s")
            time.sleep(1.0)

    def _keep_first_of_arrival(
        self, version: ModelVersion, corpus_uri: str, etag: str, attempt: int = 1
    ) -> ModelVersion:
        """Two concurrent registrations of one arrival's attempt: the lowest version wins, the other is deleted."""
        first = self.find_arrival(corpus_uri, etag, attempt)
        if first is None or first.version == version.version:
            return version
        logger.warning(
            "arrival %s was registered twice (v%s, v%s): keeping v%s",
            corpus_uri,
            first.version,
            version.version,
            first.version,
        )
        self._delete_version(version.version)
        return first

    def _aliases(self) -> dict[str, str]:
        try:
            model = self._call("get_registered_model", self.client.get_registered_model, self.model_name)
        except MlflowException as exc:
            if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise
        return {alias: str(v) for alias, v in (model.aliases or {}).items()}

    def _point_candidate(self, version: str) -> None:
        """Move `candidate` to `version` unless it already points at a newer one (a late retry of an old
        arrival must not move it back)."""
        current = self._aliases().get(CANDIDATE)
        if current is None or int(current) <= int(version):
            self._set_alias(CANDIDATE, version)

    def _set_alias(self, alias: str, version: str) -> None:
        self._call(f"set alias {alias}", self.client.set_registered_model_alias, self.model_name, alias, str(version))

    def _set_tag(self, version: str, key: str, value: str) -> None:
        self._call(f"tag {key}", self.client.set_model_version_tag, self.model_name, str(version), key, _tag(value))

    def resolve(self, alias_or_version: str) -> ModelVersion:
        """A version by number ("3") or alias ("champion")."""
        ref = str(alias_or_version)
        if ref.isdigit():
            return self._version(ref)
        return self._call("get_model_version_by_alias", self.client.get_model_version_by_alias, self.model_name, ref)

    def champion(self) -> ModelVersion | None:
        """The version under alias `champion`; None when there is none (or no registered model yet)."""
        version = self._aliases().get(CHAMPION)
        return None if version is None else self._version(version)

    # -------------------------------------------------------------------------- promotion
    def promote(
        self,
        version: str,
        gates: Gates,
        *,
        ap_plus: float | None,
        downstream_average: float | None,
        downstream_scores: Mapping[str, float] | None = None,
        parent_version: Any = UNCHECKED,
    ) -> Decision:
        """Check the gates; when all pass, move `champion` to `version` (the commit point) and tag it
        `loire.promoted=true`, else tag `loire.promotion=rejected: <reasons>` and leave `champion` alone.

        With `downstream_scores` (task → score), the downstream gate compares both versions on the tasks
        the champion was scored on (a later stage adds the tasks of its new domain, which would make the
        plain averages incomparable); without, it compares `downstream_average` with the champion's.

        `parent_version` (a version, or None for a first stage) makes the promotion conditional: it is
        rejected when the champion is no longer the version this stage grew from (another stage was promoted
        meanwhile, e.g. while this one was crashed), so a late stage never moves the champion back to a
        fork of the lineage. A version that already is the champion (a retried promotion) stays promoted."""
        candidate = self._complete(str(version))
        previous = self.champion()
        if previous is not None and previous.version == candidate.version:
            logger.info("%s v%s is already the champion", self.model_name, candidate.version)
            parent = candidate.tags.get("loire.parent_version", "none")
            return Decision(True, ["pass: already the champion"], None if parent == "none" else parent)
        champion_average, scope = None, "downstream average"
        if previous is not None and previous.run_id:
            metrics = self._call("get_run", self.client.get_run, previous.run_id).data.metrics
            champion_average = metrics.get("downstream/average")
            if downstream_scores:
                theirs = {k.removeprefix("downstream/"): v for k, v in metrics.items() if k.startswith("downstream/")}
                downstream_average, champion_average, common = common_averages(downstream_scores, theirs)
                scope = f"downstream average over the {len(common)} task(s) both were scored on"
        decision = decide(
            gates,
            ap_plus=ap_plus,
            downstream_average=downstream_average,
            champion_average=champion_average,
            champion=previous.version if previous is not None else None,
            downstream_scope=scope,
            parent_version=parent_version,
        )
        if decision.promoted:
            self._set_alias(CHAMPION, candidate.version)
            self._set_tag(candidate.version, "loire.promoted", "true")
            self._set_tag(candidate.version, PROMOTION_TAG, "promoted")
        else:
            self._set_tag(candidate.version, PROMOTION_TAG, f"rejected: {decision.failures}")
        logger.info(
            "%s v%s %s: %s",
            self.model_name,
            candidate.version,
            "promoted" if decision.promoted else "rejected",
            "; ".join(decision.reasons),
        )
        return decision

    def _complete(self, version: str) -> ModelVersion:
        """The version once READY with all its artifacts uploaded; raises otherwise."""
        ready = self._wait_ready(version)
        self._check_artifacts(ready)
        return ready

    def _check_artifacts(self, ready: ModelVersion) -> None:
        """Raise RuntimeError unless the logged model behind `ready` holds every required artifact."""
        version = ready.version
        model_id = _model_id(ready)
        top = {
            Path(f.path).name for f in self._call("list artifacts", self.client.list_logged_model_artifacts, model_id)
        }
        if "MLmodel" in top:  # transformers flavor: weights under model/, tokenizer under components/
            required, weights_dir = REQUIRED_ARTIFACTS, MODEL_ARTIFACT
        else:  # the stage folder as is
            required, weights_dir = FOLDER_ARTIFACTS, None
        weights = self._call("list artifacts", self.client.list_logged_model_artifacts, model_id, weights_dir)
        missing = sorted(required - top)
        if missing or not any(f.path.endswith(".safetensors") for f in weights):
            raise RuntimeError(f"{self.model_name} v{version}: incomplete artifacts (missing {missing or 'weights'})")

    # -------------------------------------------------------------------------- download
    def download_stage(self, version: str, dest: str | os.PathLike[str]) -> Path:
        """Rebuild the stage folder of a registered version (number or alias) at `dest`, atomically.

        The folder holds the save_pretrained files, the tokenizer, `stage.json` and `registry.json`; it loads
        with `loire.io.load_model` and serves as `run_stage(parent=...)`. The last lineage entry of stage.json
        (this stage) gets `model_dir = dest`; earlier stages' model_dir still name where they were trained, so
        pass `teachers=` to `run_stage` when those folders are not on this machine. An existing complete
        `dest` of the same version is reused.
        """
        dest = Path(dest)
        mv = self.resolve(version)
        if _is_complete_stage(dest, self.model_name, mv.version):
            logger.info("%s already holds %s v%s", dest, self.model_name, mv.version)
            return dest
        location = self._call("get_logged_model", self.client.get_logged_model, _model_id(mv)).artifact_location
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            raw = tmp / "download"
            self._call("download_artifacts", _download, location, raw, self.tracking_uri)
            folder = _assemble_stage(raw, tmp / "stage", dest)
            (folder / REGISTRY_FILE).write_text(json.dumps(_registry_info(self.model_name, mv), indent=2))
            publish_dir(folder, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("%s v%s rebuilt at %s", self.model_name, mv.version, dest)
        return dest

    # --------------------------------------------------------------------------- lineage
    def lineage(self, alias_or_version: str = CHAMPION) -> list[dict[str, Any]]:
        """The chain from a version back to stage 1 along `loire.parent_version`, oldest first."""
        chain: list[dict[str, Any]] = []
        seen: set[str] = set()
        mv: ModelVersion | None = self.resolve(alias_or_version)
        while mv is not None and mv.version not in seen:
            seen.add(mv.version)
            chain.append(self._lineage_entry(mv))
            parent = mv.tags.get("loire.parent_version", "none")
            mv = None if parent == "none" else self._version(parent)
        return chain[::-1]

    def _lineage_entry(self, mv: ModelVersion) -> dict[str, Any]:
        metrics = self._call("get_run", self.client.get_run, mv.run_id).data.metrics if mv.run_id else {}
        stage = mv.tags.get("loire.stage")
        return {
            "version": str(mv.version),
            "stage": int(stage) if stage and stage.isdigit() else None,
            "domain": mv.tags.get("loire.domain"),
            "corpus_uri": mv.tags.get("loire.corpus_uri"),
            "etag": mv.tags.get("loire.corpus_etag"),
            "aliases": list(mv.aliases or []),
            "run_id": mv.run_id,
            "ap": metrics.get("eval/ap"),
            "ap_plus": metrics.get("eval/ap_plus"),
            "covers": mv.tags.get("loire.covers", ""),
            "pending": mv.tags.get("loire.pending", ""),
        }


def _download(artifact_uri: str, dst: Path, tracking_uri: str) -> str:
    """A clean download (a retried partial one starts over)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst), tracking_uri=tracking_uri)


def _assemble_stage(raw: Path, folder: Path, dest: Path) -> Path:
    """A stage folder from a downloaded logged model: an MLflow transformers model (model/ +
    components/tokenizer/ + stage.json) or a stage folder logged as is."""
    root = next((p for p in [raw, *raw.iterdir()] if (p / STAGE_FILE).is_file()), None)
    if root is None:
        raise RuntimeError(f"{raw}: the download holds no {STAGE_FILE}")
    if (root / "MLmodel").is_file():
        shutil.copytree(root / MODEL_ARTIFACT, folder)
        tokenizer = root / "components" / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            raise RuntimeError(f"{root}: the registered model has no tokenizer (components/tokenizer/tokenizer.json)")
        for file in tokenizer.iterdir():
            shutil.copy2(file, folder / file.name)
        if (root / MOMENTS_FILE).is_file():
            shutil.copy2(root / MOMENTS_FILE, folder / MOMENTS_FILE)
    else:
        shutil.copytree(root, folder)
    record = json.loads((root / STAGE_FILE).read_text())
    if record.get("lineage"):
        record["lineage"][-1]["model_dir"] = str(dest.resolve())  # this stage now lives at dest
    (folder / STAGE_FILE).write_text(json.dumps(record, indent=2))
    return folder


def _arrival_of(run: Run, record: Mapping[str, Any]) -> tuple[str, str]:
    """Corpus URI and ETag as the run was tagged with (the arrival), else as stage.json recorded them."""
    tags = run.data.tags
    corpus = record.get("corpus") or {}
    uri = tags.get("loire.corpus_uri") or corpus.get("uri")
    etag = tags.get("loire.corpus_etag") or corpus.get("etag") or corpus.get("digest")
    if not uri or not etag:
        raise ValueError(f"run {run.info.run_id}: no corpus URI/ETag in its tags nor in stage.json")
    return uri, etag


def _registry_info(model_name: str, mv: ModelVersion) -> dict[str, Any]:
    return {"model_name": model_name, "version": mv.version, "run_id": mv.run_id, "source": mv.source}


def _is_complete_stage(folder: Path, model_name: str, version: str) -> bool:
    marker = folder / REGISTRY_FILE
    if not marker.is_file() or not all((folder / n).is_file() for n in ("config.json", "tokenizer.json", STAGE_FILE)):
        return False
    if not any(folder.glob("*.safetensors")):
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("model_name") == model_name and str(info.get("version")) == str(version)


__all__ = ["ARTIFACTS_TAG", "BASE_TAG", "CANDIDATE", "CHAMPION", "PROMOTION_TAG", "Decision", "Gates", "Tracker"]
