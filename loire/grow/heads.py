"""Attention-head growth: num_attention_heads a1 → a2 with head_dim fixed."""

from __future__ import annotations

import torch

from loire.grow._surgery import (
    Noise,
    cat,
    check_init,
    keep,
    new_config,
    parsed_state,
    rebuild,
    split_members,
    split_width,
)
from loire.model import LoirePreTrainedModel


def grow_heads(
    model: LoirePreTrainedModel, num_attention_heads: int, *, seed: int = 0, init: str = "pad"
) -> LoirePreTrainedModel:
    """Add attention heads to every layer, keeping head_dim (and so the 1/√d softmax scale).

    Why it preserves the function: multi-head attention is o_proj applied to the concatenation of
    the heads, i.e. Σ_heads o_proj[:, head] · head(x). Each head attends independently, so old
    heads compute what they did. New heads get fresh random Q/K/V rows (they do attend to
    something), but their o_proj input columns are zero, so they add exactly 0. After the first
    optimizer step those columns move and the new heads' Q/K/V start to receive gradient.
    With init="split" a new head copies the Q/K/V rows of a source head instead (so it attends and
    outputs exactly like it) and the group shares the source's o_proj columns as o/m + z_k with
    Σ_k z_k = 0: the group's sum is the source's contribution, and the cancelling noise makes the
    copies diverge from the first step.
    """
    check_init(init)
    d = model.config.head_dim
    a1 = model.config.num_attention_heads
    n = (num_attention_heads - a1) * d  # new rows of the attention width
    noise = Noise(seed, model.config.initializer_range)
    state: dict[str, torch.Tensor] = {}
    if init == "split":
        heads = split_members(a1, num_attention_heads)
        members = (heads[:, None] * d + torch.arange(d)[None]).reshape(-1)  # per attention-width row
        # Q/K/V rows (A, H) are copied, o_proj columns (H, A) shared within each group
        state = split_width(model, members, ("qkv_weight", "qkv_bias"), "o_weight", noise)
        return rebuild(model, new_config(model, num_attention_heads=num_attention_heads), state)
    for p, t in parsed_state(model):
        if p.kind == "qkv_weight":  # (A, H)
            t = cat(t, noise(n, t.shape[1], like=t), 0)
        elif p.kind == "qkv_bias":
            t = cat(t, noise(n, like=t), 0)
        elif p.kind == "o_weight":  # (H, A): the new heads' columns are zero
            t = cat(t, torch.zeros(t.shape[0], n, dtype=t.dtype, device=t.device), 1)
        else:
            t = keep(model, t)
        state[p.key] = t
    return rebuild(model, new_config(model, num_attention_heads=num_attention_heads), state)
