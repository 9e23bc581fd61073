"""Strictly function-preserving growth operators and the `grow()` entry point.

One operator per file, each a pure function (old model in, new model of the same class out; the
input is never modified):

- `hidden` (`hidden.grow_hidden`): hidden_size, any ratio, pre-LN / post-LN, LayerNorm / RMSNorm
- `ffn` (`ffn.grow_ffn`): intermediate_size
- `heads` (`heads.grow_heads`): num_attention_heads, head_dim fixed
- `layers` (`layers.grow_layers`): num_hidden_layers via λ-gated plug-in layers
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from loire.grow._surgery import WIDTH_INITS, check_init, owned_models
from loire.grow.ffn import grow_ffn
from loire.grow.heads import grow_heads
from loire.grow.hidden import grow_hidden
from loire.grow.layers import grow_layers
from loire.model import LoirePreTrainedModel

Operator = Callable[..., LoirePreTrainedModel]

# dimension name -> (operator, config field it grows). Applied by grow() in this order.
OPERATORS: dict[str, tuple[Operator, str]] = {
    "hidden": (grow_hidden, "hidden_size"),
    "ffn": (grow_ffn, "intermediate_size"),
    "heads": (grow_heads, "num_attention_heads"),
    "layers": (grow_layers, "num_hidden_layers"),
}


def validate_targets(model: LoirePreTrainedModel, targets: dict[str, Any]) -> dict[str, int]:
    """Check growth targets against the model; returns the ones that actually grow something."""
    if not isinstance(model, LoirePreTrainedModel):
        raise ValueError(
            f"grow() needs a Loire model, got {type(model).__name__} (convert it with loire.convert.from_hf)"
        )
    model.config.validate()
    unknown = sorted(set(targets) - set(OPERATORS))
    if unknown:
        raise ValueError(f"unknown growth dimension(s) {unknown}; known: {list(OPERATORS)}")
    active: dict[str, int] = {}
    for name, target in targets.items():
        if target is None:
            continue
        field = OPERATORS[name][1]
        current = getattr(model.config, field)
        if isinstance(target, bool) or not isinstance(target, int):
            raise ValueError(f"growth target {name}={target!r} must be an int (the new total {field})")
        if target < current:
            raise ValueError(f"growth target {name}={target} would shrink {field} from {current}; growth only adds")
        if target > current:
            active[name] = target
    return active


@torch.no_grad()
def grow(
    model: LoirePreTrainedModel,
    *,
    layers: int | None = None,
    heads: int | None = None,
    ffn: int | None = None,
    hidden: int | None = None,
    seed: int = 0,
    init: str = "pad",
    **unknown: Any,
) -> LoirePreTrainedModel:
    """Grow `model` to the given totals in one call; the result computes exactly what `model` computes.

    Targets are new totals (num_hidden_layers, num_attention_heads, intermediate_size, hidden_size);
    None or the current value leaves a dimension alone. Operators run hidden → ffn → heads → layers,
    each exact, so the composition is exact. `seed` seeds the random values of new parameters.
    `init` chooses how the width operators fill new units: "pad" (new units contribute 0) or "split"
    (new units duplicate old ones, with consumer weights shared through cancelling noise); both exact.
    """
    check_init(init)
    targets = validate_targets(model, {"layers": layers, "heads": heads, "ffn": ffn, "hidden": hidden, **unknown})
    grown = model
    with owned_models() as owned:
        for offset, name in enumerate(OPERATORS):
            if name in targets:
                grown = OPERATORS[name][0](grown, targets[name], seed=seed + offset, init=init)
                owned.add(id(grown))  # an intermediate: the next operator may reuse its tensors
    if grown is model:  # nothing to grow: still return a new, independent model
        grown = grow_ffn(model, model.config.intermediate_size, seed=seed)
    return grown


__all__ = [
    "OPERATORS",
    "WIDTH_INITS",
    "grow",
    "grow_ffn",
    "grow_heads",
    "grow_hidden",
    "grow_layers",
    "validate_targets",
]
