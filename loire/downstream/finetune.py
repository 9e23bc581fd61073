"""Fine-tuning a stage model on downstream tasks: one task for each seed (`finetune_task`), one task mappable by
an orchestrator (`evaluate_task`), many tasks (`evaluate_downstream`), and the JSON record (`summary`).

The stage model's transformer gets a fresh, seeded classification head (`load_classifier`); AdamW with linear
warmup (6%) and linear decay; early stopping on dev after each epoch (best state kept); the test score of the
best state. A task with malformed data or a diverged run becomes a `TaskFailure`; the other tasks still run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pandas as pd

from loire.config import LoireConfig
from loire.downstream.catalogue import SPLITS, TaskSpec, load_catalogue, select_tasks
from loire.downstream.tasks import (
    Example,
    TaskData,
    TaskDataError,
    apply_budget,
    budget_caps,
    default_data_root,
    load_task_data,
    majority_baseline,
    score,
)
from loire.model import LoireForSequenceClassification
from loire.train import OnLog

logger = logging.getLogger(__name__)

WARMUP_FRACTION = 0.06  # DSP's warmup ratio
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
EVAL_BATCH_SIZE = 64


@dataclass(frozen=True)
class TaskResult:
    """Scores of one task over seeds (mean ± sample std), with the majority-class baseline."""

    task: str
    domain: str
    paper_task: str
    substitute: str | None
    note: str | None
    metric: str
    mean: float
    std: float
    scores: tuple[float, ...]
    seeds: tuple[int, ...]
    dev_scores: tuple[float, ...]
    best_epochs: tuple[int, ...]
    majority: float
    n_train: int
    n_dev: int
    n_test: int
    max_length: int
    budget: int | None
    wall_time_s: float
    ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TaskFailure:
    """A task that could not be evaluated (malformed data, diverged training) and why."""

    task: str
    domain: str
    error: str
    ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stage_strategy(model_dir: str | os.PathLike[str]) -> str | None:
    file = Path(model_dir) / "stage.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text()).get("strategy")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{file}: not a valid stage record (JSON object)") from None


def load_classifier(
    model_dir: str | os.PathLike[str],
    num_labels: int,
    *,
    seed: int,
    pad_token_id: int | None = None,
    labels: Sequence[str] | None = None,
    base_state: Mapping[str, torch.Tensor] | None = None,
    config: LoireConfig | None = None,
) -> LoireForSequenceClassification:
    """The stage model's transformer under a fresh classification head seeded by `seed`.

    Every weight of the transformer (`model.*`) is loaded strictly from `model_dir`, whatever head
    the folder has (causal LM, masked LM, classifier); the head is initialised with the model's
    `_init_weights` after `torch.manual_seed(seed)`. `base_state` / `config` skip reading the folder
    again when fine-tuning many seeds.
    """
    if base_state is None or config is None:
        from loire.io import load_model

        source = load_model(model_dir)
        config, base_state = source.config, source.loire_base.state_dict()
    config = config.replace(num_labels=num_labels, architectures=["LoireForSequenceClassification"])
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    if labels is not None:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
    from loire.io import MODEL_INIT_LOCK

    with MODEL_INIT_LOCK:
        torch.manual_seed(seed)
        model = LoireForSequenceClassification(config)
    model.model.load_state_dict(base_state, strict=True)
    return model


def encode(
    examples: Sequence[Example],
    tokenizer: Any,
    max_length: int,
    *,
    is_causal: bool = True,
    prompt_id: int | None = None,
) -> list[list[int]]:
    """Token ids per example: [<eos> if masked] [prompt] text [<eos> pair] <eos>, at most max_length."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token (needed to end and separate inputs)")
    texts = tokenizer([e.text for e in examples], add_special_tokens=False)["input_ids"]
    pairs_at = [i for i, e in enumerate(examples) if e.text_pair is not None]
    pair_ids = dict(
        zip(
            pairs_at,
            tokenizer([examples[i].text_pair for i in pairs_at], add_special_tokens=False)["input_ids"]
            if pairs_at
            else [],
            strict=True,
        )
    )
    head = ([] if is_causal else [eos]) + ([] if prompt_id is None else [prompt_id])
    out = []
    for i, a in enumerate(texts):
        b = pair_ids.get(i)
        room = max_length - len(head) - 1 - (0 if b is None else 1)
        if room < 2:
            raise ValueError(f"max_length={max_length} leaves no room for the input")
        if b is None:
            ids = head + a[:room] + [eos]
        else:
            la, lb = len(a), len(b)
            if la + lb > room:  # longest first: trim the longer until both fit
                short = min(la, lb, room // 2)
                la, lb = (room - short, short) if la >= lb else (short, room - short)
                la, lb = min(la, len(a)), min(lb, len(b))
            ids = [*head, *a[:la], eos, *b[:lb], eos]
        out.append(ids)
    return out


def _batch(rows: Sequence[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def predict(
    model: LoireForSequenceClassification,
    rows: Sequence[list[int]],
    pad_id: int,
    device: torch.device,
    batch_size: int = EVAL_BATCH_SIZE,
) -> list[int]:
    """Predicted label indices; batches of similar length (less padding), results in input order."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    predictions: dict[int, int] = {}
    for chunk in (order[start : start + batch_size] for start in range(0, len(order), batch_size)):
        logits = model(**_batch([rows[i] for i in chunk], pad_id, device)).logits
        predictions.update(zip(chunk, logits.argmax(-1).tolist(), strict=True))
    model.train(was_training)
    return [predictions[i] for i in range(len(rows))]


@dataclass(frozen=True)
class SeedRun:
    seed: int
    test_score: float
    dev_score: float
    best_epoch: int
    epochs_run: int
    steps: int


def _finetune_seed(
    spec: TaskSpec,
    seed: int,
    encoded: dict[str, list[list[int]]],
    labels: dict[str, list[int]],
    make_model: Callable[[int], LoireForSequenceClassification],
    pad_id: int,
    device: torch.device,
    batch_size: int,
    on_log: OnLog | None,
) -> SeedRun:
    from loire.train import TrainingDiverged

    model = make_model(seed).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr
    )
    n = len(encoded["train"])
    per_epoch = math.ceil(n / batch_size)
    total = per_epoch * spec.epochs
    warmup = max(1, int(WARMUP_FRACTION * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.tensor(labels["train"], dtype=torch.long)
    best_dev, best_state, best_epoch, stale, step, epoch = -math.inf, None, 0, 0, 0, 0
    for epoch in range(1, spec.epochs + 1):
        losses = []
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            batch = _batch([encoded["train"][i] for i in index], pad_id, device)
            out = model(**batch, labels=targets[index].to(device))
            if not torch.isfinite(out.loss):
                raise TrainingDiverged(f"task {spec.name!r}, seed {seed}: non-finite loss at step {step}")
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(out.loss.item())
            step += 1
        dev = score(spec, labels["dev"], predict(model, encoded["dev"], pad_id, device))
        logger.info("%s seed %d epoch %d: loss %.4f, dev %s %.4f", spec.name, seed, epoch, losses[-1], spec.metric, dev)
        if on_log is not None:
            on_log(
                {
                    f"downstream/{spec.name}/train_loss": statistics.fmean(losses),
                    f"downstream/{spec.name}/dev_{spec.metric}": dev,
                    f"downstream/{spec.name}/epoch": float(epoch),
                    f"downstream/{spec.name}/seed": float(seed),
                },
                step,
            )
        if dev > best_dev:
            best_dev, best_epoch, stale = dev, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= spec.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    test = score(spec, labels["test"], predict(model, encoded["test"], pad_id, device))
    return SeedRun(seed, test, best_dev, best_epoch, epoch, step)


def _task_result(
    spec: TaskSpec, data: TaskData, runs: Sequence[SeedRun], *, length: int, budget: int | None, started: float
) -> TaskResult:
    """The seeds' runs of one task as its result: mean ± sample std of the test scores, the majority baseline."""
    scores = tuple(r.test_score for r in runs)
    described = {key: getattr(spec, key) for key in ("domain", "paper_task", "substitute", "note", "metric")}
    return TaskResult(
        task=spec.name,
        **described,
        mean=statistics.fmean(scores),
        std=statistics.stdev(scores) if len(scores) > 1 else 0.0,
        scores=scores,
        seeds=tuple(r.seed for r in runs),
        dev_scores=tuple(r.dev_score for r in runs),
        best_epochs=tuple(r.best_epoch for r in runs),
        majority=majority_baseline(spec, data),
        n_train=len(data.train),
        n_dev=len(data.dev),
        n_test=len(data.test),
        max_length=length,
        budget=budget,
        wall_time_s=time.perf_counter() - started,
    )


def finetune_task(
    model_dir: str | os.PathLike[str],
    spec: TaskSpec,
    data: TaskData,
    *,
    seeds: Sequence[int] | None = None,
    budget: int | None = None,
    device: str = "auto",
    batch_size: int = 16,
    max_length: int | None = None,
    on_log: OnLog | None = None,
) -> TaskResult:
    """Fine-tune the stage model in `model_dir` on one task for each seed and score the test split.

    `seeds` default to the catalogue's; `budget` caps the data (see `apply_budget`); `max_length`
    overrides the catalogue's (both are clamped to the model's positions).
    """
    from loire.io import load_model
    from loire.tokenizer import DOMAIN_TOKENS, load_tokenizer
    from loire.train import resolve_device

    started = time.perf_counter()
    run_seeds = tuple(spec.seeds if seeds is None else seeds)
    if not run_seeds:
        raise ValueError("seeds: at least one seed is needed")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    data = apply_budget(data, budget)
    for split in SPLITS:
        if not data.split(split):
            raise TaskDataError(f"task {spec.name!r}: the {split} split is empty ({data.sources.get(split, '?')})")
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(f"{model_dir}: the tokenizer has no pad token")
    source = load_model(model_dir)
    config, base_state = source.config, source.loire_base.state_dict()
    del source
    length = min(max_length or spec.max_length, config.max_position_embeddings)
    prompt_id = None
    if _stage_strategy(model_dir) == "elle":
        token = f"<{spec.domain}>"
        if token in DOMAIN_TOKENS:
            prompt_id = tokenizer.convert_tokens_to_ids(token)
    encoded = {
        s: encode(data.split(s), tokenizer, length, is_causal=config.is_causal, prompt_id=prompt_id) for s in SPLITS
    }
    labels = {s: [e.label for e in data.split(s)] for s in SPLITS}
    torch_device = resolve_device(device)

    def make_model(seed: int) -> LoireForSequenceClassification:
        return load_classifier(
            model_dir,
            spec.num_labels,
            seed=seed,
            pad_token_id=pad_id,
            labels=spec.labels,
            base_state=base_state,
            config=config,
        )

    runs = [
        _finetune_seed(spec, seed, encoded, labels, make_model, pad_id, torch_device, batch_size, on_log)
        for seed in run_seeds
    ]
    result = _task_result(spec, data, runs, length=length, budget=budget, started=started)
    logger.info(
        "%s: %s %.4f ± %.4f (majority %.4f) in %.0f s",
        spec.name,
        spec.metric,
        result.mean,
        result.std,
        result.majority,
        result.wall_time_s,
    )
    return result


# ------------------------------------------------------------------------------------------ many tasks
def evaluate_task(
    model_dir: str | os.PathLike[str],
    spec: TaskSpec,
    data_root: str | os.PathLike[str],
    **options: Any,
) -> TaskResult | TaskFailure:
    """Load one task's data and fine-tune on it; malformed data or divergence → `TaskFailure`."""
    from loire.train import TrainingDiverged

    try:
        data = load_task_data(spec, data_root)
        return finetune_task(model_dir, spec, data, **options)
    except (TaskDataError, TrainingDiverged) as exc:
        logger.warning("task %s failed: %s", spec.name, exc)
        return TaskFailure(task=spec.name, domain=spec.domain, error=str(exc))


def evaluate_downstream(
    model_dir: str | os.PathLike[str],
    tasks: str | Sequence[str] = "all",
    data_root: str | os.PathLike[str] | None = None,
    budget: int | None = None,
    seeds: int | Sequence[int] | None = None,
    *,
    catalogue: Mapping[str, TaskSpec] | str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int = 16,
    max_length: int | None = None,
    on_log: OnLog | None = None,
    on_result: Callable[[TaskResult | TaskFailure], None] | None = None,
) -> list[TaskResult | TaskFailure]:
    """Fine-tune and score the stage model on each task, one after another.

    `seeds`: a count N (seeds 0..N−1), a list, or None (the catalogue's). The model folder, the task
    names and the budget are checked before any task runs (ValueError); a task whose data is
    malformed becomes a `TaskFailure` carrying the error, and the remaining tasks still run.
    """
    specs = catalogue if isinstance(catalogue, Mapping) else load_catalogue(catalogue)
    chosen = select_tasks(specs, tasks)
    if budget is not None:
        budget_caps(budget)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds={seeds} must be >= 1")
        seeds = tuple(range(seeds))
    from loire.io import load_model
    from loire.tokenizer import load_tokenizer

    load_tokenizer(model_dir)  # fail before the first task on a folder without model or tokenizer
    load_model(model_dir)
    root = default_data_root() if data_root is None else data_root
    results: list[TaskResult | TaskFailure] = []
    for spec in chosen:
        result = evaluate_task(
            model_dir,
            spec,
            root,
            seeds=seeds,
            budget=budget,
            device=device,
            batch_size=batch_size,
            max_length=max_length,
            on_log=on_log,
        )
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def scores_frame(results: Sequence[TaskResult | TaskFailure | Mapping[str, Any]]) -> pd.DataFrame:
    """The tasks that were scored (results or their dicts; failures left out), one row each, index `task`:
    domain, metric, mean, std, majority (the majority-class baseline)."""
    import pandas as pd

    rows = [r.to_dict() if isinstance(r, TaskResult | TaskFailure) else dict(r) for r in results]
    done = [r for r in rows if r.get("ok", True) and r.get("mean") is not None]
    columns = ["task", "domain", "metric", "mean", "std", "majority"]
    return pd.DataFrame([{c: r.get(c) for c in columns} for r in done], columns=columns).set_index("task")


def average_score(
    results: Sequence[TaskResult | TaskFailure | Mapping[str, Any]], column: str = "mean"
) -> float | None:
    """The downstream average: the mean over the scored tasks of `column` (their mean score, or `majority`);
    None when no task was scored. The one definition the CLI, the summary and MLflow's `downstream/average` use."""
    values = [float(v) for v in scores_frame(results)[column] if v is not None]
    return statistics.fmean(values) if values else None


def summary(results: Sequence[TaskResult | TaskFailure], **meta: Any) -> dict[str, Any]:
    """A JSON-ready record: `meta`, every result, failures, and the average of the task means."""
    return {
        **meta,
        "results": [r.to_dict() for r in results],
        "failures": [r.to_dict() for r in results if isinstance(r, TaskFailure)],
        "average": average_score(results),
        "average_majority": average_score(results, "majority"),
    }


__all__ = [
    "EVAL_BATCH_SIZE",
    "MAX_GRAD_NORM",
    "WARMUP_FRACTION",
    "WEIGHT_DECAY",
    "SeedRun",
    "TaskFailure",
    "TaskResult",
    "_stage_strategy",
    "average_score",
    "encode",
    "evaluate_downstream",
    "evaluate_task",
    "finetune_task",
    "load_classifier",
    "predict",
    "scores_frame",
    "summary",
]
