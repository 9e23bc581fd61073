"""Evaluation metrics: perplexity, ELLE's AP / AP+, a growth check, and the downstream tasks' accuracy and F1.

Perplexity is token-weighted: the negative log-likelihoods of every predicted token of every block
are summed (in float64) and divided by the number of predicted tokens, so a short block weighs less
than a long one (it is never a mean of per-block perplexities).

- Causal LMs (`model.config.is_causal`): exp(next-token NLL per predicted token).
- Masked LMs: pseudo-perplexity as in ELLE / BERT, exp(masked-LM loss): a fixed, seeded random
  subset of positions of each block is replaced by the mask token and the NLL of the original tokens
  is taken at those positions only. With the same `mask_seed` the masked positions (hence the value)
  are identical across calls, batch sizes and models, so perplexities of different stages compare.

Packed blocks are a (N, T) integer tensor; the value -100 (`PAD`) marks padding: padded positions
are neither fed to the model (attention mask 0) nor predicted.

AP and AP+ follow ELLE (Qin et al., "ELLE: Efficient Lifelong Pre-training for Emerging Data",
ACL Findings 2022, arXiv 2203.06311), with PPL_{t,i} the perplexity on domain i's validation set
after training stage t (domain t is the one trained at stage t, so the matrix is lower-triangular):

- AP_t = exp((1/t) Σ_{i≤t} log PPL_{t,i}), the geometric mean over the domains seen so far;
- AP+_t = (1/(t−1)) Σ_{i<t} (PPL_{t,i} − PPL_{i,i}), the mean perplexity increase on earlier
  domains since each was trained (forgetting; negative = the model improved on old domains).

Lower is better for both. Caveat (growth-methods.md §3.8): ELLE's repository has no AP script and
these definitions are recalled from the paper; the exact normalisation (geometric vs arithmetic
mean, sign of AP+) is not confirmed. They are the definitions stated in the LOIRE issue and are
tested on a hand-computed matrix.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

PAD = -100  # padding in packed blocks (the ignore index of the model losses)


# --------------------------------------------------------------------------- perplexity


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _output_tensor(out: Any) -> torch.Tensor:
    """Logits of a model output (or `last_hidden_state` of a base model, or a bare tensor/tuple)."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"model output {type(out).__name__} has neither .logits nor .last_hidden_state")


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; every submodule's train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _is_causal(model: nn.Module) -> bool:
    value = getattr(getattr(model, "config", None), "is_causal", None)
    if not isinstance(value, bool):
        raise ValueError(
            f"model.config.is_causal={value!r}: perplexity needs a bool (True: causal LM, False: masked LM)"
        )
    return value


def _check_blocks(blocks: Any, vocab_size: int | None) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2:
        shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"blocks must be a 2-D (N, T) tensor of token ids, got {shape}")
    if blocks.dtype.is_floating_point or blocks.dtype.is_complex or blocks.dtype == torch.bool:
        raise ValueError(f"blocks must hold integer token ids, got dtype {blocks.dtype}")
    blocks = blocks.long()
    real = blocks[blocks != PAD]
    if real.numel() and (int(real.min()) < 0 or (vocab_size is not None and int(real.max()) >= vocab_size)):
        raise ValueError(
            f"blocks hold ids in [{int(real.min())}, {int(real.max())}]; allowed: [0, {vocab_size}) and {PAD} (padding)"
        )
    return blocks


def _masked_positions(valid: torch.Tensor, mask_seed: int, mask_prob: float) -> torch.Tensor:
    """Deterministic masked positions (N, T): each valid position with probability mask_prob, at least one per block.

    One uniform draw per position from a generator seeded with `mask_seed`, made for the whole
    (N, T) tensor at once, so the positions do not depend on the batch size.
    """
    generator = torch.Generator().manual_seed(mask_seed)
    draws = torch.rand(valid.shape, generator=generator, dtype=torch.float64)
    masked = (draws < mask_prob) & valid
    empty = ~masked.any(dim=1) & valid.any(dim=1)
    if empty.any():  # a block with no masked position still contributes its most likely one
        rows = empty.nonzero().squeeze(1)
        first = draws.masked_fill(~valid, 2.0)[rows].argmin(dim=1)
        masked[rows, first] = True
    return masked


@torch.no_grad()
def perplexity(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    mask_seed: int = 0,
    mask_prob: float = 0.15,
    mask_token_id: int | None = None,
) -> float:
    """Token-weighted perplexity of `model` over packed `blocks` (N, T); `PAD` (-100) marks padding.

    Causal LMs (`model.config.is_causal` True): exp(Σ next-token NLL / number of predicted tokens);
    position j is predicted when it and position j − 1 are real tokens.

    Masked LMs (`is_causal` False): ELLE/BERT-style MLM pseudo-perplexity, exp(masked-LM loss).
    Each real position is masked with probability `mask_prob`, drawn once for the whole tensor from a
    `torch.Generator` seeded with `mask_seed` (a block whose draw masks nothing gets its single
    lowest-draw position masked); masked inputs become `mask_token_id` (all of them: no 80/10/10
    corruption at evaluation), and only masked positions are scored. The value is deterministic for
    a given `mask_seed`, whatever `batch_size`.

    Runs in eval mode without gradients; every submodule's train/eval flag is restored afterwards.
    NLLs are computed in at least float32 and summed in float64. Works with any module whose
    `config.is_causal` is a bool and whose output has `.logits` (or is the logits tensor).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    causal = _is_causal(model)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    blocks = _check_blocks(blocks, vocab_size if isinstance(vocab_size, int) else None)
    valid = blocks != PAD
    if causal:
        targets = torch.zeros_like(valid)
        targets[:, 1:] = valid[:, 1:] & valid[:, :-1]
        inputs = blocks.clamp(min=0)
    else:
        if mask_token_id is None or isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int):
            raise ValueError(f"mask_token_id={mask_token_id!r}: a masked LM needs the int id of its mask token")
        if mask_token_id < 0 or (isinstance(vocab_size, int) and mask_token_id >= vocab_size):
            raise ValueError(f"mask_token_id={mask_token_id} must lie in [0, {vocab_size})")
        if isinstance(mask_prob, bool) or not isinstance(mask_prob, (int, float)) or not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob={mask_prob!r} must be a number in (0, 1]")
        if isinstance(mask_seed, bool) or not isinstance(mask_seed, int):
            raise ValueError(f"mask_seed={mask_seed!r} must be an int")
        targets = _masked_positions(valid, mask_seed, float(mask_prob))
        inputs = blocks.clamp(min=0).masked_fill(targets, mask_token_id)
    keep = targets.any(dim=1)  # blocks with nothing to predict are skipped
    inputs, blocks, valid, targets = inputs[keep], blocks[keep], valid[keep], targets[keep]
    if not targets.any():
        raise ValueError("blocks hold no token to predict (all padding, or causal blocks shorter than 2 tokens)")

    device = _device(model)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with _eval_mode(model):
        for start in range(0, inputs.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            ids, is_real, scored = inputs[sl].to(device), valid[sl].to(device), targets[sl].to(device)
            attention_mask = None if bool(is_real.all()) else is_real.long()
            logits = _output_tensor(model(input_ids=ids, attention_mask=attention_mask))
            labels = blocks[sl].to(device)
            if causal:  # position j − 1 predicts token j
                logits, labels, scored = logits[:, :-1], labels[:, 1:], scored[:, 1:]
            picked = logits[scored]
            picked = picked.to(torch.promote_types(picked.dtype, torch.float32))
            nll = F.cross_entropy(picked, labels[scored], reduction="none")
            total += nll.double().sum().cpu()
            count += int(scored.sum())
    mean_nll = float(total) / count
    logger.debug("perplexity over %d tokens of %d blocks: mean NLL %.6f", count, inputs.shape[0], mean_nll)
    return math.exp(mean_nll)


# --------------------------------------------------------------------------- AP / AP+


def _check_ppl(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a finite perplexity > 0")
    return float(value)


def average_perplexity(ppl_row: Sequence[float]) -> float:
    """ELLE's AP_t = exp((1/t) Σ_{i≤t} log PPL_{t,i}): geometric mean of a row of perplexities.

    `ppl_row` holds PPL_{t,1..t}, the perplexities on the t domains seen so far after stage t.
    ELLE: Qin et al., ACL Findings 2022, arXiv 2203.06311. Lower is better. Caveat: the definition is
    recalled from the paper, not from ELLE's code (growth-methods.md §3.8).
    """
    if isinstance(ppl_row, (str, bytes)) or not isinstance(ppl_row, Sequence) or len(ppl_row) == 0:
        raise ValueError(f"ppl_row={ppl_row!r} must be a non-empty sequence of perplexities")
    logs = [math.log(_check_ppl(f"ppl_row[{i}]", v)) for i, v in enumerate(ppl_row)]
    return math.exp(math.fsum(logs) / len(logs))


def average_increased_perplexity(matrix: Sequence[Sequence[float]], t: int) -> float | None:
    """ELLE's AP+_t = (1/(t−1)) Σ_{i<t} (PPL_{t,i} − PPL_{i,i}); None for t = 1.

    `matrix[s][i]` is the perplexity on domain i after stage s, both 0-based inside the lower-triangular
    matrix (row s holds at least s + 1 entries); `t` is the 1-based stage. The arithmetic mean of how
    much each earlier domain's perplexity rose since it was trained: forgetting, lower is better,
    negative when old domains improved. ELLE: Qin et al., ACL Findings 2022, arXiv 2203.06311.
    Caveat: recalled from the paper (growth-methods.md §3.8); normalisation and sign are unconfirmed.
    """
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"t={t!r} must be an int >= 1 (1-based stage)")
    if len(matrix) < t:
        raise ValueError(f"t={t} but matrix has only {len(matrix)} row(s)")
    for s in range(t):
        if len(matrix[s]) < s + 1:
            raise ValueError(f"matrix[{s}] has {len(matrix[s])} entries; a lower-triangular row s needs s + 1")
    if t == 1:
        return None
    row = matrix[t - 1]
    increases = [
        _check_ppl(f"matrix[{t - 1}][{i}]", row[i]) - _check_ppl(f"matrix[{i}][{i}]", matrix[i][i])
        for i in range(t - 1)
    ]
    return math.fsum(increases) / (t - 1)


def learnt_perplexity(
    rows: Sequence[Mapping[str, float]], learnt: Sequence[Sequence[str]]
) -> tuple[float, float | None]:
    """AP and AP+ after the last of `rows` (`rows[s]`: domain -> perplexity after stage s + 1) when stage s + 1
    trained on the domains `learnt[s]` (its own, and any it carried for a stage that was not promoted).

    ELLE's AP / AP+ with one domain per stage generalised to several: AP is the geometric mean over every
    (stage, domain) learnt so far, AP+ the arithmetic mean of each one's rise since its stage (None at stage 1).
    With one domain per stage both equal `average_perplexity` / `average_increased_perplexity` of the matrix.
    """
    last, t = rows[-1], len(rows)
    ap = average_perplexity([_check_ppl(f"rows[{t - 1}][{d!r}]", last[d]) for ds in learnt[:t] for d in ds])
    rises = [
        _check_ppl(f"rows[{t - 1}][{d!r}]", last[d]) - _check_ppl(f"rows[{s}][{d!r}]", rows[s][d])
        for s, ds in enumerate(learnt[: t - 1])
        for d in ds
    ]
    return ap, (math.fsum(rises) / len(rises) if rises else None)


def ppl_frame(
    domains: Sequence[str], rows: Sequence[Mapping[str, float]], carried: Sequence[Sequence[str]] = ()
) -> pd.DataFrame:
    """The stage × domain perplexity table of a lifelong record, with AP and AP+ per stage, as a DataFrame.

    `rows[t]` maps domain → perplexity after stage t + 1 (a stage record's `ppl_matrix`) and `domains[t]` is the
    domain trained at stage t + 1; `carried[t]` (optional) the domains stage t + 1 also trained on for a stage
    that was not promoted, which count as learnt there. Index `stage` (1-based); columns `domain`, one per domain
    (NaN where not measured), `AP` over the seen domains measured and `AP+` over the earlier domains measured both
    at that stage and at their own (NaN at stage 1). The Prefect table artifact and the MLflow table are built
    from it.
    """
    import pandas as pd

    rows = [dict(row) for row in rows]
    learnt = [[*(carried[t] if t < len(carried) else ()), d] for t, d in enumerate(domains)]
    ap, ap_plus = [], []
    for t, row in enumerate(rows):  # a domain may arrive again (a new batch): it then counts once per stage
        seen = [row[d] for ds in learnt[: t + 1] for d in ds if d in row]
        rises = [row[d] - rows[s][d] for s, ds in enumerate(learnt[:t]) for d in ds if d in row and d in rows[s]]
        ap.append(average_perplexity(seen) if seen else math.nan)
        ap_plus.append(math.fsum(rises) / len(rises) if rises else math.nan)
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(d for ds in learnt for d in ds)), dtype=float)
    frame = frame.assign(AP=ap, **{"AP+": ap_plus})
    frame.insert(0, "domain", list(domains[: len(rows)]) + [None] * (len(rows) - len(domains)))
    frame.index = pd.RangeIndex(1, len(rows) + 1, name="stage")
    return frame


# --------------------------------------------------------------------------- growth check


@torch.no_grad()
def max_abs_logit_diff(old: nn.Module, new: nn.Module, input_ids: torch.Tensor, *, dtype=torch.float64) -> float:
    """max |new(x) − old(x)| over the logits (or `last_hidden_state` of a base model) for `input_ids`.

    Both models are deep-copied, cast to `dtype` and put in eval mode: the arguments are not modified.
    Use float64 to see the exactness of a growth operator (≈ 1e-14) rather than float32 rounding.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a 2-D (B, T) tensor of token ids")
    outputs = []
    for model in (old, new):
        twin = copy.deepcopy(model).to(dtype).eval()
        outputs.append(_output_tensor(twin(input_ids=input_ids.to(_device(twin)))))
    if outputs[0].shape != outputs[1].shape:
        raise ValueError(f"outputs differ in shape: {tuple(outputs[0].shape)} vs {tuple(outputs[1].shape)}")
    return float((outputs[0] - outputs[1].to(outputs[0].device)).abs().max())


# --------------------------------------------------------------------------- classification
# scikit-learn's definitions, without the dependency (tests/test_downstream.py compares them).


def _check_pair(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("no examples to score")


def _per_label(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable]
) -> list[tuple[int, int, int]]:
    """(true positives, false positives, false negatives) for each label."""
    tp, fp, fn = Counter(), Counter(), Counter()
    for t, p in zip(y_true, y_pred, strict=True):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    return [(tp[label], fp[label], fn[label]) for label in labels]


def _f1(tp: int, fp: int, fn: int) -> float:
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def accuracy(y_true: Sequence[Hashable], y_pred: Sequence[Hashable]) -> float:
    """Share of exact matches."""
    _check_pair(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)


def micro_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None) -> float:
    """F1 of the true / false positives and false negatives summed over `labels`.

    As sklearn's `f1_score(average="micro", labels=...)`. Over all labels (the default: every label in
    y_true or y_pred) this equals accuracy for single-label classification; a subset of labels
    (e.g. without a "no relation" class) makes it differ. 0 when there is nothing to count.
    """
    _check_pair(y_true, y_pred)
    chosen = sorted(set(y_true) | set(y_pred), key=str) if labels is None else list(labels)
    counts = _per_label(y_true, y_pred, chosen)
    return _f1(sum(c[0] for c in counts), sum(c[1] for c in counts), sum(c[2] for c in counts))


def macro_f1(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable] | None = None) -> float:
    """Unweighted mean over `labels` of each label's F1 = 2·TP / (2·TP + FP + FN).

    As sklearn's `f1_score(average="macro", labels=..., zero_division=0)`: a label with no true and
    no predicted example scores 0 and still counts in the mean (so passing the full label set
    penalises a test set that lacks a label); default labels: every label in y_true or y_pred.
    """
    _check_pair(y_true, y_pred)
    chosen = sorted(set(y_true) | set(y_pred), key=str) if labels is None else list(labels)
    if not chosen:
        raise ValueError("labels is empty")
    return sum(_f1(*c) for c in _per_label(y_true, y_pred, chosen)) / len(chosen)


# The downstream tasks' metrics by catalogue name (DSP's conventions, see loire/tasks/dsp.yaml).
CLASSIFICATION_METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy,
    "micro_f1": micro_f1,
    "macro_f1": macro_f1,
}


__all__ = [
    "CLASSIFICATION_METRICS",
    "PAD",
    "accuracy",
    "average_increased_perplexity",
    "average_perplexity",
    "learnt_perplexity",
    "macro_f1",
    "max_abs_logit_diff",
    "micro_f1",
    "perplexity",
    "ppl_frame",
]
