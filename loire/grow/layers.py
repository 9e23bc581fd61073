"""Depth growth: LOIRE's plug-in layer operator, num_hidden_layers L1 → L2."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loire.grow._surgery import keep, layer_key, new_config, parsed_state, rebuild
from loire.model import LoirePreTrainedModel


def spread_evenly(num_layers: int, num_new: int) -> list[int]:
    """Source layers for `num_new` copies, spread evenly over `num_layers` (repeats when num_new > L)."""
    return sorted((int((k + 0.5) * num_layers / num_new)) % num_layers for k in range(num_new))


def grow_layers(
    model: LoirePreTrainedModel,
    num_hidden_layers: int,
    *,
    sources: Sequence[int] | None = None,
    seed: int = 0,
    init: str = "pad",
) -> LoirePreTrainedModel:
    """Insert a copy of each source layer right after its original, as a λ-gated plug-in layer.

    The plug-in layer computes H' = λ·H + (1 − λ)·Block(H) with λ = 1 at insertion.

    Why it preserves the function: with λ = 1 the plug-in's output is exactly its input H, whatever
    its weights, so the network is the old composition of blocks, for pre-LN and post-LN alike (a
    zeroed residual branch would not be an identity under post-LN). The copy starts from its
    original's weights, so when λ moves towards 0 the stack first behaves like the block applied
    twice rather than a random block. λ follows `config.plugin_lambda_mode`: "scheduled" (default:
    the trainer ramps it linearly 1 → 0 over the warmup, as Masked Structural Growth ramps its layer
    mask) or "learned" (a parameter; its gradient ⟨g, H − Block(H)⟩ is nonzero from the first step).
    `sources` lists the original layer of each copy (default: spread evenly); `seed` and `init` (the
    width operators' option) are unused because copies are deterministic.
    """
    old_layers = model.config.num_hidden_layers
    num_new = num_hidden_layers - old_layers
    sources = spread_evenly(old_layers, num_new) if sources is None else sorted(int(s) for s in sources)
    if len(sources) != num_new or any(not 0 <= s < old_layers for s in sources):
        raise ValueError(
            f"sources={list(sources)} must name {num_new} layer(s) in [0, {old_layers}) "
            f"to reach {num_hidden_layers} layers"
        )
    # new_index[i] = position of old layer i; copies_of[i] = positions of its plug-in copies.
    new_index: dict[int, int] = {}
    copies_of: dict[int, list[int]] = {}
    position = 0
    for i in range(old_layers):
        new_index[i] = position
        count = sources.count(i)
        copies_of[i] = list(range(position + 1, position + 1 + count))
        position += 1 + count
    plugin = [new_index[i] for i in model.config.plugin_layers] + [j for c in copies_of.values() for j in c]

    state: dict[str, torch.Tensor] = {}
    for p, t in parsed_state(model):
        if p.layer is None:
            state[p.key] = keep(model, t)
            continue
        state[layer_key(model, new_index[p.layer], p.local)] = keep(model, t)
        if p.kind == "plugin_lambda":
            continue  # a copy gets its own gate, opened below
        for j in copies_of[p.layer]:
            state[layer_key(model, j, p.local)] = t.detach().clone()
    for j in (j for c in copies_of.values() for j in c):
        like = next(iter(state.values()))
        state[layer_key(model, j, ("plugin_lambda",))] = torch.ones((), dtype=like.dtype, device=like.device)
    config = new_config(model, num_hidden_layers=num_hidden_layers, plugin_layers=plugin)
    return rebuild(model, config, state)
