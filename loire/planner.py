"""The growth planner: where and when to grow, decided from the data of the arriving domain.

The paper's ladder grows one preset dimension at the start of every stage whether the model needs it or
not. The planner instead probes a few exact growths of the current model on the new domain and keeps
the one that reaches the lowest held-out loss for the compute, or none at all.

The rule:

1. **Equal-compute probes.** Every candidate (no growth; each dimension alone at x2; hidden and FFN
   together at x1.5) is grown exactly from the same model and trained on the same batches, in the same
   order, for the same FLOPs `P` (a bigger model takes fewer steps); all probes together spend
   `probe_share` of the stage's FLOP budget. Held-out loss is measured on training blocks the probes
   never train on (the domain's validation split stays untouched for the stage's evaluation). The
   growth is exact, so every candidate starts at the same loss: the comparison is paired, and what
   differs is how much each model learns per FLOP.
2. **Grow or continue (the saturation test).** The current model has room when continuing without
   growth is not beaten: the best growth must lower the held-out loss by more than twice the paired
   standard error of the per-block loss difference (growth vs no growth, same blocks). Below that the
   difference is noise, and the stage trains without growth.
3. **Ongoing cost.** Every stage has a FLOP budget (`StageSpec.flops_budget`), so a model `r` times as
   expensive per token trains `r` times fewer tokens in this and every later stage: the equal-compute
   probe measures that trade here, and the decision assumes it holds in later stages (where the
   capacity keeps helping as well). `future_weight` > 0 adds a pessimistic charge of `s · log2(r)`
   nats per later stage, `s` the no-growth probe's loss drop per doubling of compute over its second
   half (the marginal value of compute), as if the capacity stopped paying after this stage.

Everything is deterministic given the seed (same batches for every candidate, seeded growth noise).

Limit (measured, `bench/planner_horizon.py`): probes see a growth only if it pays within their horizon.
On the `long` CPU benchmark the width growths overtake no growth only in the last third of a stage (and
pay more in later stages), so every probe within `probe_share` ranks no growth first there, while the
fixed ladder ends 6.4 AP lower; at the `short` budget no growth is right and the planner beats the
ladder (docs/training.md).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch

from loire.config import LoireConfig
from loire.flops import flops_per_step, head_of
from loire.grow import grow
from loire.metrics import max_abs_logit_diff, perplexity
from loire.model import LoirePreTrainedModel
from loire.schedule import resolve_growth
from loire.train import TrainConfig, train

__all__ = ["Candidate", "GrowthDecision", "PlannerConfig", "Probe", "candidates", "plan_growth", "probes_frame"]

logger = logging.getLogger(__name__)

DIMENSIONS = ("hidden", "ffn", "heads", "layers")
# Probes are compared on a constant learning rate (after a short warmup): the stage's cosine decay would
# make a short probe's last steps worthless and favour whichever candidate decays first.
PROBE_MIN_LR_RATIO = 1.0
MIN_PROBE_STEPS = 4  # below this a probe measures the warmup, not the model


@dataclass(frozen=True)
class PlannerConfig:
    """How much the planner may spend and what it considers.

    - `probe_share`: all probes together, as a share of the stage's FLOP budget (default 20%: six
      candidates get ~3% each, ~50 steps of the current model at the `long` budget's stage 2).
    - `factors`: growth factors tried for each dimension alone (x2: the ladder's own step).
    - `combine`: also try hidden and FFN grown together at x1.5.
    - `eval_blocks`: held-out training blocks the probes never train on, for their loss.
    - `z`: how many paired standard errors a growth must win by (2: about 97.5% one-sided).
    - `future_weight`: weight of the pessimistic ongoing-cost charge per later stage (0: none).
    """

    probe_share: float = 0.2
    factors: tuple[float, ...] = (2.0,)
    combine: bool = True
    eval_blocks: int = 32
    z: float = 2.0
    future_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.probe_share < 1:
            raise ValueError(f"PlannerConfig.probe_share={self.probe_share!r} must be in (0, 1)")
        if not self.factors or any(f <= 1 for f in self.factors):
            raise ValueError(f"PlannerConfig.factors={self.factors!r} must be non-empty, each > 1")
        if self.eval_blocks < 1:
            raise ValueError(f"PlannerConfig.eval_blocks={self.eval_blocks!r} must be >= 1")
        if self.future_weight < 0:
            raise ValueError(f"PlannerConfig.future_weight={self.future_weight!r} must be >= 0")


@dataclass(frozen=True)
class Candidate:
    """A growth to probe: its name and the new totals (empty: continue without growth)."""

    name: str
    targets: dict[str, int]


@dataclass(frozen=True)
class Probe:
    """What one candidate's probe measured."""

    name: str
    targets: dict[str, int]
    parameters: int
    cost_ratio: float  # training FLOPs per token, relative to the current model
    steps: int
    flops: float
    loss_start: float
    loss_half: float
    loss: float
    max_abs_logit_diff: float
    block_losses: list[float] = field(default_factory=list, repr=False)
    score: float = math.nan
    gain: float = math.nan  # mean per-block loss below no growth (after the charge)
    gain_se: float = math.nan  # its paired standard error


@dataclass(frozen=True)
class GrowthDecision:
    """The planner's choice, why, and every probe (what `stage.json` records under growth.decision)."""

    chosen: str
    targets: dict[str, int]
    reason: str
    marginal_rate: float  # s: the no-growth probe's loss drop per doubling of compute (nats)
    later_stages: int
    probe_flops: float
    budget_flops: float
    probes: list[Probe] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dims(config: LoireConfig) -> dict[str, int]:
    return {
        "hidden": config.hidden_size,
        "ffn": config.intermediate_size,
        "heads": config.num_attention_heads,
        "layers": config.num_hidden_layers,
    }


def candidates(config: LoireConfig, planner: PlannerConfig) -> list[Candidate]:
    """No growth, each dimension alone at every factor, and (optionally) hidden + FFN together.

    Sizes round up to whole units (hidden to whole heads; always at least one more); duplicates dropped."""
    out = [Candidate("none", {})]
    seen: set[tuple[tuple[str, int], ...]] = {()}

    def add(targets: dict[str, int]) -> None:
        key = tuple(sorted(targets.items()))
        if key not in seen:
            seen.add(key)
            out.append(Candidate(" ".join(f"{d}={n}" for d, n in targets.items()), targets))

    def sized(grow: dict[str, str]) -> dict[str, int]:
        # resolve_growth rounds hidden up to whole heads (hidden = heads x head_dim stays reachable)
        targets = resolve_growth(grow, config, "planner")
        return {d: max(n, _dims(config)[d] + 1) for d, n in targets.items()}

    for dim in DIMENSIONS:
        for factor in planner.factors:
            add(sized({dim: f"x{factor:g}"}))
    if planner.combine:
        add(sized({d: "x1.5" for d in ("hidden", "ffn")}))
    return out


def _loss(model: LoirePreTrainedModel, blocks: torch.Tensor, mask_token_id: int | None) -> float:
    return math.log(perplexity(model, blocks, mask_token_id=mask_token_id))


def _block_losses(model: LoirePreTrainedModel, blocks: torch.Tensor, mask_token_id: int | None) -> list[float]:
    """Mean loss of each held-out block: the unit of the paired comparison."""
    return [_loss(model, blocks[i : i + 1], mask_token_id) for i in range(blocks.shape[0])]


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over blocks and its standard error."""
    diffs = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    se = float(diffs.std(unbiased=True) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.inf
    return float(diffs.mean()), se


def _probe(
    start: LoirePreTrainedModel,
    cand: Candidate,
    train_blocks: torch.Tensor,
    held_out: torch.Tensor,
    *,
    flops: float,
    base_step_flops: float,
    train_config: Callable[[int], TrainConfig],
    seed: int,
    init: str,
    mask_token_id: int | None,
) -> Probe:
    """Grow `start` exactly to the candidate, train it for `flops`, measure held-out loss at half and end."""
    model = grow(start, **cand.targets, seed=seed, init=init) if cand.targets else copy.deepcopy(start)
    diff = max_abs_logit_diff(start, model, held_out[:2]) if cand.targets else 0.0
    step_flops = _step_flops(model.config, train_config(1).batch_size, held_out.shape[1])
    steps = max(MIN_PROBE_STEPS, int(flops // step_flops))
    half = max(1, steps // 2)
    loss_start = _loss(model, held_out, mask_token_id)
    seen: dict[int, float] = {}

    def on_log(_metrics: dict[str, float], step: int) -> None:
        if step == half:
            seen[half] = _loss(model, held_out, mask_token_id)

    config = dataclasses.replace(train_config(steps), log_every=half)
    result = train(model, train_blocks, config, mask_token_id=mask_token_id, on_log=on_log)
    blocks = _block_losses(model, held_out, mask_token_id)
    loss = _loss(model, held_out, mask_token_id)
    return Probe(
        name=cand.name,
        targets=cand.targets,
        parameters=sum(p.numel() for p in model.parameters()),
        cost_ratio=step_flops / base_step_flops,
        steps=steps,
        flops=result.flops,
        loss_start=loss_start,
        loss_half=seen.get(half, loss),
        loss=loss,
        max_abs_logit_diff=diff,
        block_losses=blocks,
    )


def plan_growth(
    model: LoirePreTrainedModel,
    train_blocks: torch.Tensor,
    *,
    budget_flops: float,
    later_stages: int,
    lr: float,
    batch_size: int,
    warmup_steps: int,
    seed: int,
    init: str = "pad",
    planner: PlannerConfig | None = None,
    mask_token_id: int | None = None,
) -> GrowthDecision:
    """Probe every candidate growth of `model` on `train_blocks` and decide (see the module docstring).

    `budget_flops` is the stage's FLOP budget (the probes spend `probe_share` of it), `later_stages` the
    stages still to come after this one (K in the ongoing cost). The input model is not modified.
    """
    planner = planner or PlannerConfig()
    if train_blocks.shape[0] <= planner.eval_blocks:
        raise ValueError(
            f"the growth planner needs more than eval_blocks={planner.eval_blocks} training blocks, "
            f"got {train_blocks.shape[0]}"
        )
    held_out, probe_blocks = train_blocks[-planner.eval_blocks :], train_blocks[: -planner.eval_blocks]
    cands = candidates(model.config, planner)
    per_probe = planner.probe_share * budget_flops / len(cands)
    base_step = _step_flops(model.config, batch_size, train_blocks.shape[1])

    def train_config(steps: int) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            min_lr_ratio=PROBE_MIN_LR_RATIO,
            warmup_steps=min(warmup_steps, max(0, steps // 4)),
            seed=seed,
            progress=False,
        )

    probes = [
        _probe(
            model,
            c,
            probe_blocks,
            held_out,
            flops=per_probe,
            base_step_flops=base_step,
            train_config=train_config,
            seed=seed,
            init=init,
            mask_token_id=mask_token_id,
        )
        for c in cands
    ]
    none = probes[0]
    # s: loss drop per doubling of compute over the no-growth probe's second half (never negative).
    rate = max(0.0, none.loss_half - none.loss)
    charge = planner.future_weight * later_stages * rate
    scored = []
    for p in probes:
        cost = charge * math.log2(p.cost_ratio)
        gain, se = _paired(none.block_losses, p.block_losses) if p.targets else (0.0, 0.0)
        scored.append(dataclasses.replace(p, score=p.loss + cost, gain=gain - cost, gain_se=se))
    growths = [p for p in scored if p.targets]
    best_growth = min(growths, key=lambda p: (p.score, p.cost_ratio)) if growths else None
    grows = best_growth is not None and best_growth.gain > planner.z * best_growth.gain_se
    best = best_growth if grows else scored[0]
    if best_growth is None:
        reason = "no growth candidate"
    else:
        verdict = "grow" if grows else "continue without growth"
        reason = (
            f"{verdict}: best growth {best_growth.name} reaches held-out loss {best_growth.loss:.4f} vs "
            f"{none.loss:.4f} without growth at equal compute ({best_growth.flops:.3g} FLOPs); gain "
            f"{best_growth.gain:+.4f} ± {best_growth.gain_se:.4f} (paired SE) against the threshold "
            f"{planner.z:g} SE"
        )
    logger.info("growth planner: %s", reason)
    return GrowthDecision(
        chosen=best.name,
        targets=dict(best.targets),
        reason=reason,
        marginal_rate=rate,
        later_stages=later_stages,
        probe_flops=sum(p.flops for p in scored),
        budget_flops=budget_flops,
        probes=scored,
    )


PROBE_COLUMNS = ("name", "parameters", "cost_ratio", "steps", "flops", "loss_start", "loss", "gain", "gain_se")


def probes_frame(decision: Mapping[str, Any]) -> pd.DataFrame:
    """The probes of a recorded decision (`stage.json` growth.decision) as a table, the chosen one marked."""
    rows = [{c: p[c] for c in PROBE_COLUMNS} for p in decision["probes"]]
    frame = pd.DataFrame(rows, columns=list(PROBE_COLUMNS))
    frame.insert(1, "chosen", frame["name"] == decision["chosen"])
    return frame


def _step_flops(config: LoireConfig, batch_size: int, block: int) -> float:
    return flops_per_step(config, batch_size, block, head=head_of(config))
