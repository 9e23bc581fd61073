"""Promotion policy of lifelong stages: the gates a new stage must pass to replace the champion.

Pure: the measurements of the candidate and of the champion go in, a `Decision` (promoted or not, one reason
per gate) comes out. Where the champion lives (the MLflow registry, `flows.registry.Tracker.promote`) and how
the decision is recorded are the pipeline's business.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

UNCHECKED: Any = object()  # decide(parent_version=...) not given: no lineage check
# The AP+ bound of the library and of the pipeline (flows.settings `max_ap_plus`): one number, so a default
# means the same everywhere. At gpt-tiny (bench/results/lifelong.md) the default strategy `loire` keeps AP+
# below 0, LOIRE without replay shows 157-454 and fine-tuning a fixed model 287-1284: 100 rejects real forgetting.
DEFAULT_MAX_AP_PLUS = 100.0


@dataclass(frozen=True)
class Gates:
    """Promotion gates.

    `max_ap_plus`: the largest AP+ (mean rise in perplexity points of earlier domains, ELLE) a stage may
    show; default `DEFAULT_MAX_AP_PLUS` (100, the pipeline's default too), sized for the CPU presets. For
    base-sized models, where AP+ is a few points, pass a much smaller bound; None disables the gate. A stage
    without AP+ (stage 1) passes.
    `downstream_tolerance`: how far (absolute score) the downstream average may fall below the champion's.
    """

    max_ap_plus: float | None = DEFAULT_MAX_AP_PLUS
    downstream_tolerance: float = 0.02


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reasons: list[str] = field(default_factory=list)  # one line per gate: "pass: ...", "fail: ...", "skip: ..."
    previous_champion: str | None = None

    @property
    def failures(self) -> str:
        """The failed gates' reasons, joined (empty when promoted)."""
        return "; ".join(reason for reason in self.reasons if reason.startswith("fail:"))


def ap_plus_gate(ap_plus: float | None, gates: Gates) -> tuple[bool, str]:
    """AP+ (forgetting of the earlier domains) at most `gates.max_ap_plus`."""
    if ap_plus is None:
        return True, "pass: no AP+ (first stage)"
    if gates.max_ap_plus is None:
        return True, f"skip: AP+ gate disabled (AP+ {ap_plus:.4g})"
    if not math.isfinite(ap_plus) or ap_plus > gates.max_ap_plus:
        return False, f"fail: AP+ {ap_plus:.4g} > {gates.max_ap_plus:.4g}"
    return True, f"pass: AP+ {ap_plus:.4g} <= {gates.max_ap_plus:.4g}"


def lineage_gate(parent: str | None, champion: str | None) -> tuple[bool, str]:
    """The champion is still the version the stage grew from (None: the stage is a first stage)."""
    grown_from = "nothing" if parent is None else f"v{parent}"
    if (None if parent is None else str(parent)) == (None if champion is None else str(champion)):
        return True, f"pass: the champion is still {grown_from}, which this stage grew from"
    return False, f"fail: the champion moved to v{champion} while this stage grew from {grown_from}"


def downstream_gate(
    mine: float | None, champion: float | None, gates: Gates, scope: str = "downstream average"
) -> tuple[bool, str]:
    """The downstream average at least the champion's less `gates.downstream_tolerance`; skipped when missing."""
    if mine is None or champion is None:
        missing = "this version's" if mine is None else "the champion's"
        return True, f"skip: downstream gate ({missing} downstream average is missing)"
    floor = champion - gates.downstream_tolerance
    if not math.isfinite(mine) or mine < floor:
        return False, f"fail: {scope} {mine:.4g} < champion {champion:.4g} - {gates.downstream_tolerance}"
    return True, f"pass: {scope} {mine:.4g} >= champion {champion:.4g} - {gates.downstream_tolerance}"


def decide(
    gates: Gates,
    *,
    ap_plus: float | None,
    downstream_average: float | None,
    champion_average: float | None,
    champion: str | None,
    downstream_scope: str = "downstream average",
    parent_version: Any = UNCHECKED,
) -> Decision:
    """Every gate on the candidate's measurements against the champion's (version `champion`, None when there
    is none). `parent_version` (a version, or None for a first stage) adds the lineage gate."""
    checks = [
        ap_plus_gate(ap_plus, gates),
        downstream_gate(downstream_average, champion_average, gates, downstream_scope),
    ]
    if parent_version is not UNCHECKED:
        checks.append(lineage_gate(parent_version, champion))
    return Decision(all(ok for ok, _ in checks), [reason for _, reason in checks], champion)


def common_averages(
    mine: Mapping[str, float], theirs: Mapping[str, float]
) -> tuple[float | None, float | None, list[str]]:
    """Averages of two task → score maps over the tasks both hold (and those tasks): a later stage adds the tasks
    of its new domain, which would make the plain averages incomparable."""
    common = sorted(t for t in mine if t in theirs and "/" not in t and t != "average")
    if not common:
        return None, None, []
    return sum(mine[t] for t in common) / len(common), sum(theirs[t] for t in common) / len(common), common


__all__ = [
    "DEFAULT_MAX_AP_PLUS",
    "Decision",
    "Gates",
    "ap_plus_gate",
    "common_averages",
    "decide",
    "downstream_gate",
    "lineage_gate",
]
