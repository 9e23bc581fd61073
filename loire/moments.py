"""AdamW's state carried across growth, instead of a cold optimizer (Staged Training, Shen et al. 2022).

A grown model's parameter entries are either *copies* of the parent's entries (the old block of a padded
matrix, a duplicated unit or layer) or *new* (free values, mean padding, rescaled or split weights).
`trace_growth` finds which without asking the operators: it grows the parent twice with every parameter
entry replaced by a distinct integer id (float64, two different id assignments), and an entry that holds
the same parent entry's id in both growths is a copy of it. An average, a rescaled or a random value is
not an integer id of the same entry twice, so nothing computed is mistaken for a copy.

`carry_moments` then gives each copy the parent entry's first and second moments and step, and each new
entry of a tensor that has copies a zero first moment and the mean second moment of that tensor's copies,
so its first updates have its neighbours' size rather than AdamW's cold-start steps of ±lr. A tensor with
no copied entry (a new layer's plug-in λ, say) starts cold, as it would without carrying.

The state is stored per parameter name (`save_moments` / `load_moments`: one safetensors file with
`<name>.exp_avg`, `<name>.exp_avg_sq` and `<name>.step`), and `loire.train.train(initial_moments=...)`
puts it into the optimizer before the first step.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from loire.model import LoirePreTrainedModel

Moments = dict[str, dict[str, torch.Tensor]]  # parameter name -> {"exp_avg", "exp_avg_sq", "step"}
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "step")
_EXACT_IDS = 2**52  # float64 holds every integer below this exactly


@dataclass(frozen=True)
class CarryReport:
    """How much of the grown model starts with carried moments."""

    tensors: int  # parameters with any carried entry
    cold_tensors: int  # parameters that start cold (no entry is a copy)
    copied_fraction: float  # share of all grown entries that are copies of a parent entry

    def to_dict(self) -> dict[str, float]:
        return {"tensors": self.tensors, "cold_tensors": self.cold_tensors, "copied_fraction": self.copied_fraction}


def _with_ids(model: LoirePreTrainedModel, ids: torch.Tensor) -> LoirePreTrainedModel:
    """A float64 copy of `model` whose parameter entries are `ids`, in `named_parameters` order."""
    probe = copy.deepcopy(model).to(torch.float64)
    offset = 0
    with torch.no_grad():
        for _, p in probe.named_parameters():
            p.copy_(ids[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return probe


@torch.no_grad()
def trace_growth(
    model: LoirePreTrainedModel, transform: Callable[[LoirePreTrainedModel], LoirePreTrainedModel]
) -> dict[str, torch.Tensor]:
    """For each parameter of `transform(model)`: per entry, the flat index (into `model`'s parameters
    concatenated in `named_parameters` order) of the parent entry it copies, or -1 where it is new.

    `transform` must be deterministic (the same seed both times), as every growth operator is."""
    total = sum(p.numel() for p in model.parameters())
    if total >= _EXACT_IDS:
        raise ValueError(f"trace_growth: {total} parameters exceed float64's exact integers")
    first = torch.arange(1, total + 1, dtype=torch.float64)
    second = torch.randperm(total, generator=torch.Generator().manual_seed(0)).to(torch.float64) + 1
    grown_first = dict(transform(_with_ids(model, first)).named_parameters())
    grown_second = dict(transform(_with_ids(model, second)).named_parameters())
    sources: dict[str, torch.Tensor] = {}
    for name, a in grown_first.items():
        a, b = a.detach().flatten(), grown_second[name].detach().flatten()
        rounded = a.round()
        is_id = (a == rounded) & (rounded >= 1) & (rounded <= total)
        src = torch.where(is_id, rounded.long() - 1, -1)
        is_copy = is_id & (second[src.clamp(min=0)] == b)  # the same parent entry under both id assignments
        sources[name] = torch.where(is_copy, src, -1).view(grown_first[name].shape)
    return sources


def carry_moments(
    parent: LoirePreTrainedModel, moments: Mapping[str, Mapping[str, torch.Tensor]], sources: Mapping[str, torch.Tensor]
) -> tuple[Moments, CarryReport]:
    """The grown model's initial AdamW state from the parent's `moments` and `trace_growth`'s `sources`.

    A parent parameter without moments (not trained) counts as new wherever it was copied."""
    params = list(parent.named_parameters())
    for name, p in params:
        state = moments.get(name)
        if state is not None and tuple(state["exp_avg"].shape) != tuple(p.shape):
            raise ValueError(f"moments of {name!r}: shape {tuple(state['exp_avg'].shape)} != {tuple(p.shape)}")

    def flat(key: str) -> torch.Tensor:  # the parent's moments in trace_growth's index space (zeros where none)
        return torch.cat(
            [
                moments[n][key].flatten().double() if n in moments else torch.zeros(p.numel(), dtype=torch.float64)
                for n, p in params
            ]
        )

    m, v = flat("exp_avg"), flat("exp_avg_sq")
    known = torch.cat([torch.full((p.numel(),), n in moments) for n, p in params])
    step = max((float(state["step"]) for state in moments.values()), default=0.0)  # one optimizer: one step count
    out: Moments = {}
    copied_entries = total_entries = cold = 0
    for name, src in sources.items():
        flat = src.flatten()
        copied = flat >= 0
        copied[copied.clone()] = known[flat[copied]]
        total_entries += flat.numel()
        if not copied.any():
            cold += 1
            continue
        idx = flat[copied]
        copied_entries += int(copied.sum())
        exp_avg = torch.zeros(flat.numel(), dtype=torch.float64)
        exp_avg_sq = torch.full((flat.numel(),), float(v[idx].mean()), dtype=torch.float64)
        exp_avg[copied], exp_avg_sq[copied] = m[idx], v[idx]
        out[name] = {
            "exp_avg": exp_avg.view(src.shape).float(),
            "exp_avg_sq": exp_avg_sq.view(src.shape).float(),
            "step": torch.tensor(step, dtype=torch.float32),
        }
    report = CarryReport(len(out), cold, copied_entries / max(total_entries, 1))
    return out, report


def save_moments(moments: Mapping[str, Mapping[str, torch.Tensor]], path: str | os.PathLike[str]) -> None:
    """One safetensors file: `<parameter>.exp_avg`, `.exp_avg_sq` and `.step` per parameter."""
    tensors = {
        f"{name}.{key}": state[key].detach().cpu().contiguous()
        for name, state in moments.items()
        for key in MOMENT_KEYS
    }
    save_file(tensors, str(path))


def load_moments(path: str | os.PathLike[str]) -> Moments:
    """What `save_moments` wrote, checked: every parameter has its three tensors."""
    moments: Moments = {}
    for key, tensor in load_file(str(path)).items():
        name, _, part = key.rpartition(".")
        if part not in MOMENT_KEYS or not name:
            raise ValueError(f"{path}: unexpected tensor {key!r} (expected <parameter>.{{{','.join(MOMENT_KEYS)}}})")
        moments.setdefault(name, {})[part] = tensor
    for name, state in moments.items():
        missing = [k for k in MOMENT_KEYS if k not in state]
        if missing:
            raise ValueError(f"{path}: parameter {name!r} lacks {', '.join(missing)}")
    return moments


__all__ = ["CarryReport", "Moments", "carry_moments", "load_moments", "save_moments", "trace_growth"]
