"""Downstream fine-tuning evaluation: the ten "Don't Stop Pretraining" tasks that score a stage model.

ELLE and LOIRE report, besides perplexity, how well the model after the last stage fine-tunes on two
tasks per domain (Gururangan et al. 2020, DSP). The tasks are described by a catalogue
(`loire/tasks/dsp.yaml`, see its header): files relative to a data root, formats, fields, the full
label set, DSP's metric, fine-tuning settings, and for tasks whose data lacks a split a deterministic
hash rule that divides a file.

Rooms:

- `catalogue.py`: `load_catalogue` → `TaskSpec`s (pydantic models of dsp.yaml, `extra="forbid"`; errors
  name the task and the field path).
- `tasks.py`: `load_task_data` → `TaskData` (train / dev / test lists of `Example(text, text_pair, label)`);
  a `TaskDataError` names the file and row (missing file, empty split, missing field, a label outside
  the label set, broken JSON, a short CSV row, undecodable bytes); budget caps; `score`, `majority_baseline`.
- `loire/metrics.py`: `accuracy`, `micro_f1`, `macro_f1` (scikit-learn's definitions, no dependency on it).
- `finetune.py`: `finetune_task` fine-tunes one task for each seed: the stage model's transformer with a fresh,
  seeded classification head (`load_classifier`), AdamW with linear warmup (6%) and linear decay,
  early stopping on dev after each epoch (best state kept), test score of the best state.
- `evaluate_task` (one task, mappable by an orchestrator) and `evaluate_downstream` (many tasks;
  a task with malformed data becomes a `TaskFailure` while the others still run).

Budget: `budget=N` caps the examples per task so a CPU run stays short: train ≤ N, dev ≤ max(200, N // 4),
test ≤ max(500, N // 2), each a seeded random subset (seed = task and split name) that is the same
for every model and seed, so scores at one budget are comparable. Without a budget all data is used.

Inputs: byte-level BPE ids of the text (and `<|endoftext|>` + the second text for pair tasks),
ending in `<|endoftext|>`, which is the pooled token of a causal model (a masked model pools a
leading `<|endoftext|>`). Truncation keeps the beginning; pairs are truncated longest-first. Models
of the ELLE strategy (`stage.json` strategy "elle") were trained with domain prompts, so the task's
domain token (`<CS>`, ...) is put first. `max_length` is clamped to the model's
`max_position_embeddings`.
"""

from loire.domains import DOMAINS
from loire.downstream import catalogue, finetune, tasks
from loire.downstream.catalogue import *  # noqa: F403  (the package's names, room by room)
from loire.downstream.finetune import *  # noqa: F403
from loire.downstream.tasks import *  # noqa: F403
from loire.metrics import CLASSIFICATION_METRICS as METRICS
from loire.metrics import accuracy, macro_f1, micro_f1
from loire.train import OnLog

__all__ = [
    *catalogue.__all__,
    *tasks.__all__,
    *finetune.__all__,
    "DOMAINS",
    "METRICS",
    "OnLog",
    "accuracy",
    "macro_f1",
    "micro_f1",
]
