"""Which arrivals a lifelong stage owes, and what each registered model covers (pure rules, no I/O).

A pipeline registers one model version per arrival (a domain batch). When a version is *not* promoted,
its arrival's data is not in the champion; under the `carry` policy (the default) it stays **pending**:
the next stage grows the champion and trains on its own arrival and every pending one, mixed, so the
champion's lineage covers every arrived domain. `retry` first re-runs the rejected stage once (same arrival,
same champion, another seed: `retry_seed`) and, if the retry is rejected too, the arrival stays pending and is
carried as under `carry`. `skip` is the old behaviour (a rejected arrival is dropped; it stays listed as pending
on later versions, so the loss is visible).

Vocabulary (the registry's tags, written by the pipeline):
- an arrival is identified by its key (`flows.tracking.arrival_key`: batch URI + ETag);
- `covers`: the arrivals whose data a version was trained on, its chain's and its own, in arrival order;
  the tag `loire.covers` lists their domains (comma-separated, first occurrence, in arrival order);
- `pending`: the arrivals registered before a version and not covered by it; tag `loire.pending`.

Stage numbers follow the champion's chain: a stage grown from the champion of stage k is stage k + 1,
whatever was rejected in between, so no two versions of one chain share a number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

POLICIES = ("carry", "retry", "skip")
# A stage is re-run at most this many times under `retry` (the issue: "re-run the rejected stage once").
MAX_RETRIES = 1


@dataclass(frozen=True)
class Registered:
    """One registered (complete) version as the arrival rules see it."""

    version: int
    domain: str
    arrival: str  # the arrival key of the version's own batch
    corpus_uri: str = ""
    etag: str = ""
    promoted: bool | None = None  # None: not decided yet (a stage that stopped before its promotion)
    carried: tuple[str, ...] = ()  # arrival keys of the pending arrivals this version trained on as well


@dataclass(frozen=True)
class Plan:
    """What a new stage trains on besides its own arrival, and what it will cover."""

    stage: int
    carry: tuple[Registered, ...] = ()  # pending arrivals mixed into this stage's training data
    dropped: tuple[Registered, ...] = ()  # pending arrivals the policy does not train on (`skip`)
    covers: tuple[str, ...] = ()  # domains, in arrival order, of the new version (if registered)
    pending: tuple[str, ...] = ()  # domains still owed once the new version is registered
    notes: list[str] = field(default_factory=list)


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"rejected-arrival policy {policy!r} is not one of {', '.join(POLICIES)}")
    return policy


def should_retry(policy: str, promoted: bool, attempt: int) -> bool:
    """Whether the stage of an arrival, at its `attempt` (1: first) and not promoted, is re-run (policy `retry`)."""
    return check_policy(policy) == "retry" and not promoted and attempt <= MAX_RETRIES


def retry_seed(schedule_seed: int, attempt: int) -> int:
    """The schedule seed of an arrival's `attempt` (1: the schedule's own): retry k adds k, so its start noise, data
    order and replay draws differ, and never equal another stage's (stage seeds lie `STAGE_SEED_STRIDE` apart)."""
    return schedule_seed + attempt - 1


def stage_number(parent_stage: int | None) -> int:
    """Stage of a version grown from a parent of stage `parent_stage` (None: the first stage)."""
    return 1 if parent_stage is None else int(parent_stage) + 1


def covered(chain: Sequence[Registered]) -> list[str]:
    """Arrival keys a version covers, given its chain (oldest first, the version last)."""
    keys: list[str] = []
    for entry in chain:
        for key in (*entry.carried, entry.arrival):
            if key not in keys:
                keys.append(key)
    return keys


def domains_of(
    keys: Iterable[str], registered: Sequence[Registered], extra: Mapping[str, str] | None = None
) -> list[str]:
    """The domains of arrival keys, in arrival (registration) order, each once; `extra` maps keys not yet
    registered (the stage's own arrival) to their domain and sorts them last."""
    order = {r.arrival: (r.version, r.domain) for r in sorted(registered, key=lambda r: r.version)}
    tail = dict(extra or {})
    ranked = sorted(
        (order.get(k, (10**12 + i, tail.get(k, ""))) for i, k in enumerate(keys) if k in order or k in tail),
        key=lambda item: item[0],
    )
    domains: list[str] = []
    for _, domain in ranked:
        if domain and domain not in domains:
            domains.append(domain)
    return domains


def owed(registered: Sequence[Registered], chain: Sequence[Registered], current: str) -> list[Registered]:
    """Arrivals registered, decided and not covered by the champion's `chain`, oldest first, except `current`
    (the stage's own arrival). Undecided versions are excluded: their own run finishes them."""
    have = set(covered(chain))
    out: dict[str, Registered] = {}
    for entry in sorted(registered, key=lambda r: r.version):
        if entry.arrival == current or entry.arrival in have or entry.promoted is not False:
            continue
        out.setdefault(entry.arrival, entry)  # the first version of an arrival stands for it
    return list(out.values())


def plan(
    policy: str,
    registered: Sequence[Registered],
    chain: Sequence[Registered],
    current: str,
    domain: str,
    parent_stage: int | None,
) -> Plan:
    """The stage for arrival `current` (domain `domain`) grown from the last version of `chain` (the champion)."""
    check_policy(policy)
    debt = owed(registered, chain, current)
    notes: list[str] = []
    if policy == "skip":
        carry: list[Registered] = []
        dropped = debt
        if dropped:
            notes.append(
                "policy skip: the data of "
                + ", ".join(f"{r.domain} (v{r.version}, not promoted)" for r in dropped)
                + " is NOT trained on; the champion will not cover it"
            )
    else:
        carry, dropped = [], []
        for entry in debt:  # one batch per domain and stage; another batch of a domain stays owed for the next
            if entry.domain == domain or any(c.domain == entry.domain for c in carry):
                dropped.append(entry)
            else:
                carry.append(entry)
        if dropped:
            notes.append(
                "still owed after this stage (one batch per domain per stage): "
                + ", ".join(f"{r.domain} (v{r.version})" for r in dropped)
            )
        if carry:
            notes.append(
                f"policy {policy}: carrying "
                + ", ".join(f"{r.domain} (v{r.version}, not promoted)" for r in carry)
                + " into this stage"
            )
    keys = [*covered(chain), *(r.arrival for r in carry), current]
    covers = domains_of(keys, registered, {current: domain})
    pending = domains_of([r.arrival for r in dropped], registered)
    return Plan(
        stage=stage_number(parent_stage),
        carry=tuple(carry),
        dropped=tuple(dropped),
        covers=tuple(covers),
        pending=tuple(pending),
        notes=notes,
    )


def shares(blocks: Mapping[str, int]) -> dict[str, float]:
    """Each domain's share of a stage's training blocks."""
    total = sum(blocks.values())
    return {d: (n / total if total else 0.0) for d, n in blocks.items()}


def tag_list(domains: Iterable[str]) -> str:
    """The value of `loire.covers` / `loire.pending`: comma-separated, "" for none."""
    return ",".join(domains)


def parse_tag_list(value: str | None) -> list[str]:
    return [d for d in (value or "").split(",") if d]


def describe_version(
    *,
    stage: int,
    domain: str,
    ap: float | None,
    ap_plus: float | None,
    covers: Sequence[str],
    pending: Sequence[str] = (),
    carried: Sequence[str] = (),
    decision: str = "promotion pending",
    max_ap_plus: float | None = None,
) -> str:
    """The one-line description of a registered version (the MLflow UI's Description column); `max_ap_plus`,
    the AP+ gate the decision used, is shown beside AP+ (None: no gate)."""
    parts = [f"stage {stage} {domain}"]
    if carried:
        parts[0] += f" (+ carried {', '.join(carried)})"
    parts.append(f"AP {ap:.1f}" if ap is not None else "AP -")
    gate = "" if max_ap_plus is None else f" (gate <= {max_ap_plus:g})"
    parts.append(f"AP+ {ap_plus:.1f}{gate}" if ap_plus is not None else "AP+ - (first stage)")
    parts.append(f"covers {', '.join(covers) or '-'}")
    if pending:
        parts.append(f"still owed {', '.join(pending)}")
    parts.append(decision)
    return " · ".join(parts)


MODEL_DESCRIPTION = (
    "LOIRE lifelong language model: one version per arrived domain batch. Each stage grows the champion "
    "(function-preserving), distils from the earlier stages and trains on the new batch plus every batch "
    "still owed by a rejected stage; it is promoted to alias `champion` only if its gates pass (AP+ "
    "forgetting bound, downstream average vs the champion, lineage). Tags: loire.covers (domains trained "
    "on), loire.pending (domains still owed), loire.promotion (the decision and why)."
)


LINEAGE_COLUMNS = ("version", "stage", "domain", "covers", "pending", "corpus", "etag", "aliases", "AP", "AP+", "run")


def lineage_frame(chain: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """A registry chain (`flows.registry.Tracker.lineage`, oldest first) as a table, one row per version.

    Columns `LINEAGE_COLUMNS`: `covers` / `pending` "-" when empty, `aliases` comma-joined, `run` the run id's
    first 8 characters, AP / AP+ floats (NaN where not measured). `loire lineage`, the demo and the Prefect
    artifact `lifelong-lineage` all render this one frame.
    """
    import pandas as pd

    rows = [
        {
            "version": str(entry["version"]),
            "stage": "-" if entry["stage"] is None else str(entry["stage"]),
            "domain": entry["domain"] or "-",
            "covers": entry.get("covers") or "-",
            "pending": entry.get("pending") or "-",
            "corpus": str(entry["corpus_uri"]),
            "etag": str(entry["etag"]),
            "aliases": ", ".join(entry["aliases"]),
            "AP": entry["ap"],
            "AP+": entry["ap_plus"],
            "run": str(entry["run_id"])[:8],
        }
        for entry in chain
    ]
    return pd.DataFrame(rows, columns=list(LINEAGE_COLUMNS)).astype({"AP": float, "AP+": float})
