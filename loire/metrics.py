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
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

PAD = -100  # padding in packed blocks (the ignore index of the model losses)
TABLE_KEYS = ("stage", "AP", "AP+")  # reserved column names of PerplexityMatrix.table()


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


@dataclass
class PerplexityMatrix:
    """PPL_{t,i} accumulated stage by stage; stages are 1-based, domain i is the one trained at stage i.

    `domains` fixes the stage order up front; left empty, each stage's new domain is registered on
    first use (it must then appear first at its own stage, which keeps the matrix lower-triangular).
    Recording a (stage, domain) pair again overwrites it (a re-evaluated stage).
    """

    domains: list[str] = field(default_factory=list)
    values: dict[int, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.domains = list(self.domains)
        for i, domain in enumerate(self.domains):
            self._check_domain_name(f"domains[{i}]", domain)
        if len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains={self.domains} repeats a domain; each stage trains a new one")
        recorded, self.values = self.values, {}
        for stage, row in recorded.items():
            for domain, ppl in row.items():
                self.record(int(stage), domain, ppl)

    @staticmethod
    def _check_domain_name(name: str, domain: Any) -> None:
        if not isinstance(domain, str) or not domain:
            raise ValueError(f"{name}={domain!r} must be a non-empty str")
        if domain in TABLE_KEYS:
            raise ValueError(f"{name}={domain!r} is reserved for a table column; not allowed: {list(TABLE_KEYS)}")

    def record(self, stage: int, domain: str, ppl: float) -> None:
        """Store PPL_{stage, domain}: perplexity on `domain` after training `stage` (1-based)."""
        if isinstance(stage, bool) or not isinstance(stage, int) or stage < 1:
            raise ValueError(f"stage={stage!r} must be an int >= 1 (stages are 1-based, as in AP_t)")
        self._check_domain_name("domain", domain)
        ppl = _check_ppl("ppl", ppl)
        if domain not in self.domains:
            if stage != len(self.domains) + 1:
                raise ValueError(
                    f"domain={domain!r} is unknown; a new domain can only be recorded at its own stage "
                    f"{len(self.domains) + 1}, not stage {stage} (known: {self.domains})"
                )
            self.domains.append(domain)
        first = self.domains.index(domain) + 1
        if first > stage:
            raise ValueError(
                f"domain={domain!r} is trained at stage {first}; PPL at stage {stage} lies above the diagonal"
            )
        row = self.values.setdefault(stage, {})
        if domain in row:
            logger.info("PPL at stage %d on %s overwritten: %.4f -> %.4f", stage, domain, row[domain], ppl)
        row[domain] = ppl

    def get(self, stage: int, domain: str) -> float | None:
        """PPL_{stage, domain}, or None when not recorded."""
        return self.values.get(stage, {}).get(domain)

    @property
    def stages(self) -> list[int]:
        """Stages with at least one recorded value, ascending."""
        return sorted(self.values)

    def row(self, t: int) -> list[float]:
        """PPL_{t,1..t}; ValueError naming what is missing."""
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"t={t!r} must be an int >= 1 (1-based stage)")
        if len(self.domains) < t:
            raise ValueError(f"stage {t} has no domain yet (known domains: {self.domains})")
        missing = [d for d in self.domains[:t] if self.get(t, d) is None]
        if missing:
            raise ValueError(f"stage {t} lacks PPL on domain(s) {missing}")
        return [self.values[t][d] for d in self.domains[:t]]

    def matrix(self, t: int) -> list[list[float]]:
        """Lower-triangular rows 1..t (0-based lists, as `average_increased_perplexity` takes)."""
        return [self.row(s) for s in range(1, t + 1)]

    def ap(self, t: int) -> float:
        """AP_t (see `average_perplexity`)."""
        return average_perplexity(self.row(t))

    def ap_plus(self, t: int) -> float | None:
        """AP+_t (see `average_increased_perplexity`); None for t = 1."""
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"t={t!r} must be an int >= 1 (1-based stage)")
        if t == 1:
            return None
        row = self.row(t)
        missing = [s for s in range(1, t) if self.get(s, self.domains[s - 1]) is None]
        if missing:
            raise ValueError(f"AP+ at stage {t} needs each earlier domain's PPL at its own stage; missing: {missing}")
        increases = [row[i] - self.values[i + 1][self.domains[i]] for i in range(t - 1)]
        return math.fsum(increases) / (t - 1)

    def table(self) -> list[dict[str, Any]]:
        """One row per recorded stage: {"stage": t, <domain>: PPL_{t,domain}..., "AP": …, "AP+": …}.

        AP / AP+ are None where the row (or an earlier diagonal entry) is incomplete.
        """
        rows = []
        for t in self.stages:
            entry: dict[str, Any] = {"stage": t}
            entry.update({d: self.values[t][d] for d in self.domains if d in self.values[t]})
            try:
                entry["AP"] = self.ap(t)
            except ValueError:
                entry["AP"] = None
            try:
                entry["AP+"] = self.ap_plus(t)
            except ValueError:
                entry["AP+"] = None
            rows.append(entry)
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "ppl": {str(t): dict(self.values[t]) for t in self.stages},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerplexityMatrix:
        if not isinstance(data, Mapping):
            raise ValueError(f"PerplexityMatrix data must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"domains", "ppl"})
        if unknown:
            raise ValueError(f"PerplexityMatrix: unknown key(s) {unknown}; allowed: domains, ppl")
        ppl = data.get("ppl", {})
        if not isinstance(ppl, Mapping):
            raise ValueError("PerplexityMatrix.ppl must map stage -> {domain: ppl}")
        values: dict[int, dict[str, float]] = {}
        for key, row in ppl.items():
            try:
                stage = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"PerplexityMatrix.ppl key {key!r} must be a stage number") from None
            if not isinstance(row, Mapping):
                raise ValueError(f"PerplexityMatrix.ppl[{key!r}] must map domain -> ppl")
            values[stage] = dict(row)
        return cls(domains=list(data.get("domains", [])), values=dict(sorted(values.items())))

    def to_json(self, **kwargs: Any) -> str:
        """JSON text {"domains": [...], "ppl": {"<stage>": {"<domain>": ppl}}}; kwargs go to json.dumps."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> PerplexityMatrix:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"PerplexityMatrix JSON is invalid: {err}") from None
        return cls.from_dict(data)


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
    "PerplexityMatrix",
    "accuracy",
    "average_increased_perplexity",
    "average_perplexity",
    "macro_f1",
    "max_abs_logit_diff",
    "micro_f1",
    "perplexity",
]
