"""Analytic FLOPs for any LoireConfig.

Assumptions (each checked against `torch.utils.flop_counter.FlopCounterMode` in tests):
- A matmul of (m×k)·(k×n) costs 2·m·k·n FLOPs; biases, norms, activations and softmax are not
  counted (FlopCounterMode does not count them either), except the growth-time gate below.
- Attention scores and the weighted sum are counted over the full T×T square, as the math and
  CPU kernels compute it; fused causal kernels on GPU skip up to half of that (≈ 2·T·A per token).
- Training = forward + backward = 3 × forward (the backward pass computes the gradient with respect
  to inputs and weights, each a matmul of the forward's size).
- Growth-time devices: a λ-gated plug-in layer computes its whole block (λ does not skip work)
  plus λ·H + (1 − λ)·Block(H), 3·H FLOPs per token; masked norms cost a few elementwise ops per
  dim, which like other norms are not counted.
- Embedding lookups are free; the output layer is counted for every token (causal and masked LM)
  or once per sequence (sequence classification).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from loire.config import LoireConfig

HEADS = ("causal_lm", "masked_lm", "sequence_classification", "base")


@dataclass(frozen=True)
class FlopsPerToken:
    """Forward FLOPs per token, by component."""

    attention_projections: float
    attention_scores: float
    mlp: float
    output_head: float
    plugin_gates: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())


def forward_flops_per_token(config: LoireConfig, seq_len: int, head: str = "causal_lm") -> FlopsPerToken:
    """Forward FLOPs per token for a sequence of `seq_len` tokens."""
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not allowed; choose one of {list(HEADS)}")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    h, a, f, v, n_layers = (
        config.hidden_size,
        config.attention_size,
        config.intermediate_size,
        config.vocab_size,
        config.num_hidden_layers,
    )
    mlp_mats = 3 if config.mlp_type == "swiglu" else 2
    if head in ("causal_lm",):
        output = 2 * h * v
    elif head == "masked_lm":
        output = 2 * h * h + 2 * h * v  # dense transform + decoder
    elif head == "sequence_classification":
        output = 2 * h * config.num_labels / seq_len
    else:
        output = 0.0
    return FlopsPerToken(
        attention_projections=float(n_layers * 2 * (4 * h * a)),  # q, k, v (h→a) and o (a→h)
        attention_scores=float(n_layers * 2 * (2 * seq_len * a)),  # QKᵀ and AV over seq_len keys
        mlp=float(n_layers * 2 * mlp_mats * h * f),
        output_head=float(output),
        plugin_gates=float(len(config.plugin_layers) * 3 * h),
    )


def flops_per_token(config: LoireConfig, seq_len: int, *, training: bool = True, head: str = "causal_lm") -> float:
    """FLOPs per token: forward only (inference) or forward + backward (training)."""
    forward = forward_flops_per_token(config, seq_len, head).total
    return 3.0 * forward if training else forward


def head_of(config: LoireConfig) -> str:
    """The FLOPs head of a model's config: causal LM or masked LM."""
    return "causal_lm" if config.is_causal else "masked_lm"


def flops_per_step(
    config: LoireConfig, batch_size: int, seq_len: int, *, training: bool = True, head: str = "causal_lm"
) -> float:
    """FLOPs of one step over `batch_size` sequences of `seq_len` tokens."""
    return batch_size * seq_len * flops_per_token(config, seq_len, training=training, head=head)
