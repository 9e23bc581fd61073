"""FFN width growth: intermediate_size f1 → f2."""

from __future__ import annotations

import torch

from loire.grow._surgery import Noise, cat, keep, new_config, parsed_state, rebuild
from loire.model import LoirePreTrainedModel


def grow_ffn(model: LoirePreTrainedModel, intermediate_size: int, *, seed: int = 0) -> LoirePreTrainedModel:
    """Widen every FFN to `intermediate_size` units.

    Why it preserves the function: the FFN output is Σ_u down[:, u] · a_u(x), a sum over units.
    New units get fresh random up (and gate) rows and biases, so they compute some activation
    a_u(x), but their down-projection columns are zero, so they add exactly 0 to the sum. GELU and
    SwiGLU are elementwise per unit, so old units are untouched. After the first optimizer step the
    zero columns move (their gradient is a_u(x) · upstream ≠ 0) and the new units start to learn.
    """
    f1, f2 = model.config.intermediate_size, intermediate_size
    n = f2 - f1
    noise = Noise(seed, model.config.initializer_range)
    state: dict[str, torch.Tensor] = {}
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
