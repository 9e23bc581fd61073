"""A lifelong stage, and the whole stream: grow → (distil and) train → perplexity on every seen domain.

`run_stage` is what the orchestration calls: it reads the parent stage folder (model, tokenizer,
`stage.json` with the lineage and the perplexity matrix so far), builds this stage's model by the
strategy (`loire.strategies`), trains it on the new corpus, evaluates every domain seen so far and
writes a stage folder (save_pretrained + tokenizer + `stage.json`). The folder appears complete or
not at all: it is assembled in a temporary sibling and swapped in, so an existing model in `out_dir`
is replaced only by a complete new one and left untouched on any failure.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loire import distributed
from loire.config import LoireConfig
from loire.data import Corpus, encode_corpus, load_corpus
from loire.distill import DistillConfig
from loire.flops import flops_per_step, head_of
from loire.grow import grow
from loire.grow.vocab import grow_vocab
from loire.io import load_model, publish_stage_folder
from loire.metrics import learnt_perplexity, max_abs_logit_diff, perplexity, ppl_frame
from loire.model import LoireForCausalLM, LoireForMaskedLM, LoirePreTrainedModel, model_dims
from loire.moments import Moments, carry_moments, load_moments, save_moments, trace_growth
from loire.planner import GrowthDecision, plan_growth
from loire.schedule import Schedule, StageSpec, resolve_growth, schedule_preset
from loire.strategies import Strategy, elle_expand, get_strategy, naive_expand
from loire.tokenizer import DOMAIN_TOKENS, load_tokenizer, train_tokenizer
from loire.train import OnLog, TrainConfig, train

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
MOMENTS_FILE = "moments.safetensors"  # AdamW's final state, kept by strategies that carry it (loire.moments)
FORMAT_VERSION = 1


@dataclass
class StageResult:
    out_dir: str
    stage: int
    domain: str
    strategy: str
    ppl: dict[str, float]
    ap: float
    ap_plus: float | None
    flops: float
    cumulative_flops: float
    wall_time_s: float
    growth_max_abs_logit_diff: float | None
    final_loss: float
    record: dict[str, Any] = field(default_factory=dict)


def read_stage(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `stage.json` of a stage folder, validated."""
    file = Path(path) / STAGE_FILE
    if not file.is_file():
        raise ValueError(f"{path}: not a stage folder (no {STAGE_FILE})")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    for key in ("stage", "domain", "strategy", "lineage", "ppl_matrix"):
        if key not in record:
            raise ValueError(f"{file}: missing field {key!r}")
    return record


def checkpoint_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Where `run_stage` keeps the training checkpoints of the stage folder `out_dir` (a hidden sibling)."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.checkpoints"


# ---------------------------------------------------------------------------------------- constants
# Seeds of successive stages lie this far apart (stage t: seed + 1000·t), so the start model, growth
# noise, data order and replay draws of one stage never replay another stage's random stream.
STAGE_SEED_STRIDE = 1000
# Growth is checked on a short probe: the first two training blocks cut to at most 32 tokens, enough to
# exercise attention over several positions while keeping the float64 comparison cheap.
GROWTH_PROBE_BLOCKS = 2
GROWTH_PROBE_TOKENS = 32
# Replay memory per earlier domain: half the new domain's training blocks (at least one batch), the same
# for every replaying strategy. A stage at replay ratio 0.5 then draws each stored block less than once;
# at a tenth it replayed each about 3.7 times and memorised the memory instead of keeping the domain
# (bench/results/forgetting_levers.md, `long` stage 2: WB perplexity 134.4 -> 150.4 at a tenth,
# -> 144.2 at a fifth, -> 110.0 at a half).
REPLAY_MEMORY_DIVISOR = 2
# ELLE's recovery warmup is a short side run whose losses are not reported: a log step never reached.
NEVER_LOG = 10**9
# Checkpoints per stage: a crash loses at most a quarter of the stage's steps.
CHECKPOINTS_PER_STAGE = 4


@dataclass(frozen=True)
class StagePlan:
    """What stage comes next, decided from the parent's record and the schedule before anything is loaded.

    `stage` is t (1-based; an imported base model is stage 0), `spec` the schedule's stage t (the last one
    past the schedule's end), `seed` the stage's seed, `steps` its optimizer steps (`retrain`: t × the
    spec's), `growth` the spec's growth targets when this stage grows (empty otherwise; relative targets are
    resolved against the parent model), `teacher_dirs` the earlier stage models distilled from with their
    positions in the lineage (`teacher_indices`), and `distill_window` the distillation steps.
    """

    stage: int
    spec: StageSpec
    seed: int
    steps: int
    strategy: Strategy
    schedule: Schedule
    parent_record: dict[str, Any] | None
    lineage: list[dict[str, Any]]
    growth: dict[str, Any]
    teacher_dirs: list[str]
    teacher_indices: list[int]
    distill_window: int
    plan_growth: bool = False  # the growth planner decides this stage's growth (spec.plan)

    @property
    def domains(self) -> list[str]:
        """The domain of each earlier stage (its own arrival)."""
        return [entry["domain"] for entry in self.lineage]

    @property
    def seen(self) -> list[str]:
        """Every domain trained on before this stage, carried ones included, in the order learnt."""
        return list(seen_corpora(self.lineage))


def learnt_domains(lineage: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """What each stage of a lineage trained on: the domains it carried (owed by stages that were not promoted),
    then its own."""
    return [[*(c["domain"] for c in entry.get("carried") or []), entry["domain"]] for entry in lineage]


def stage_ppl_frame(record: Mapping[str, Any]) -> pd.DataFrame:
    """`loire.metrics.ppl_frame` of a stage record: its perplexity matrix with AP and AP+ per stage, carried
    domains counted as learnt at the stage that carried them."""
    lineage = record["lineage"]
    carried = [learnt[:-1] for learnt in learnt_domains(lineage)]
    return ppl_frame([e["domain"] for e in lineage], record["ppl_matrix"], carried)


def seen_corpora(lineage: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Every domain a lineage trained on -> the corpus URI of its latest batch, in the order first learnt.

    A domain carried into a stage is seen from that stage on, like the stage's own: later stages replay it,
    distil on it and measure it (its perplexity in the matrix, AP and AP+)."""
    out: dict[str, str] = {}
    for entry in lineage:
        for carried in entry.get("carried") or []:
            out[carried["domain"]] = carried["corpus_uri"]
        out[entry["domain"]] = entry["corpus_uri"]
    return out


def stage_spec(schedule: Schedule, stage: int) -> StageSpec:
    """The schedule's spec of stage `stage` (1-based); stages past the schedule's end reuse the last one."""
    return schedule.stages[min(stage, len(schedule.stages)) - 1]


def plan_stage(
    schedule: Schedule | str,
    strategy: Strategy | str = "loire",
    parent: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    steps: int | None = None,
    teachers: Sequence[str] | None = None,
) -> StagePlan:
    """The plan of the stage that follows `parent` (a stage folder or its record; None: the first stage).

    `steps` overrides the spec's optimizer steps; `teachers` replaces the teachers' folders recorded in
    the lineage (a pipeline passes local downloads; a base model at their head, stage 0, is not a teacher).
    """
    strat = get_strategy(strategy) if isinstance(strategy, str) else strategy
    sched = schedule_preset(schedule) if isinstance(schedule, str) else schedule
    record = dict(parent) if isinstance(parent, Mapping) else (read_stage(parent) if parent is not None else None)
    if record is not None and record.get("strategy") is not None and record["strategy"] != strat.name:
        raise ValueError(f"{parent}: parent stage used strategy {record['strategy']!r}, not {strat.name!r}")
    t = 1 if record is None else int(record["stage"]) + 1
    spec = stage_spec(sched, t)
    if steps is not None and spec.flops_budget is not None:  # explicit steps win over the FLOP budget
        spec = dataclasses.replace(spec, flops_budget=None)
    lineage: list[dict[str, Any]] = list(record["lineage"]) if record else []
    stage_steps = steps if steps is not None else spec.steps
    if strat.from_scratch:
        stage_steps *= t
    grows = record is not None and not strat.from_scratch and strat.growth != "none" and t <= len(sched.stages)
    if grows and spec.plan and strat.growth != "exact":
        raise ValueError(
            f"stages[{t - 1}].plan: the growth planner only probes exact growths; strategy {strat.name!r} "
            f"grows with {strat.growth!r} (use an exact-growth strategy or a schedule without plan)"
        )
    window = distill_window(spec, strat, stage_steps)
    dirs: list[str] = []
    chosen: list[int] = []
    if strat.distill != "none" and lineage:
        dirs = list(teachers)[-len(lineage) :] if teachers is not None else [e["model_dir"] for e in lineage]
        chosen = list(range(len(dirs)))
        if strat.distill == "previous":
            dirs, chosen = dirs[-1:], chosen[-1:]
    return StagePlan(
        stage=t,
        spec=spec,
        seed=sched.seed + STAGE_SEED_STRIDE * t,
        steps=stage_steps,
        strategy=strat,
        schedule=sched,
        parent_record=record,
        lineage=lineage,
        growth=dict(spec.grow) if grows else {},
        teacher_dirs=dirs,
        teacher_indices=chosen,
        distill_window=window,
        plan_growth=grows and spec.plan,
    )


def distill_window(spec: StageSpec, strat: Strategy, steps: int) -> int:
    """Distillation steps of a stage: the schedule's window, capped by the strategy's steps or share."""
    window = spec.distill_steps if strat.distill_steps is None else min(spec.distill_steps, strat.distill_steps)
    if strat.distill_fraction is not None:
        window = min(window, max(1, round(strat.distill_fraction * steps)))
    return window


def fit_budget(plan: StagePlan, model: LoirePreTrainedModel, spent: float = 0.0) -> StagePlan:
    """With a FLOP budget (spec.flops_budget), the stage's steps follow from the model it trains: what is
    left after `spent` (the planner's probes) over one step's FLOPs (retrain: t x the budget)."""
    spec = plan.spec
    if spec.flops_budget is None:
        return plan
    budget = spec.flops_budget * (plan.stage if plan.strategy.from_scratch else 1)
    step = flops_per_step(model.config, spec.batch_size, spec.block_size, head=head_of(model.config))
    steps = max(1, round((budget - spent) / step))
    logger.info("stage %d: %d steps fit the budget of %.3g FLOPs (%.3g on probes)", plan.stage, steps, budget, spent)
    return dataclasses.replace(plan, steps=steps, distill_window=distill_window(spec, plan.strategy, steps))


def _decision_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The growth planner's choice in a lifelong summary: what, why, and each probe's loss and cost."""
    decision = record["growth"]["decision"]
    probes = {
        p["name"]: {"loss": p["loss"], "cost_ratio": p["cost_ratio"], "gain": p["gain"]} for p in decision["probes"]
    }
    return {
        "chosen": decision["chosen"],
        "reason": decision["reason"],
        "probe_flops": decision["probe_flops"],
        "probes": probes,
    }


def domain_prompt_token(domain: str) -> str:
    token = f"<{domain.upper()}>"
    return token if token in DOMAIN_TOKENS else DOMAIN_TOKENS[0]


def _blocks(corpus: Corpus, split: str, tokenizer, spec: StageSpec, max_tokens: int | None) -> torch.Tensor:
    texts = corpus.train if split == "train" else corpus.valid
    try:
        return encode_corpus(list(texts), tokenizer, spec.block_size, max_tokens=max_tokens)
    except ValueError as exc:
        raise ValueError(
            f"{corpus.uri}: the {split} split is too small for one block of {spec.block_size} tokens ({exc})"
        ) from None


def teacher_betas(beta: Sequence[float] | None, earlier: int, chosen: Sequence[int]) -> tuple[float, ...] | None:
    """The distillation weight of each teacher used, from the stage spec's β (one per earlier stage).

    Explicit rule: the schedule's total teacher weight Σβ is kept and split over the teachers actually
    used in proportion to their stages' β (token-kd distils from the previous stage only, so its one
    teacher gets the whole Σβ). A stage past the schedule's end reuses the last spec, whose β has fewer
    entries than there are earlier stages: Σβ is then split uniformly. None (uniform 1/n) stays None.
    """
    if beta is None or not chosen:
        return None
    total = float(sum(beta))
    if len(beta) == earlier:
        picked = [float(beta[j]) for j in chosen]
        scale = total / sum(picked) if sum(picked) > 0 else 0.0
        return tuple(b * scale for b in picked)
    logger.info("β has %d weight(s) for %d earlier stages: Σβ = %g split uniformly", len(beta), earlier, total)
    return (total / len(chosen),) * len(chosen)


def _with_prompt(blocks: torch.Tensor, token_id: int) -> torch.Tensor:
    """ELLE's domain prompt: the domain token first, the block shifted right by one."""
    return torch.cat([torch.full((blocks.shape[0], 1), token_id, dtype=blocks.dtype), blocks[:, :-1]], dim=1)


def _initial_config(schedule: Schedule, strategy: Strategy, vocab_size: int, tokenizer) -> LoireConfig:
    config = schedule.final_config() if strategy.size == "final" else schedule.config_at(0)
    return config.replace(
        vocab_size=vocab_size,
        plugin_lambda_mode=schedule.lambda_mode,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _new_model(config: LoireConfig, seed: int) -> LoirePreTrainedModel:
    torch.manual_seed(seed)
    return (LoireForCausalLM if config.is_causal else LoireForMaskedLM)(config)


@dataclass
class _Earlier:
    """Data of the domains seen before this stage, and the new domain's training blocks as trained on."""

    corpora: dict[str, Corpus]
    prompt_ids: dict[str, int]
    domain_prompts: bool
    train_blocks: torch.Tensor
    memory: torch.Tensor | None

    def prompted(self, blocks: torch.Tensor, domain: str) -> torch.Tensor:
        return _with_prompt(blocks, self.prompt_ids[domain]) if self.domain_prompts else blocks


def _load_data(plan: StagePlan, corpus: str, parent, tokenizer: str | None) -> tuple[Corpus, Any, torch.Tensor]:
    """Step 1: the new domain's corpus, the tokenizer (the parent's, a given one or a new BPE), its blocks."""
    data = load_corpus(corpus)
    if parent is not None:
        tok = load_tokenizer(parent)
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        tok = train_tokenizer(list(data.train), vocab_size=plan.schedule.tokenizer_vocab_size)
    missing = [t for t in DOMAIN_TOKENS if t not in tok.get_vocab()] if plan.strategy.domain_prompts else []
    if missing:  # a base model's own tokenizer: ELLE's prompt tokens join its vocabulary (see _stage_model)
        tok.add_tokens(missing, special_tokens=True)
        logger.info("added the domain prompt tokens %s to the tokenizer", missing)
    return data, tok, _blocks(data, "train", tok, plan.spec, plan.spec.max_train_tokens)


def _stage_model(
    plan: StagePlan, parent, tok, train_blocks: torch.Tensor
) -> tuple[LoirePreTrainedModel, dict[str, int], float | None, GrowthDecision | None]:
    """Step 2: the model of this stage (a new one, or the parent grown by the strategy's operator, to the
    schedule's targets or to the growth planner's choice)."""
    strat, spec = plan.strategy, plan.spec
    if parent is None or strat.from_scratch:
        return _new_model(_initial_config(plan.schedule, strat, len(tok), tok), plan.seed), {}, None, None
    loaded = load_model(parent)
    previous = _to_vocab(loaded, len(tok))
    if spec.block_size > previous.config.max_position_embeddings:
        raise ValueError(
            f"{_spec_path(plan)}.block_size: {spec.block_size} exceeds the parent model's "
            f"max_position_embeddings ({previous.config.max_position_embeddings})"
        )
    decision = _plan_growth(plan, previous, tok, train_blocks) if plan.plan_growth else None
    growth = decision.targets if decision is not None else plan.growth
    targets = resolve_growth(growth, previous.config, f"{_spec_path(plan)}.grow")
    if not targets:
        return previous, targets, None, decision
    probe = train_blocks[:GROWTH_PROBE_BLOCKS, : min(GROWTH_PROBE_TOKENS, spec.block_size)]
    model = _grower(plan, targets, len(tok))(loaded)
    growth_diff = max_abs_logit_diff(previous, model, probe)
    logger.info("stage %d: grew %s, max |Δlogits| %.3g", plan.stage, targets, growth_diff)
    return model, targets, growth_diff, decision


def _to_vocab(model: LoirePreTrainedModel, vocab: int) -> LoirePreTrainedModel:
    """Prompt tokens added to a base's tokenizer: exact row growth of the embeddings (and head)."""
    return grow_vocab(model, vocab) if vocab > model.config.vocab_size else model


def _grower(
    plan: StagePlan, targets: dict[str, int], vocab: int
) -> Callable[[LoirePreTrainedModel], LoirePreTrainedModel]:
    """The parent (as stored) → this stage's model: vocabulary rows, then the strategy's growth operator.
    Deterministic, so `loire.moments.trace_growth` can replay it."""
    strat = plan.strategy

    def transform(parent: LoirePreTrainedModel) -> LoirePreTrainedModel:
        previous = _to_vocab(parent, vocab)
        if not targets:
            return previous
        if strat.growth == "exact":
            return _grow_exact(previous, targets, plan.seed, strat)
        if strat.growth == "elle":
            return elle_expand(previous, **targets, seed=plan.seed)
        return naive_expand(previous, strat.growth, **targets, seed=plan.seed)

    return transform


def _carried_moments(
    plan: StagePlan, parent, targets: dict[str, int], vocab: int
) -> tuple[Moments | None, dict[str, Any] | None]:
    """Step 2b: AdamW's state for the stage's model, carried from the parent's final moments through the
    growth (`loire.moments`), when the strategy carries it; None (a cold optimizer) where the parent kept none."""
    if not plan.strategy.carry_moments:
        return None, None
    stored = Path(parent) / MOMENTS_FILE if parent is not None and not plan.strategy.from_scratch else None
    if stored is None or not stored.is_file():
        return None, {"carried_from": None}
    loaded = load_model(parent)
    sources = trace_growth(loaded, _grower(plan, targets, vocab))
    moments, report = carry_moments(loaded, load_moments(stored), sources)
    logger.info("stage %d: carried AdamW moments into %.0f%% of the entries", plan.stage, 100 * report.copied_fraction)
    return moments, {"carried_from": str(stored), **report.to_dict()}


def _grow_exact(
    model: LoirePreTrainedModel, targets: dict[str, int], seed: int, strat: Strategy
) -> LoirePreTrainedModel:
    """The exact operators, their free parameters drawn at the strategy's std (the grown model keeps the
    original initializer_range)."""
    if strat.growth_free_std is None:
        return grow(model, **targets, seed=seed, init=strat.growth_init)
    source = copy.deepcopy(model)
    source.config.initializer_range = strat.growth_free_std
    grown = grow(source, **targets, seed=seed, init=strat.growth_init)
    grown.config.initializer_range = model.config.initializer_range
    return grown


def _plan_growth(plan: StagePlan, model: LoirePreTrainedModel, tok, train_blocks: torch.Tensor) -> GrowthDecision:
    """Step 2a: the growth planner's probes on the new domain (see loire.planner)."""
    spec = plan.spec
    step = flops_per_step(model.config, spec.batch_size, spec.block_size, head=head_of(model.config))
    return plan_growth(
        model,
        train_blocks,
        budget_flops=spec.flops_budget if spec.flops_budget is not None else spec.steps * step,
        later_stages=max(0, len(plan.schedule.stages) - plan.stage),
        lr=spec.lr,
        batch_size=spec.batch_size,
        warmup_steps=spec.warmup_steps,
        seed=plan.seed,
        init=plan.strategy.growth_init,
        mask_token_id=tok.mask_token_id,
    )


def _spec_path(plan: StagePlan) -> str:
    """How validation errors name this stage's spec in the schedule."""
    return f"stages[{min(plan.stage, len(plan.schedule.stages)) - 1}]"


def _earlier_data(plan: StagePlan, domain: str, where: Mapping[str, str], tok, train_blocks: torch.Tensor) -> _Earlier:
    """Step 3: earlier domains' data for replay memory, retraining, ELLE's recovery warmup and evaluation."""
    strat, spec = plan.strategy, plan.spec
    budget = spec.max_train_tokens
    corpora = {d: load_corpus(where.get(d, uri)) for d, uri in seen_corpora(plan.lineage).items()}
    prompt_ids = {d: tok.convert_tokens_to_ids(domain_prompt_token(d)) for d in [*corpora, domain]}
    out = _Earlier(corpora, prompt_ids, strat.domain_prompts, train_blocks, None)
    out.train_blocks = out.prompted(train_blocks, domain)
    if strat.replay_ratio > 0 and corpora:
        per_domain = max(spec.batch_size, out.train_blocks.shape[0] // REPLAY_MEMORY_DIVISOR)
        out.memory = torch.cat(
            [out.prompted(_blocks(c, "train", tok, spec, budget), d)[:per_domain] for d, c in corpora.items()]
        )
    if strat.from_scratch and corpora:
        out.train_blocks = torch.cat(
            [out.prompted(_blocks(c, "train", tok, spec, budget), d) for d, c in corpora.items()] + [out.train_blocks]
        )
    return out


def _mix_carried(
    plan: StagePlan, domain: str, extra: Mapping[str, str], tok, earlier: _Earlier
) -> dict[str, tuple[Corpus, int]]:
    """Step 3b: domains owed by earlier stages that were not promoted, mixed into this stage's training blocks
    (each with its domain prompt); domain -> (corpus, training blocks)."""
    corpora = {d: load_corpus(c) for d, c in extra.items() if d != domain}
    mix = {}
    for d, c in corpora.items():
        earlier.prompt_ids.setdefault(d, tok.convert_tokens_to_ids(domain_prompt_token(d)))
        mix[d] = earlier.prompted(_blocks(c, "train", tok, plan.spec, plan.spec.max_train_tokens), d)
    if mix:
        earlier.train_blocks = torch.cat([*mix.values(), earlier.train_blocks])
    return {d: (corpora[d], int(b.shape[0])) for d, b in mix.items()}


def _teachers(plan: StagePlan) -> tuple[list[LoirePreTrainedModel], DistillConfig | None]:
    """Step 4: the teachers for distillation, over the schedule's window (or the strategy's shorter one)."""
    teacher_models = [load_model(d) for d in plan.teacher_dirs]
    if not teacher_models:
        return teacher_models, None
    betas = teacher_betas(plan.spec.beta, len(plan.lineage), plan.teacher_indices)
    window = min(plan.distill_window, plan.steps)
    return teacher_models, DistillConfig(distill_steps=window, betas=betas, temperature=plan.spec.temperature)


@dataclass
class _Trained:
    model: LoirePreTrainedModel
    result: Any  # loire.train.TrainResult of the main run
    config: TrainConfig
    flops: float


def _train_stage(
    plan: StagePlan,
    model: LoirePreTrainedModel,
    targets: dict[str, int],
    earlier: _Earlier,
    tok,
    teacher_models: list[LoirePreTrainedModel],
    distill: DistillConfig | None,
    *,
    out: Path,
    resume: bool,
    device: str,
    progress: bool,
    fsdp: bool,
    on_log: OnLog | None,
    moments: Moments | None = None,
) -> _Trained:
    """Step 5: ELLE's recovery warmup where the strategy has one, then the stage's training run."""
    strat, spec, stage_steps = plan.strategy, plan.spec, plan.steps
    common = dict(
        batch_size=spec.batch_size,
        lr=spec.lr,
        warmup_steps=min(spec.warmup_steps, max(0, stage_steps - 1)),
        seed=plan.seed,
        device=device,
        progress=progress,
        fsdp=fsdp,
    )
    if strat.min_lr_ratio is not None:
        common["min_lr_ratio"] = strat.min_lr_ratio
    flops = 0.0
    # ELLE: function-recovering warmup on the memory of the previous domain before the new domain.
    if strat.recover_fraction > 0 and plan.lineage and targets:
        last = plan.lineage[-1]["domain"]
        recover = earlier.prompted(_blocks(earlier.corpora[last], "train", tok, spec, spec.max_train_tokens), last)
        steps = max(1, int(stage_steps * strat.recover_fraction))
        result = train(model, recover, TrainConfig(steps=steps, log_every=NEVER_LOG, **common), replay=earlier.memory)
        flops += result.flops
    window = min(plan.distill_window, stage_steps)
    config = TrainConfig(
        steps=stage_steps,
        device_steps=window if (targets and strat.growth == "exact") else 0,
        distill=distill,
        replay_ratio=strat.replay_ratio if earlier.memory is not None else 0.0,
        checkpoint_every=max(1, stage_steps // CHECKPOINTS_PER_STAGE),
        **common,
    )
    result = train(
        model,
        earlier.train_blocks,
        config,
        teachers=teacher_models,
        replay=earlier.memory,
        mask_token_id=tok.mask_token_id,
        checkpoint_dir=checkpoint_dir(out),
        resume=resume,
        on_log=on_log,
        initial_moments=moments,
        keep_moments=strat.carry_moments,
    )
    model = model.to("cpu").eval()
    model.consolidate(strict=True)
    return _Trained(model, result, config, flops + result.flops + result.teacher_flops)


def _evaluate(
    model: LoirePreTrainedModel,
    plan: StagePlan,
    domain: str,
    data: Corpus,
    earlier: _Earlier,
    tok,
    max_blocks: int,
    carried: Mapping[str, tuple[Corpus, int]],
) -> dict[str, float]:
    """Step 6: perplexity (masked LM: pseudo-perplexity) on every domain seen so far, the carried ones included
    (a domain's latest batch stands for it)."""
    ppl: dict[str, float] = {}
    for d, c in [*earlier.corpora.items(), *((d, c) for d, (c, _) in carried.items()), (domain, data)]:
        valid = earlier.prompted(_blocks(c, "valid", tok, plan.spec, None)[:max_blocks], d)
        ppl[d] = perplexity(model, valid, mask_token_id=tok.mask_token_id)
    return ppl


def _stage_record(
    plan: StagePlan,
    *,
    domain: str,
    corpus: str,
    source_uri: str | None,
    corpus_etag: str | None,
    data: Corpus,
    parent,
    out: Path,
    earlier: _Earlier,
    targets: dict[str, int],
    growth_diff: float | None,
    teacher_models: list[LoirePreTrainedModel],
    distill: DistillConfig | None,
    trained: _Trained,
    ppl: dict[str, float],
    ppl_init: dict[str, float] | None,
    fsdp: bool,
    started: float,
    decision: GrowthDecision | None = None,
    carried_uris: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Step 7: the stage's `stage.json` (lineage, growth, perplexity matrix with AP / AP+, FLOPs, training).

    Long because it writes the record's schema out as one literal, so every field of stage.json is in one place."""
    t, parent_record, lineage, model, result = (
        plan.stage,
        plan.parent_record,
        plan.lineage,
        trained.model,
        trained.result,
    )
    matrix_rows: list[dict[str, float]] = [*(parent_record["ppl_matrix"] if parent_record else []), ppl]
    entry: dict[str, Any] = {
        "stage": t,
        "domain": domain,
        "model_dir": str(out.resolve()),
        "corpus_uri": source_uri or corpus,
    }
    if carried_uris:  # what this stage carried is seen from here on (seen_corpora)
        entry["carried"] = [{"domain": d, "corpus_uri": uri} for d, uri in carried_uris.items()]
    ap, ap_plus = learnt_perplexity(matrix_rows, learnt_domains([*lineage, entry]))
    cumulative = trained.flops + (parent_record["flops"]["cumulative"] if parent_record else 0.0)
    record: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "stage": t,
        "domain": domain,
        "strategy": plan.strategy.name,
        "schedule": plan.schedule.to_dict(),
        "corpus": {
            "uri": source_uri or corpus,
            "etag": corpus_etag,
            "digest": data.digest,
            "files": list(data.files),
            "train_documents": len(data.train),
            "valid_documents": len(data.valid),
            "train_tokens": int(earlier.train_blocks.numel()),
        },
        "parent": None if parent is None else {"dir": str(Path(parent).resolve()), "stage": t - 1},
        "lineage": [*lineage, entry],
        "growth": {
            "targets": targets,
            "operator": plan.strategy.growth,
            "init": plan.strategy.growth_init,
            "max_abs_logit_diff": growth_diff,
        },
        "dims": model_dims(model),
        "distill": None
        if distill is None
        else {
            **asdict(distill),
            "teachers": len(teacher_models),
            "betas_used": list(distill.resolved_betas(len(teacher_models))),
        },
        "ppl": ppl,
        "ppl_matrix": matrix_rows,
        "ap": ap,
        "ap_plus": ap_plus,
        "flops": {"stage": trained.flops, "teachers": result.teacher_flops, "cumulative": cumulative},
        "wall_time_s": time.perf_counter() - started,
        "train": {
            "steps": result.steps,
            "tokens": result.tokens,
            "final_loss": result.final_loss,
            "resumed_from": result.resumed_from,
            "replay_ratio": trained.config.replay_ratio,
            "world_size": distributed.world_size(),
            "fsdp": fsdp and distributed.world_size() > 1,
            "history": result.history,
        },
    }
    # Optional fields, present only when they apply (older records stay field-for-field the same).
    if parent_record is not None and parent_record.get("base") is not None:
        record["base"] = parent_record["base"]
    if ppl_init is not None:
        record["ppl_init"] = ppl_init
    if decision is not None:
        record["growth"]["decision"] = decision.to_dict()
        record["flops"]["probes"] = decision.probe_flops
    if plan.strategy.min_lr_ratio is not None:
        record["train"]["min_lr_ratio"] = trained.config.min_lr_ratio
    return record


def run_stage(
    domain: str,
    corpus: str,
    out_dir: str | os.PathLike[str],
    *,
    parent: str | os.PathLike[str] | None = None,
    schedule: Schedule | str = "gpt-tiny",
    strategy: str = "loire",
    steps: int | None = None,
    resume: bool = False,
    tokenizer: str | None = None,
    teachers: Sequence[str] | None = None,
    corpus_etag: str | None = None,
    source_uri: str | None = None,
    earlier_corpora: Mapping[str, str] | None = None,
    device: str = "auto",
    max_eval_blocks: int = 32,
    on_log: OnLog | None = None,
    progress: bool = True,
    fsdp: bool = False,
    eval_init: bool = False,
    extra_corpora: Mapping[str, str] | None = None,
    extra_sources: Mapping[str, str] | None = None,
    seed: int | None = None,
) -> StageResult:
    """Run one lifelong stage and write its folder to `out_dir` (see the module docstring).

    `corpus` is where the new domain's data is read; `source_uri` (default: `corpus`) is the URI recorded in
    the lineage, e.g. the s3:// batch a pipeline copied to a local cache. Earlier domains are read from
    `earlier_corpora[domain]` when given, else from the `corpus_uri` their lineage entry recorded.
    `parent` may be a stage-0 folder written by `loire.base.import_base` (an imported HF checkpoint).
    `eval_init` also measures every seen domain's perplexity right after growth, before training
    (`ppl_init` in the record: the "init" row of the paper's LOIRE-Bert table).
    `extra_corpora` (domain -> corpus) are domains owed by earlier stages that were not promoted: their
    train splits are mixed into this stage's training data (each with its domain prompt) and the record's
    `carried` lists each with its share of the training blocks and its perplexity after the stage. The lineage
    entry of this stage lists them too (`carried`: domain and `extra_sources[domain]`, default the corpus path),
    so later stages replay, distil on and evaluate them like any earlier domain.
    `seed` (default: the schedule's) replaces the schedule's seed, as in `run_lifelong`: a retried stage runs with
    another start noise, data order and replay draws (the record's `schedule.seed` says which).

    Long only by its keyword arguments: each step is one helper (`plan_stage`, `_load_data`, `_stage_model`,
    `_earlier_data`, `_mix_carried`, `_teachers`, `_train_stage`, `_evaluate`, `_stage_record`, `_write_stage`).
    """
    started = time.perf_counter()
    out = Path(out_dir)
    if seed is not None:
        schedule = dataclasses.replace(schedule_preset(schedule) if isinstance(schedule, str) else schedule, seed=seed)
    plan = plan_stage(schedule, strategy, parent, steps=steps, teachers=teachers)
    if domain in plan.domains:
        logger.info(
            "domain %s was seen before (stage %d): training on it again", domain, plan.domains.index(domain) + 1
        )
    data, tok, train_blocks = _load_data(plan, corpus, parent, tokenizer)
    model, targets, growth_diff, decision = _stage_model(plan, parent, tok, train_blocks)
    moments, moments_record = _carried_moments(plan, parent, targets, len(tok))
    probe_flops = decision.probe_flops if decision is not None else 0.0
    plan = fit_budget(plan, model, probe_flops)
    earlier = _earlier_data(plan, domain, earlier_corpora or {}, tok, train_blocks)
    carried = _mix_carried(plan, domain, extra_corpora or {}, tok, earlier)
    teacher_models, distill = _teachers(plan)
    ppl_init = _evaluate(model, plan, domain, data, earlier, tok, max_eval_blocks, carried) if eval_init else None
    trained = _train_stage(
        plan,
        model,
        targets,
        earlier,
        tok,
        teacher_models,
        distill,
        out=out,
        resume=resume,
        device=device,
        progress=progress,
        fsdp=fsdp,
        on_log=on_log,
        moments=moments,
    )
    trained.flops += probe_flops  # the planner's probes are part of the stage's compute
    ppl = _evaluate(trained.model, plan, domain, data, earlier, tok, max_eval_blocks, carried)
    record = _stage_record(
        plan,
        domain=domain,
        corpus=corpus,
        source_uri=source_uri,
        corpus_etag=corpus_etag,
        data=data,
        parent=parent,
        out=out,
        earlier=earlier,
        targets=targets,
        growth_diff=growth_diff,
        teacher_models=teacher_models,
        distill=distill,
        trained=trained,
        ppl=ppl,
        ppl_init=ppl_init,
        fsdp=fsdp,
        started=started,
        decision=decision,
        carried_uris={d: (extra_sources or {}).get(d, str(extra_corpora[d])) for d in carried}
        if extra_corpora
        else None,
    )
    record["carried"] = _carried_entries(carried, extra_corpora or {}, earlier, ppl)
    if moments_record is not None:
        record["train"]["moments"] = moments_record
    _write_stage(trained.model, tok, record, out, trained.result.moments)
    if distributed.is_main():
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    logger.info("stage %d (%s) done: AP %.3f, AP+ %s", plan.stage, domain, record["ap"], record["ap_plus"])
    return StageResult(
        out_dir=str(out),
        stage=plan.stage,
        domain=domain,
        strategy=plan.strategy.name,
        ppl=ppl,
        ap=record["ap"],
        ap_plus=record["ap_plus"],
        flops=trained.flops,
        cumulative_flops=record["flops"]["cumulative"],
        wall_time_s=record["wall_time_s"],
        growth_max_abs_logit_diff=growth_diff,
        final_loss=trained.result.final_loss,
        record=record,
    )


def _carried_entries(
    carried: Mapping[str, tuple[Corpus, int]],
    extra_corpora: Mapping[str, str],
    earlier: _Earlier,
    ppl: Mapping[str, float],
) -> list[dict[str, Any]]:
    """The record's `carried`: each owed domain trained on, its share of the training blocks, its perplexity now."""
    total = int(earlier.train_blocks.shape[0])
    return [
        {"domain": d, "corpus": str(extra_corpora[d]), "train_blocks": n, "share": n / total, "ppl": ppl[d]}
        for d, (_, n) in carried.items()
    ]


def _write_stage(
    model: LoirePreTrainedModel, tokenizer, record: dict[str, Any], out: Path, moments: Moments | None = None
) -> None:
    """Publish the stage folder: rank 0 writes it, every rank returns once it exists (under torchrun).
    `moments` (AdamW's final state) go beside the model for the next stage, only for the parameters the
    consolidated model still has (a plug-in λ is gone)."""
    if distributed.is_main():
        extra = None
        if moments is not None:
            kept = dict(model.named_parameters())
            extra = {MOMENTS_FILE: lambda path: save_moments({n: m for n, m in moments.items() if n in kept}, path)}
        publish_stage_folder(model, tokenizer, record, out, STAGE_FILE, extra=extra)
    distributed.barrier()


def corpus_uri(root: str, domain: str) -> str:
    """Where a domain's corpus lives under a corpora root (local folder or s3:// prefix)."""
    if "://" in root:
        return f"{root.rstrip('/')}/{domain.lower()}"
    base = Path(root)
    if (base / "corpora").is_dir():  # a data root laid out like shared/data
        base = base / "corpora"
    for name in (domain, domain.lower(), domain.upper()):
        if (base / name).exists():
            return str(base / name)
    raise ValueError(f"{root}: no corpus folder for domain {domain!r} (expected {base / domain.lower()})")


def _base_stage(base: str | os.PathLike[str], folder: Path, resume: bool) -> dict[str, Any]:
    """Import `base` as stage 0 at `folder`; on resume, read back the folder an earlier run imported from it."""
    from loire.base import import_base, weights_sha256

    if not (resume and (folder / STAGE_FILE).is_file()):
        return import_base(base, folder)["base"]
    record = read_stage(folder)["base"]
    if record["sha256"] != weights_sha256(base):
        raise ValueError(f"{folder}: resume: imported from other weights than {base}; use another out_dir")
    return record


def _finished_stage(stage_dir: Path, strategy: str, seed: int) -> dict[str, Any] | None:
    """The record of a stage folder an earlier, interrupted `run_lifelong` finished, or None to (re)run it.

    A folder written by another strategy or seed is an error, not a stage to reuse or overwrite."""
    if not (stage_dir / STAGE_FILE).is_file():
        return None
    record = read_stage(stage_dir)
    found = (record["strategy"], record.get("schedule", {}).get("seed"))
    if found != (strategy, seed):
        raise ValueError(
            f"{stage_dir}: resume: written by strategy {found[0]!r} seed {found[1]}, not {strategy!r} seed {seed}; "
            "use another out_dir or delete the folder"
        )
    return record


def _summary_entry(record: Mapping[str, Any], domain: str) -> dict[str, Any]:
    """A stage's entry in the lifelong summary, from its record (`stage.json`)."""
    return {
        "stage": record["stage"],
        "domain": domain,
        "ppl": record["ppl"],
        "ap": record["ap"],
        "ap_plus": record["ap_plus"],
        "flops": record["flops"]["stage"],
        "cumulative_flops": record["flops"]["cumulative"],
        "wall_time_s": record["wall_time_s"],
        "growth_max_abs_logit_diff": record["growth"]["max_abs_logit_diff"],
        "dims": record["dims"],
        "growth": record["growth"]["targets"],
        **({"ppl_init": record["ppl_init"]} if "ppl_init" in record else {}),
        **({"growth_decision": _decision_summary(record)} if "decision" in record["growth"] else {}),
    }


def run_lifelong(
    corpora: str,
    domains: Sequence[str],
    out_dir: str | os.PathLike[str],
    *,
    strategy: str = "loire",
    schedule: Schedule | str = "gpt-tiny",
    steps: int | None = None,
    device: str = "auto",
    seed: int | None = None,
    max_eval_blocks: int = 32,
    on_log: OnLog | None = None,
    progress: bool = True,
    base: str | os.PathLike[str] | None = None,
    eval_init: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """All stages of one strategy over `domains`; writes `lifelong.json` and `ppl.png` to `out_dir`.

    `seed` (default: the schedule's) replaces the schedule's seed, which seeds the start model, growth,
    data order and replay draws; `max_eval_blocks` caps each domain's validation blocks. `base`, a local
    HF checkpoint folder, is imported as stage 0 (`out_dir/stage-0-base`, `loire.base.import_base`) and the
    first stage grows from it; `eval_init` adds each stage's perplexities right after growth (`ppl_init`).
    `resume` continues an interrupted run in the same `out_dir`: a stage whose folder holds a `stage.json` of this
    strategy and seed is read back, not rerun, and the first unfinished stage continues from its newest training
    checkpoint (`run_stage(resume=True)`), so the result equals an uninterrupted run's.
    Slightly long: the stage loop and the summary it writes read best together.
    """
    if not domains:
        raise ValueError("domains: at least one domain is needed")
    if isinstance(schedule, str):
        schedule = schedule_preset(schedule)
    if seed is not None:
        schedule = dataclasses.replace(schedule, seed=seed)
    out = Path(out_dir)
    uris = {d: corpus_uri(corpora, d) for d in domains}  # fail early on a missing domain
    parent: Path | None = None
    base_record: dict[str, Any] | None = None
    if base is not None:
        parent = out / "stage-0-base"
        base_record = _base_stage(base, parent, resume)
    stages, read_back = [], []
    for index, domain in enumerate(domains, start=1):
        stage_dir = out / f"stage-{index}-{domain}"
        done = _finished_stage(stage_dir, strategy, schedule.seed) if resume else None
        if done is None:
            done = run_stage(
                domain,
                uris[domain],
                stage_dir,
                parent=parent,
                schedule=schedule,
                strategy=strategy,
                steps=steps,
                resume=resume,
                device=device,
                max_eval_blocks=max_eval_blocks,
                on_log=on_log,
                progress=progress,
                eval_init=eval_init,
            ).record
        else:
            logger.info("stage %d (%s): finished before, read back from %s", index, domain, stage_dir)
            read_back.append(index)
        stages.append(_summary_entry(done, domain))
        parent = stage_dir
    summary = {
        "strategy": strategy,
        "seed": schedule.seed,
        "domains": list(domains),
        "stages": stages,
        "total_flops": stages[-1]["cumulative_flops"],
        "total_wall_time_s": sum(s["wall_time_s"] for s in stages),
    }
    if base_record is not None:
        summary["base"] = base_record
    if read_back:
        summary["read_back_stages"] = read_back  # finished by an earlier, interrupted run
    (out / "lifelong.json").write_text(json.dumps(summary, indent=2))
    plot_ppl(summary, out / "ppl.png")
    return summary


def plot_ppl(summary: dict[str, Any], path: Path) -> Path:
    """PPL per domain across stages (one line per domain, from the stage it was introduced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for domain in summary["domains"]:
        points = [(s["stage"], s["ppl"][domain]) for s in summary["stages"] if domain in s["ppl"]]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=domain)
    ax.set_xlabel("stage")
    ax.set_ylabel("perplexity (validation)")
    ax.set_yscale("log")
    ax.set_xticks([s["stage"] for s in summary["stages"]])
    ax.set_title(f"{summary['strategy']}: perplexity per domain across stages")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
