"""Rejected arrivals stay owed: the registry side of `loire.arrivals` (tags, descriptions, the stage's plan).

The stage flow asks `stage_plan` which arrivals it owes besides its own (versions that were registered,
decided and not promoted, and are not covered by the champion), and under the `carry` policy trains
on their corpora too. The version it registers carries `loire.covers` (domains in arrival order whose
data it was trained on, its chain's included), `loire.pending` (domains still owed: those `skip`
dropped), `loire.carried` (the arrival keys it carried) and a one-line description; the registered
model gets a short description of the pipeline.
"""

from __future__ import annotations

import logging
from typing import Any

from flows.registry import ARTIFACTS_TAG, PROMOTION_TAG, Tracker
from flows.runs import _literal
from loire.arrivals import MODEL_DESCRIPTION, Registered, describe_version, parse_tag_list, plan, tag_list

logger = logging.getLogger(__name__)

COVERS_TAG = "loire.covers"
PENDING_TAG = "loire.pending"
CARRIED_TAG = "loire.carried"


def _promoted(tags: dict[str, str]) -> bool | None:
    decision = tags.get(PROMOTION_TAG)
    if decision is None:
        return None
    return decision == "promoted"


def registered(tracker: Tracker) -> list[Registered]:
    """The complete versions of the tracker's model, oldest first."""
    found = tracker._call(
        "search_model_versions", tracker.client.search_model_versions, f"name = {_literal(tracker.model_name)}"
    )
    out = []
    for mv in found:
        tags = dict(mv.tags or {})
        if tags.get(ARTIFACTS_TAG) != "complete" or "loire.arrival" not in tags:
            continue
        out.append(
            Registered(
                version=int(mv.version),
                domain=tags.get("loire.domain", "?"),
                arrival=tags["loire.arrival"],
                corpus_uri=tags.get("loire.corpus_uri", ""),
                etag=tags.get("loire.corpus_etag", ""),
                promoted=_promoted(tags),
                carried=tuple(parse_tag_list(tags.get(CARRIED_TAG))),
            )
        )
    return sorted(out, key=lambda r: r.version)


def stage_plan(
    tracker: Tracker,
    policy: str,
    chain_versions: list[str],
    arrival: str,
    domain: str,
    parent_stage: int | None,
) -> dict[str, Any]:
    """The plan of the stage for `arrival` grown from the champion whose chain is `chain_versions`, as plain data."""
    everything = registered(tracker)
    by_version = {str(r.version): r for r in everything}
    chain = [by_version[v] for v in chain_versions if v in by_version]
    result = plan(policy, everything, chain, arrival, domain, parent_stage)
    return {
        "stage": result.stage,
        "carry": [
            {"version": r.version, "domain": r.domain, "arrival": r.arrival, "corpus_uri": r.corpus_uri, "etag": r.etag}
            for r in result.carry
        ],
        "dropped": [{"version": r.version, "domain": r.domain} for r in result.dropped],
        "covers": list(result.covers),
        "pending": list(result.pending),
        "notes": list(result.notes),
        "policy": policy,
    }


def version_tags(stage_plan: dict[str, Any]) -> dict[str, str]:
    """The coverage tags of the version a stage registers."""
    return {
        COVERS_TAG: tag_list(stage_plan["covers"]),
        PENDING_TAG: tag_list(stage_plan["pending"]),
        CARRIED_TAG: tag_list(c["arrival"] for c in stage_plan["carry"]),
    }


RETRY_OF_TAG = "loire.retry_of"
SEED_TAG = "loire.seed"


def retry_tags(retry: dict[str, Any] | None) -> dict[str, str]:
    """Tags of a retried stage's version (policy `retry`): the rejected version it re-ran and its schedule seed."""
    if not retry:
        return {}
    return {RETRY_OF_TAG: str(retry["of_version"]), SEED_TAG: str(retry["seed"])}


def description(
    record: dict[str, Any], stage_plan: dict[str, Any], decision: str, max_ap_plus: float | None = None
) -> str:
    return describe_version(
        stage=int(record["stage"]),
        domain=str(record["domain"]),
        ap=record.get("ap"),
        ap_plus=record.get("ap_plus"),
        covers=stage_plan["covers"],
        pending=stage_plan["pending"],
        carried=[c["domain"] for c in stage_plan["carry"]],
        decision=decision,
        max_ap_plus=max_ap_plus,
    )


def describe(tracker: Tracker, version: str, text: str) -> None:
    """Set a version's description, and the registered model's if it has none. Cosmetic: never fails a stage."""
    try:
        tracker._call(
            "update_model_version",
            tracker.client.update_model_version,
            tracker.model_name,
            str(version),
            description=text,
        )
        model = tracker._call("get_registered_model", tracker.client.get_registered_model, tracker.model_name)
        if not model.description:
            tracker._call(
                "update_registered_model",
                tracker.client.update_registered_model,
                tracker.model_name,
                description=MODEL_DESCRIPTION,
            )
    except Exception as exc:
        logger.warning("could not describe %s v%s: %s", tracker.model_name, version, exc)
