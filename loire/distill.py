"""LOIRE's iterative distillation warmup: L = L_LM + w(s) · Σ_{j<t} β_j · KL(P_j ‖ P_t).

P_j are the frozen models of earlier stages (teachers), P_t the model being trained. Three choices,
each documented because the paper leaves them open:

- **β_j** default uniform, β_j = 1/(t−1) (the teachers' total weight is 1); configurable per stage.
- **Window and decay**: the term is active for the first `distill_steps` optimizer steps of a stage
  and its weight decays linearly, w(s) = 1 − s/distill_steps, as ELLE's knowledge-inheritance loss
  does (r = 1 − step / max_update_distil), so the new domain takes over once the grown model has
  settled. Temperature τ softens both distributions; the term is multiplied by τ² (Hinton et al.).
- **Teacher cost does not grow with the number of stages in the hot loop.** The gradient of
  Σ_j β_j KL(P_j ‖ Q) with respect to Q equals that of B · KL(M ‖ Q) with B = Σ_j β_j and the
  mixture M = Σ_j β_j P_j / B (the KL's entropy terms are constants). So the teachers run once per
  stage over the (deterministic) warmup batches, before training, and we cache the top-k of the
  mixture M per token plus the remaining mass. The hot loop then costs one gather of k student
  log-probabilities per token, whatever the number of teachers. The cached loss is the KL between
  M and Q on the partition {top-k tokens, everything else}: exact on the top-k, and a lower bound on
  the full KL (the data-processing inequality); with k = vocab it is exact. The logged value
  `train/kd_loss` is B · KL(M ‖ Q), which differs from Σ_j β_j KL(P_j ‖ Q) by a constant.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """Iterative-distillation settings for one stage."""

    distill_steps: int  # warmup window, in optimizer steps
    betas: tuple[float, ...] | None = None  # one per teacher; None = uniform 1/(number of teachers)
    temperature: float = 1.0
    top_k: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.distill_steps, bool) or not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise ValueError(f"distill_steps={self.distill_steps!r} must be an int >= 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 1")
        if self.betas is not None and any(b < 0 for b in self.betas):
            raise ValueError(f"betas={self.betas!r} must be >= 0")

    def resolved_betas(self, num_teachers: int) -> tuple[float, ...]:
        if self.betas is None:
            return tuple(1.0 / num_teachers for _ in range(num_teachers)) if num_teachers else ()
        if len(self.betas) != num_teachers:
            raise ValueError(f"betas has {len(self.betas)} value(s) but there are {num_teachers} teacher(s)")
        return tuple(float(b) for b in self.betas)

    def weight(self, step: int) -> float:
        """w(s): linear decay 1 → 0 over the window, 0 after it."""
        if step >= self.distill_steps:
            return 0.0
        return 1.0 - step / self.distill_steps


@dataclass
class TeacherCache:
    """Top-k of the β-weighted teacher mixture for the positions of each warmup micro-batch."""

    indices: list[torch.Tensor]  # per micro-batch: (B, T, k) int64
    log_probs: list[torch.Tensor]  # per micro-batch: (B, T, k) float32, log M at those tokens
    rest_log_mass: list[torch.Tensor]  # per micro-batch: (B, T) float32, log of M's remaining mass
    total_beta: float
    temperature: float
    num_teachers: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.indices, *self.log_probs, *self.rest_log_mass))


@torch.no_grad()
def build_teacher_cache(
    teachers: Sequence[torch.nn.Module],
    batches: Sequence[torch.Tensor],
    config: DistillConfig,
    device: torch.device | str = "cpu",
) -> TeacherCache:
    """Run every teacher once over the warmup micro-batches and cache the mixture's top-k."""
    betas = config.resolved_betas(len(teachers))
    total = sum(betas)
    tau = config.temperature
    indices, log_probs, rest = [], [], []
    for model in teachers:
        model.eval()
    for input_ids in batches:
        input_ids = input_ids.to(device)
        mixture = None
        for beta, model in zip(betas, teachers, strict=True):
            logits = model(input_ids=input_ids).logits.float()  # (B, T, V)
            p = F.softmax(logits / tau, dim=-1) * (beta / total)
            mixture = p if mixture is None else mixture + p
        k = min(config.top_k, mixture.shape[-1])
        top, idx = mixture.topk(k, dim=-1)  # (B, T, k)
        rest_mass = (1.0 - top.sum(-1)).clamp_min(1e-12)
        indices.append(idx.cpu())
        log_probs.append(top.clamp_min(1e-30).log().cpu())
        rest.append(rest_mass.log().cpu())
    cache = TeacherCache(indices, log_probs, rest, total, tau, len(teachers))
    logger.info(
        "teacher cache: %d teacher(s), %d micro-batches, %.1f MB", len(teachers), len(batches), cache.nbytes() / 1e6
    )
    return cache


def kd_loss(
    student_logits: torch.Tensor,
    cache: TeacherCache,
    micro_batch: int,
    position_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """B · τ² · KL(M ‖ Q) on the partition {top-k, rest}, averaged over (masked) positions."""
    tau = cache.temperature
    idx = cache.indices[micro_batch].to(student_logits.device)
    log_m = cache.log_probs[micro_batch].to(student_logits.device)
    log_m_rest = cache.rest_log_mass[micro_batch].to(student_logits.device)
    log_q_all = F.log_softmax(student_logits.float() / tau, dim=-1)  # (B, T, V)
    log_q = log_q_all.gather(-1, idx)  # (B, T, k)
    q_rest = (1.0 - log_q.exp().sum(-1)).clamp_min(1e-12)  # (B, T)
    m = log_m.exp()
    m_rest = log_m_rest.exp()
    per_token = (m * (log_m - log_q)).sum(-1) + m_rest * (log_m_rest - q_rest.log())  # (B, T)
    if position_mask is not None:
        per_token = per_token[position_mask]
    return cache.total_beta * tau * tau * per_token.mean()


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(P ‖ Q) per position over the full vocabulary (reference for tests and token-level KD)."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
