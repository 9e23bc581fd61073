"""Grow a model through LOIRE's schedule (Hidden → FFN → MHA → Layer) and show that nothing changes.

For each family (GPT-2-, BERT- and Llama-like) a tiny model M1 is grown stage by stage to M5; at
every boundary the table shows the new size, FLOPs per token and the measured max |Δlogits| on a
probe batch (float64, and float32). Plug-in layers are then opened (λ → 0) and consolidated.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

import loire
from loire.flops import flops_per_token
from loire.grow import grow
from loire.model import num_parameters

SCHEDULE = [("M2", {"hidden": 160}), ("M3", {"ffn": 720}), ("M4", {"heads": 6}), ("M5", {"layers": 6})]


@torch.no_grad()
def max_diff(old: torch.nn.Module, new: torch.nn.Module, ids: torch.Tensor) -> float:
    return float((old(input_ids=ids).logits - new(input_ids=ids).logits).abs().max())


def main() -> None:
    console = Console(width=150)
    torch.manual_seed(0)
    for family, cls in (
        ("gpt-tiny", loire.LoireForCausalLM),
        ("bert-tiny", loire.LoireForMaskedLM),
        ("llama-tiny", loire.LoireForCausalLM),
    ):
        model = cls(loire.preset(family)).double().eval()  # grow in float64: exactness is checked there
        ids = torch.randint(0, model.config.vocab_size, (4, 64))
        table = Table(title=f"{family}: LOIRE growth schedule")
        for column in (
            "stage",
            "growth",
            "hidden/ffn/heads/layers",
            "params",
            "train FLOPs/token",
            "max |Δlogits| f64",
            "max |Δlogits| f32",
        ):
            table.add_column(column)
        c = model.config
        table.add_row(
            "M1",
            "-",
            f"{c.hidden_size}/{c.intermediate_size}/{c.num_attention_heads}/{c.num_hidden_layers}",
            f"{num_parameters(model):,}",
            f"{flops_per_token(c, 64):.3g}",
            "-",
            "-",
        )
        for stage, targets in SCHEDULE:
            grown = grow(model, **targets, seed=len(table.rows)).eval()
            exact = max_diff(model, grown, ids)
            single = max_diff(model.float(), grown.float(), ids)
            model, grown = model.double(), grown.double()
            c = grown.config
            table.add_row(
                stage,
                ", ".join(f"{k}={v}" for k, v in targets.items()),
                f"{c.hidden_size}/{c.intermediate_size}/{c.num_attention_heads}/{c.num_hidden_layers}",
                f"{num_parameters(grown):,}",
                f"{flops_per_token(c, 64):.3g}",
                f"{exact:.2g}",
                f"{single:.2g}",
            )
            model = grown
        console.print(table)
        devices = model.plugin_lambdas()
        model.set_plugin_lambda(0.0)
        model.open_hidden_mask(1.0)
        model.consolidate()
        console.print(
            f"plug-in layers {sorted(devices)} opened (λ → 0) and consolidated: plain {type(model).__name__}\n"
        )


if __name__ == "__main__":
    main()
