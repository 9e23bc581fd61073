"""A lifelong stage, and the whole stream: grow → (distil and) train → perplexity on every seen domain.

`run_stage` is what the orchestration calls: it reads the parent stage folder (model, tokenizer,
`stage.json` with the lineage and the perplexity matrix so far), builds this stage's model by the
strategy (`loire.strategies`), trains it on the new corpus, evaluates every domain seen so far and
writes a stage folder (save_pretrained + tokenizer + `stage.json`). The folder appears complete or
not at all: it is assembled in a temporary sibling and swapped in, so an existing model in `out_dir`
is replaced only by a complete new one and left untouched on any failure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loire import distributed
from loire.config import LoireConfig
from loire.data import Corpus, encode_corpus, load_corpus
from loire.distill import DistillConfig
from loire.grow import grow
from loire.io import load_model, publish_dir
from loire.metrics import average_increased_perplexity, average_perplexity, max_abs_logit_diff, perplexity
from loire.model import LoireForCausalLM, LoireForMaskedLM, LoirePreTrainedModel, num_parameters
from loire.schedule import Schedule, StageSpec, schedule_preset
from loire.strategies import Strategy, elle_expand, get_strategy, naive_expand
from loire.tokenizer import DOMAIN_TOKENS, load_tokenizer, train_tokenizer
from loire.train import OnLog, TrainConfig, train

logger = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
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
) -> StageResult:
    """Run one lifelong stage and write its folder to `out_dir` (see the module docstring).

    `corpus` is where the new domain's data is read; `source_uri` (default: `corpus`) is the URI recorded in
    the lineage, e.g. the s3:// batch a pipeline copied to a local cache. Earlier domains are read from
    `earlier_corpora[domain]` when given, else from the `corpus_uri` their lineage entry recorded.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    strat = get_strategy(strategy)
    sched = schedule_preset(schedule) if isinstance(schedule, str) else schedule
    parent_record = read_stage(parent) if parent is not None else None
    if parent_record is not None and parent_record["strategy"] != strat.name:
        raise ValueError(f"{parent}: parent stage used strategy {parent_record['strategy']!r}, not {strat.name!r}")
    t = 1 if parent_record is None else int(parent_record["stage"]) + 1
    spec = sched.stages[min(t, len(sched.stages)) - 1]
    seed = sched.seed + 1000 * t
    lineage: list[dict[str, Any]] = list(parent_record["lineage"]) if parent_record else []
    seen = [entry["domain"] for entry in lineage]
    if domain in seen:
        logger.info("domain %s was seen before (stage %d): training on it again", domain, seen.index(domain) + 1)

    # 1. data and tokenizer
    data = load_corpus(corpus)
    if parent is not None:
        tok = load_tokenizer(parent)
    elif tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        tok = train_tokenizer(list(data.train), vocab_size=sched.tokenizer_vocab_size)
    train_budget = spec.max_train_tokens
    train_blocks = _blocks(data, "train", tok, spec, train_budget)

    # 2. the model of this stage
    growth_diff: float | None = None
    targets: dict[str, int] = {}
    if parent is None or strat.from_scratch:
        model = _new_model(_initial_config(sched, strat, len(tok), tok), seed)
    else:
        previous = load_model(parent)
        model = previous
        if strat.growth != "none" and t <= len(sched.stages):
            targets = dict(spec.grow)
        if targets:
            probe = train_blocks[:2, : min(32, spec.block_size)]
            if strat.growth == "exact":
                model = grow(previous, **targets, seed=seed, init=strat.growth_init)
            elif strat.growth == "elle":
                model = elle_expand(previous, **targets, seed=seed)
            else:
                model = naive_expand(previous, strat.growth, **targets, seed=seed)
            growth_diff = max_abs_logit_diff(previous, model, probe)
            logger.info("stage %d: grew %s, max |Δlogits| %.3g", t, targets, growth_diff)

    # 3. data of earlier domains: replay memory, retraining, ELLE's recovery warmup, evaluation
    where = dict(earlier_corpora or {})
    earlier = {entry["domain"]: load_corpus(where.get(entry["domain"], entry["corpus_uri"])) for entry in lineage}
    prompt_ids = {d: tok.convert_tokens_to_ids(domain_prompt_token(d)) for d in [*earlier, domain]}

    def prompted(blocks: torch.Tensor, d: str) -> torch.Tensor:
        return _with_prompt(blocks, prompt_ids[d]) if strat.domain_prompts else blocks

    train_blocks = prompted(train_blocks, domain)
    memory = None
    if strat.replay_ratio > 0 and earlier:
        per_domain = max(spec.batch_size, train_blocks.shape[0] // 10)
        memory = torch.cat(
            [prompted(_blocks(c, "train", tok, spec, train_budget), d)[:per_domain] for d, c in earlier.items()]
        )
    if strat.from_scratch and earlier:
        train_blocks = torch.cat(
            [prompted(_blocks(c, "train", tok, spec, train_budget), d) for d, c in earlier.items()] + [train_blocks]
        )
    stage_steps = steps if steps is not None else spec.steps
    if strat.from_scratch:
        stage_steps *= t

    # 4. teachers for distillation, over the schedule's window (or the strategy's shorter one)
    window = spec.distill_steps if strat.distill_steps is None else min(spec.distill_steps, strat.distill_steps)
    if strat.distill_fraction is not None:
        window = min(window, max(1, round(strat.distill_fraction * stage_steps)))
    teacher_models: list[LoirePreTrainedModel] = []
    chosen: list[int] = []
    if strat.distill != "none" and lineage:
        dirs = list(teachers) if teachers is not None else [entry["model_dir"] for entry in lineage]
        chosen = list(range(len(dirs)))
        if strat.distill == "previous":
            dirs, chosen = dirs[-1:], chosen[-1:]
        teacher_models = [load_model(d) for d in dirs]
    distill = None
    if teacher_models:
        betas = teacher_betas(spec.beta, len(lineage), chosen)
        distill = DistillConfig(distill_steps=min(window, stage_steps), betas=betas, temperature=spec.temperature)

    ckpt_dir = checkpoint_dir(out)
    base = dict(
        batch_size=spec.batch_size,
        lr=spec.lr,
        warmup_steps=min(spec.warmup_steps, max(0, stage_steps - 1)),
        seed=seed,
        device=device,
        progress=progress,
        fsdp=fsdp,
    )
    flops = 0.0
    # ELLE: function-recovering warmup on the memory of the previous domain before the new domain.
    if strat.recover_fraction > 0 and lineage and targets:
        last = lineage[-1]["domain"]
        recover = prompted(_blocks(earlier[last], "train", tok, spec, train_budget), last)
        result = train(
            model,
            recover,
            TrainConfig(steps=max(1, int(stage_steps * strat.recover_fraction)), log_every=10**9, **base),
            replay=memory,
        )
        flops += result.flops
    config = TrainConfig(
        steps=stage_steps,
        device_steps=min(window, stage_steps) if (targets and strat.growth == "exact") else 0,
        distill=distill,
        replay_ratio=strat.replay_ratio if memory is not None else 0.0,
        checkpoint_every=max(1, stage_steps // 4),
        **base,
    )
    result = train(
        model,
        train_blocks,
        config,
        teachers=teacher_models,
        replay=memory,
        mask_token_id=tok.mask_token_id,
        checkpoint_dir=ckpt_dir,
        resume=resume,
        on_log=on_log,
    )
    model = model.to("cpu").eval()
    model.consolidate(strict=True)
    flops += result.flops + result.teacher_flops

    # 5. perplexity on every domain seen so far
    ppl: dict[str, float] = {}
    for d, c in [*earlier.items(), (domain, data)]:
        valid = prompted(_blocks(c, "valid", tok, spec, None)[:max_eval_blocks], d)
        ppl[d] = perplexity(model, valid, mask_token_id=tok.mask_token_id)
    matrix_rows: list[dict[str, float]] = [*(parent_record["ppl_matrix"] if parent_record else []), ppl]
    domains = [*(e["domain"] for e in lineage), domain]
    matrix = [[row.get(d, float("nan")) for d in domains[: i + 1]] for i, row in enumerate(matrix_rows)]
    ap = average_perplexity(matrix[-1])
    ap_plus = average_increased_perplexity(matrix, t)
    cumulative = flops + (parent_record["flops"]["cumulative"] if parent_record else 0.0)
    wall = time.perf_counter() - started

    record: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "stage": t,
        "domain": domain,
        "strategy": strat.name,
        "schedule": sched.to_dict(),
        "corpus": {
            "uri": source_uri or corpus,
            "etag": corpus_etag,
            "digest": data.digest,
            "files": list(data.files),
            "train_documents": len(data.train),
            "valid_documents": len(data.valid),
            "train_tokens": int(train_blocks.numel()),
        },
        "parent": None if parent is None else {"dir": str(Path(parent).resolve()), "stage": t - 1},
        "lineage": [
            *lineage,
            {"stage": t, "domain": domain, "model_dir": str(out.resolve()), "corpus_uri": source_uri or corpus},
        ],
        "growth": {
            "targets": targets,
            "operator": strat.growth,
            "init": strat.growth_init,
            "max_abs_logit_diff": growth_diff,
        },
        "dims": {
            "hidden_size": model.config.hidden_size,
            "intermediate_size": model.config.intermediate_size,
            "num_attention_heads": model.config.num_attention_heads,
            "num_hidden_layers": model.config.num_hidden_layers,
            "parameters": num_parameters(model),
        },
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
        "flops": {"stage": flops, "teachers": result.teacher_flops, "cumulative": cumulative},
        "wall_time_s": wall,
        "train": {
            "steps": result.steps,
            "tokens": result.tokens,
            "final_loss": result.final_loss,
            "resumed_from": result.resumed_from,
            "replay_ratio": config.replay_ratio,
            "world_size": distributed.world_size(),
            "fsdp": fsdp and distributed.world_size() > 1,
            "history": result.history,
        },
    }
    _write_stage(model, tok, record, out)
    if distributed.is_main():
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    logger.info("stage %d (%s) done: AP %.3f, AP+ %s", t, domain, ap, ap_plus)
    return StageResult(
        out_dir=str(out),
        stage=t,
        domain=domain,
        strategy=strat.name,
        ppl=ppl,
        ap=ap,
        ap_plus=ap_plus,
        flops=flops,
        cumulative_flops=cumulative,
        wall_time_s=wall,
        growth_max_abs_logit_diff=growth_diff,
        final_loss=result.final_loss,
        record=record,
    )


def _write_stage(model: LoirePreTrainedModel, tokenizer, record: dict[str, Any], out: Path) -> None:
    """Publish the stage folder: rank 0 writes it, every rank returns once it exists (under torchrun)."""
    if distributed.is_main():
        _publish_stage(model, tokenizer, record, out)
    distributed.barrier()


def _publish_stage(model: LoirePreTrainedModel, tokenizer, record: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / STAGE_FILE).write_text(json.dumps(record, indent=2, default=float))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
) -> dict[str, Any]:
    """All stages of one strategy over `domains`; writes `lifelong.json` and `ppl.png` to `out_dir`.

    `seed` (default: the schedule's) replaces the schedule's seed, which seeds the start model, growth,
    data order and replay draws; `max_eval_blocks` caps each domain's validation blocks.
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
    stages = []
    for index, domain in enumerate(domains, start=1):
        stage_dir = out / f"stage-{index}-{domain}"
        result = run_stage(
            domain,
            uris[domain],
            stage_dir,
            parent=parent,
            schedule=schedule,
            strategy=strategy,
            steps=steps,
            device=device,
            max_eval_blocks=max_eval_blocks,
            on_log=on_log,
            progress=progress,
        )
        stages.append(
            {
                "stage": result.stage,
                "domain": domain,
                "ppl": result.ppl,
                "ap": result.ap,
                "ap_plus": result.ap_plus,
                "flops": result.flops,
                "cumulative_flops": result.cumulative_flops,
                "wall_time_s": result.wall_time_s,
                "growth_max_abs_logit_diff": result.growth_max_abs_logit_diff,
                "dims": result.record["dims"],
            }
        )
        parent = stage_dir
    summary = {
        "strategy": strategy,
        "seed": schedule.seed,
        "domains": list(domains),
        "stages": stages,
        "total_flops": stages[-1]["cumulative_flops"],
        "total_wall_time_s": sum(s["wall_time_s"] for s in stages),
    }
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
