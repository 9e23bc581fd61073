"""Training a stage: AdamW, warmup + cosine decay, gradient accumulation, checkpoints, resume.

- Deterministic given the seed: the data order is a function of (seed, step), dropout RNG state is
  checkpointed, so a resumed run reproduces an uninterrupted one.
- Checkpoints (`checkpoint-<step>/`) are written to a temporary folder and renamed, with a `COMPLETE`
  marker written last; `resume` continues from the newest complete one. Only safetensors and
  `weights_only` loads are used. The last `keep_checkpoints` are kept.
- Growth devices open on a schedule over `device_steps` optimizer steps: λ of plug-in layers
  1 → 0 (scheduled) or, for learned λ, a cap 1 − progress on the learned value, so both reach 0 at
  the end of the window; the hidden mask 0 → 1. The caller consolidates after training.
- bf16 autocast on CUDA. Multi-GPU: run the same command under `torchrun --nproc_per_node=N` (or
  `accelerate launch`); with WORLD_SIZE > 1 the model is wrapped in DistributedDataParallel (or sharded
  with FSDP, `fsdp=True`) and every rank takes its share of each micro-batch; rank 0 writes checkpoints
  and logs the metrics of the global batch (see `loire.distributed`).
- A non-finite loss raises `TrainingDiverged` at once (nothing is saved from that step).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from loire import distributed
from loire.distill import DistillConfig, TeacherCache, build_teacher_cache, kd_loss
from loire.flops import flops_per_step, head_of
from loire.model import LoirePreTrainedModel, shifted_lm_loss
from loire.moments import MOMENT_KEYS

logger = logging.getLogger(__name__)

OnLog = Callable[[dict[str, float], int], None]


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    device_steps: int = 0  # λ / mask opening window (0 = devices fully open from step 0)
    distill: DistillConfig | None = None
    replay_ratio: float = 0.0  # fraction of each micro-batch drawn from replay memory
    mlm_probability: float = 0.15  # masked-LM models only
    checkpoint_every: int = 0  # 0 = no checkpoints
    keep_checkpoints: int = 2
    log_every: int = 10
    device: str = "auto"
    progress: bool = True
    fsdp: bool = False  # with WORLD_SIZE > 1: shard with FSDP instead of replicating with DDP

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name}={value!r} must be an int >= 1")
        for name in ("warmup_steps", "device_steps", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r} must be an int >= 0")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r} must be > 0")
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ValueError(f"TrainConfig.replay_ratio={self.replay_ratio!r} must lie in [0, 1)")


@dataclass
class TrainResult:
    steps: int
    tokens: int
    wall_time_s: float
    final_loss: float
    flops: float  # the whole run's training compute, a resumed run's included
    teacher_flops: float
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None
    moments: dict[str, dict[str, torch.Tensor]] | None = None  # AdamW's final state per parameter (keep_moments)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Batcher:
    """Deterministic micro-batches: the stream of block indices is a seeded permutation per epoch."""

    def __init__(
        self,
        blocks: torch.Tensor,
        config: TrainConfig,
        *,
        replay: torch.Tensor | None = None,
        is_causal: bool = True,
        mask_token_id: int | None = None,
        vocab_size: int | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise ValueError(f"training blocks must be a non-empty (N, T) tensor, got shape {tuple(blocks.shape)}")
        if not is_causal and mask_token_id is None:
            raise ValueError("masked-LM training needs mask_token_id")
        self.blocks, self.replay, self.config = blocks, replay, config
        self.is_causal, self.mask_token_id, self.vocab_size = is_causal, mask_token_id, vocab_size
        self.rank, self.world = rank, world
        self.num_replay = int(config.batch_size * config.replay_ratio) if replay is not None and len(replay) else 0
        self._perms: dict[tuple[int, int, int], torch.Tensor] = {}

    def _permutation(self, n: int, salt: int, epoch: int) -> torch.Tensor:
        key = (n, salt, epoch)
        if key not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + salt * 7919 + epoch)
            self._perms[key] = torch.randperm(n, generator=generator)
        return self._perms[key]

    def _indices(self, source: torch.Tensor, start: int, count: int, salt: int) -> torch.Tensor:
        n = source.shape[0]
        out = [int(self._permutation(n, salt, pos // n)[pos % n]) for pos in range(start, start + count)]
        return torch.tensor(out, dtype=torch.long)

    def micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels) of micro-batch `micro` of optimizer step `step` (this rank's rows)."""
        size = self.config.batch_size
        fresh = size - self.num_replay
        index = step * self.config.grad_accum + micro
        rows = self.blocks[self._indices(self.blocks, index * fresh, fresh, salt=0)]
        if self.num_replay:
            rows = torch.cat(
                [rows, self.replay[self._indices(self.replay, index * self.num_replay, self.num_replay, 1)]]
            )
        rows = rows[self.rank :: self.world]
        if self.is_causal:
            return rows, rows
        return self._mask(rows, index)

    def _mask(self, rows: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking (80% mask token, 10% random, 10% kept), seeded by the micro-batch index."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 104_729 + index)
        chosen = torch.rand(rows.shape, generator=generator) < self.config.mlm_probability
        labels = torch.where(chosen, rows, torch.full_like(rows, -100))
        roll = torch.rand(rows.shape, generator=generator)
        inputs = rows.clone()
        inputs[chosen & (roll < 0.8)] = self.mask_token_id
        random_ids = torch.randint(0, self.vocab_size, rows.shape, generator=generator)
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        inputs[swap] = random_ids[swap]
        return inputs, labels


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to min_lr_ratio at the last step."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, is_causal: bool) -> torch.Tensor:
    if is_causal:
        return shifted_lm_loss(logits, labels)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


# ----- checkpoints -----
def complete_checkpoints(directory: Path) -> list[Path]:
    found = [p for p in directory.glob("checkpoint-*") if (p / "COMPLETE").is_file() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


def save_checkpoint(directory: Path, model: LoirePreTrainedModel, optimizer, scheduler, step: int, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"checkpoint-{step}"
    tmp = directory / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(state, tmp / "trainer.pt")
    (tmp / "COMPLETE").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: LoirePreTrainedModel, optimizer, scheduler) -> int:
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    state = torch.load(path / "trainer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


# ----- growth devices -----
@torch.no_grad()
def open_devices(model: LoirePreTrainedModel, step: int, device_steps: int) -> float:
    """Set λ / mask for optimizer step `step` (0-based); returns the opening progress in [0, 1]."""
    progress = 1.0 if device_steps == 0 else min(1.0, (step + 1) / device_steps)
    if model.config.plugin_lambda_mode == "scheduled":
        model.set_plugin_lambda(1.0 - progress)
    else:  # learned λ, capped so that it reaches 0 at the end of the window
        for block in model.loire_base.layers:
            if block.plugin_lambda is not None:
                block.plugin_lambda.clamp_(0.0, 1.0 - progress)
    model.open_hidden_mask(progress)
    return progress


# ----- the steps of `train` -----
def _place(config: TrainConfig) -> tuple[torch.device, int, int]:
    """The training device, this process's rank and the number of processes (1 without torchrun)."""
    device = resolve_device(config.device)
    rank, world = distributed.init(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank())
    if world > 1 and config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world} processes")
    return device, rank, world


def _optimizer(
    net: torch.nn.Module, config: TrainConfig, *, fused: bool
) -> tuple[list[torch.nn.Parameter], torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The trained parameters, AdamW (no weight decay on vectors: norms and biases) and its lr schedule."""
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
        fused=fused,
    )
    return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))


def _resume(
    ckpt_dir: Path | None, model: LoirePreTrainedModel, net: torch.nn.Module, optimizer, scheduler, *, sharded: bool
) -> int:
    """The step to start from: that of the last complete checkpoint in `ckpt_dir` (loaded), else 0."""
    found = complete_checkpoints(ckpt_dir) if ckpt_dir is not None else []
    latest = distributed.agree(found[-1] if found else None)  # every rank resumes from rank 0's choice
    if latest is None:
        return 0
    if distributed.is_sharded_checkpoint(latest):
        start = distributed.load_sharded_checkpoint(latest, net, optimizer, scheduler)
    elif sharded:
        raise ValueError(f"{latest}: written without FSDP; resume it without --fsdp or delete {ckpt_dir}")
    else:
        start = load_checkpoint(latest, model, optimizer, scheduler)
    logger.info("resumed from %s (step %d)", latest, start)
    return start


def _teacher_cache(
    teachers: list[LoirePreTrainedModel], batcher: Batcher, config: TrainConfig, start: int, device: torch.device
) -> tuple[TeacherCache | None, float]:
    """The teachers' outputs over what is left of the distillation window, and the FLOPs of the whole window
    (a resumed run's record counts the stage's compute, as an uninterrupted run's does)."""
    distill = config.distill
    if not teachers or distill is None or distill.distill_steps <= start:
        return None, 0.0
    window = range(start * config.grad_accum, distill.distill_steps * config.grad_accum)
    inputs = [batcher.micro_batch(*divmod(i, config.grad_accum))[0] for i in window]
    cache = build_teacher_cache([t.to(device) for t in teachers], inputs, distill, device)
    flops = sum(
        distill.distill_steps
        * config.grad_accum
        * flops_per_step(t.config, inputs[0].shape[0], inputs[0].shape[1], training=False, head=head_of(t.config))
        for t in teachers
    )
    for t in teachers:
        t.to("cpu")
    return cache, flops


def _accumulate(
    net: torch.nn.Module,
    batcher: Batcher,
    config: TrainConfig,
    step: int,
    device: torch.device,
    cache: TeacherCache | None,
    kd_weight: float,
    start: int,
) -> dict[str, float]:
    """Forward and backward every micro-batch of optimizer step `step`; the step's mean loss, LM and KD losses."""
    is_causal = _unwrap(net).config.is_causal
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    totals = {"loss": 0.0, "lm": 0.0, "kd": 0.0}
    for micro in range(config.grad_accum):
        input_ids, labels = batcher.micro_batch(step, micro)
        input_ids, labels = input_ids.to(device), labels.to(device)
        with autocast:
            logits = net(input_ids=input_ids).logits
        loss = lm_loss(logits, labels, is_causal)
        totals["lm"] += loss.item() / config.grad_accum
        if kd_weight > 0:
            positions = None if is_causal else labels != -100
            kd = kd_loss(logits, cache, (step - start) * config.grad_accum + micro, positions)
            totals["kd"] += kd.item() / config.grad_accum
            loss = loss + kd_weight * kd
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite training loss ({loss.item()}) at step {step}: the stage is stopped")
        (loss / config.grad_accum).backward()
        totals["loss"] += loss.item() / config.grad_accum
    return totals


def _step_metrics(
    totals: dict[str, float], kd_weight: float, lr: float, grad_norm: float, opening: float
) -> dict[str, float]:
    return {
        "train/loss": totals["loss"],
        "train/lm_loss": totals["lm"],
        "train/kd_loss": totals["kd"],
        "train/kd_weight": kd_weight,
        "train/lr": lr,
        "train/grad_norm": grad_norm,
        "train/device_open": opening,
    }


def _checkpoint(
    ckpt_dir: Path | None,
    config: TrainConfig,
    done: int,
    model: LoirePreTrainedModel,
    net: torch.nn.Module,
    optimizer,
    scheduler,
    *,
    sharded: bool,
    rank: int,
) -> None:
    """Write a checkpoint after step `done` when one is due."""
    if ckpt_dir is None or not config.checkpoint_every or done % config.checkpoint_every:
        return
    if sharded:  # a collective: every rank writes its shards
        distributed.save_sharded_checkpoint(ckpt_dir, net, optimizer, scheduler, done, config.keep_checkpoints)
    elif rank == 0:
        save_checkpoint(ckpt_dir, model, optimizer, scheduler, done, config.keep_checkpoints)


def train(
    model: LoirePreTrainedModel,
    blocks: torch.Tensor,
    config: TrainConfig,
    *,
    teachers: list[LoirePreTrainedModel] | None = None,
    replay: torch.Tensor | None = None,
    mask_token_id: int | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    on_log: OnLog | None = None,
    initial_moments: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    keep_moments: bool = False,
) -> TrainResult:
    """Train `model` in place on packed `blocks` (N, T); returns what happened. Steps: `_place`, `_optimizer`,
    `_resume`, `_teacher_cache`, then per optimizer step `_accumulate`, clip and step, `_step_metrics`, `_checkpoint`.

    `initial_moments` (parameter name -> exp_avg / exp_avg_sq / step, see `loire.moments`) starts AdamW from a
    carried state instead of a cold one (a checkpoint being resumed replaces it); `keep_moments` returns the final
    state in `TrainResult.moments`.
    """
    device, rank, world = _place(config)
    torch.manual_seed(config.seed)
    sharded = config.fsdp and world > 1
    # FSDP trains a sharded copy (its parameters become DTensors) and gathers the result back into `model`.
    net = distributed.shard(copy.deepcopy(model), device) if sharded else model.to(device)
    net.train()
    batcher = Batcher(
        blocks,
        config,
        replay=replay,
        is_causal=model.config.is_causal,
        mask_token_id=mask_token_id,
        vocab_size=model.config.vocab_size,
        rank=rank,
        world=world,
    )
    params, optimizer, scheduler = _optimizer(net, config, fused=device.type == "cuda" and not sharded)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if initial_moments is not None or keep_moments:
        if sharded:
            raise ValueError("initial_moments / keep_moments: not supported with FSDP (fsdp=True)")
        _set_moments(net, optimizer, initial_moments or {})
    start = _resume(ckpt_dir if resume else None, model, net, optimizer, scheduler, sharded=sharded)
    if world > 1 and not sharded:
        net = torch.nn.parallel.DistributedDataParallel(model)
    distill = config.distill if teachers else None
    cache, teacher_flops = _teacher_cache(teachers or [], batcher, config, start, device)

    block_tokens = blocks.shape[1] * config.batch_size * config.grad_accum
    micro_batch = config.batch_size * config.grad_accum
    step_flops = flops_per_step(model.config, micro_batch, blocks.shape[1], head=head_of(model.config))
    history: list[dict[str, float]] = []
    progress = _Progress(config.steps, start, enabled=config.progress and rank == 0)
    started = window_start = time.perf_counter()
    window_tokens, loss_value = 0, float("nan")
    for step in range(start, config.steps):
        opening = open_devices(_unwrap(net), step, config.device_steps)
        kd_weight = distill.weight(step) if (distill is not None and cache is not None) else 0.0
        totals = _accumulate(net, batcher, config, step, device, cache, kd_weight, start)
        grad_norm = distributed.local_norm(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(f"non-finite gradient norm at step {step}: the stage is stopped")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:  # the metrics of the global batch, the same on every rank
            totals = dict(zip(totals, distributed.mean(list(totals.values()), device), strict=True))
        loss_value, done = totals["loss"], step + 1
        window_tokens += block_tokens
        if rank == 0 and (done % config.log_every == 0 or done == config.steps):
            metrics = _step_metrics(totals, kd_weight, scheduler.get_last_lr()[0], float(grad_norm), opening)
            metrics["train/tokens_per_s"] = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            metrics["train/tokens"] = float(done * block_tokens)
            history.append({"step": float(done), **metrics})
            if on_log is not None:
                on_log(metrics, done)
            window_tokens, window_start = 0, time.perf_counter()
        progress.update(done, loss_value, (done - start) * block_tokens / max(time.perf_counter() - started, 1e-9))
        _checkpoint(ckpt_dir, config, done, model, net, optimizer, scheduler, sharded=sharded, rank=rank)
    progress.close()
    if sharded:
        model.load_state_dict(distributed.full_state_dict(net))
        del net, optimizer
    open_devices(model, config.steps, config.device_steps)
    return TrainResult(
        steps=config.steps,
        tokens=config.steps * block_tokens,
        wall_time_s=time.perf_counter() - started,
        final_loss=loss_value,
        flops=config.steps * step_flops,  # the whole run's, resumed or not (like `tokens`)
        teacher_flops=teacher_flops,
        history=history,
        resumed_from=start or None,
        moments=_get_moments(model, optimizer) if keep_moments else None,
    )


def _set_moments(net: torch.nn.Module, optimizer, moments: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Put carried AdamW state into `optimizer` by parameter name; every name must be a trained parameter."""
    params = dict(_unwrap(net).named_parameters())
    unknown = sorted(set(moments) - set(params))
    if unknown:
        raise ValueError(f"initial_moments: no trained parameter named {unknown[:3]}")
    fused = any(group.get("fused") for group in optimizer.param_groups)
    for name, state in moments.items():
        p = params[name]
        if tuple(state["exp_avg"].shape) != tuple(p.shape):
            raise ValueError(f"initial_moments[{name!r}]: shape {tuple(state['exp_avg'].shape)} != {tuple(p.shape)}")
        optimizer.state[p] = {
            "step": state["step"].to(torch.float32).to(p.device if fused else "cpu").reshape(()),
            "exp_avg": state["exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
            "exp_avg_sq": state["exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone(),
        }


def _get_moments(model: LoirePreTrainedModel, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's state per parameter name, on the CPU (parameters that never stepped have none)."""
    return {
        name: {k: optimizer.state[p][k].detach().cpu().clone() for k in MOMENT_KEYS}
        for name, p in model.named_parameters()
        if p in optimizer.state and "exp_avg" in optimizer.state[p]
    }


def _unwrap(net: torch.nn.Module) -> LoirePreTrainedModel:
    return net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net  # type: ignore[return-value]


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _Progress:
    """A rich progress bar (loss, tokens/s via rate, ETA) when attached to a terminal."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f} {task.fields[tps]:.0f} tok/s"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
            self.bar.start()

    def update(self, done: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=loss, tps=tokens_per_s)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
