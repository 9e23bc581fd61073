"""MLflow tracking of lifelong stages, re-exported from its rooms for existing imports:

- flows/retry.py: one definition of a transient error and one backoff (`RetryPolicy`, tenacity);
- flows/runs.py: runs, params, metrics (`MetricBuffer`), tables (`RunLog`);
- flows/registry.py: registration, logged-model fallback, promotion, download, lineage (`Tracker`);
- loire/promotion.py: the promotion gates (`Gates`, `Decision`), pure;
- loire/cli.py: `render_lineage`.
"""

from __future__ import annotations

from flows.registry import (
    _TASKS,
    ARTIFACTS_TAG,
    CANDIDATE,
    CHAMPION,
    PROMOTION_TAG,
    REGISTRY_FILE,
    Tracker,
)
from flows.retry import RetryPolicy, call_with_retries, is_transient
from flows.runs import MetricBuffer, arrival_key, dataset_digest, flatten_params, stage_metrics
from loire.promotion import Decision, Gates

is_retryable = is_transient  # the name flows.tracking used

__all__ = [
    "ARTIFACTS_TAG",
    "CANDIDATE",
    "CHAMPION",
    "PROMOTION_TAG",
    "REGISTRY_FILE",
    "_TASKS",
    "Decision",
    "Gates",
    "MetricBuffer",
    "RetryPolicy",
    "Tracker",
    "arrival_key",
    "call_with_retries",
    "dataset_digest",
    "flatten_params",
    "is_retryable",
    "stage_metrics",
]
