"""FFN width growth: intermediate_size f1 → f2."""

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


def grow_ffn(
    model: LoirePreTrainedModel, intermediate_size: int, *, seed: int = 0, init: str = "pad"
) -> LoirePreTrainedModel:
    """Widen every FFN to `intermediate_size` units.

    Why it preserves the function: the FFN output is Σ_u down[:, u] · a_u(x), a sum over units.
    - init="pad": new units get fresh random up (and gate) rows and biases, so they compute some
      activation a_u(x), but their down-projection columns are zero, so they add exactly 0 to the sum.
      After the first optimizer step the zero columns move (their gradient is a_u(x) · upstream ≠ 0).
    - init="split": each new unit copies the up (and gate) rows and biases of a source unit, so it
      computes the source's activation a_s(x); the group {s, copies} shares down[:, s] as
      down[:, s]/m + z_k with Σ_k z_k = 0, so the group still adds down[:, s]·a_s(x). The new unit
      starts as a learned feature (as bert2BERT's copies do) and the cancelling noise breaks the
      symmetry between copies, yet nothing changes at the moment of growth.
    GELU and SwiGLU are elementwise per unit, so other units are untouched.
    """
    check_init(init)
    f1, f2 = model.config.intermediate_size, intermediate_size
    n = f2 - f1
    noise = Noise(seed, model.config.initializer_range)
    state: dict[str, torch.Tensor] = {}
    if init == "split":
        # up (and gate) rows (F, H) are copied, down columns (H, F) shared within each group
        state = split_width(model, split_members(f1, f2), ("up_weight", "up_bias"), "down_weight", noise)
        return rebuild(model, new_config(model, intermediate_size=f2), state)
    for p, t in parsed_state(model):
        if p.kind == "up_weight":  # (F, H): new rows read the stream with random weights
            t = cat(t, noise(n, t.shape[1], like=t), 0)
        elif p.kind == "up_bias":
            t = cat(t, noise(n, like=t), 0)
        elif p.kind == "down_weight":  # (H, F): new columns are zero, so new units write nothing
            t = cat(t, torch.zeros(t.shape[0], n, dtype=t.dtype, device=t.device), 1)
        else:
            t = keep(model, t)
        state[p.key] = t
    return rebuild(model, new_config(model, intermediate_size=f2), state)
