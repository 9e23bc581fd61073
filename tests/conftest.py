"""Shared helpers: tiny configs of the three families and full randomisation of parameters."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loire
from loire import LoireConfig, LoireForCausalLM, LoireForMaskedLM, LoireForSequenceClassification
from loire.model import LoireNorm, LoirePreTrainedModel

FAMILIES = ("gpt-tiny", "bert-tiny", "llama-tiny")
HEADS = (LoireForCausalLM, LoireForMaskedLM, LoireForSequenceClassification)
DATA_ROOT = Path(os.environ.get("LOIRE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def every_family_and_head(max_examples: int) -> Callable[[Callable[..., None]], Any]:
    """A hypothesis property `test(family, head, data)` run over every family × head, `max_examples` draws each."""

    def decorate(test: Callable[..., None]) -> Any:
        test = given(data=st.data())(test)
        test = settings(
            max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
        )(test)
        test = pytest.mark.parametrize("head", HEADS, ids=lambda c: c.__name__)(test)
        return pytest.mark.parametrize("family", FAMILIES)(test)

    return decorate


def tiny_config(family: str, **overrides: object) -> LoireConfig:
    """A very small member of a family (float64 tests run many of these)."""
    dims = dict(
        vocab_size=61,
        hidden_size=20,
        num_hidden_layers=2,
        num_attention_heads=3,
        head_dim=6,
        intermediate_size=36,
        max_position_embeddings=32,
        num_labels=3,
    )
    return loire.preset(family, **{**dims, **overrides})


def tiny_lm(tokenizer: Any, seed: int = 0, **dims: Any) -> LoireForCausalLM:
    """A seeded causal `tiny_config("gpt-tiny", **dims)` sized to `tokenizer` (vocabulary, pad / bos / eos)."""
    torch.manual_seed(seed)
    special = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos")}
    return LoireForCausalLM(tiny_config("gpt-tiny", vocab_size=len(tokenizer), **special, **dims)).eval()


@torch.no_grad()
def randomize(model: LoirePreTrainedModel, seed: int = 0, scale: float = 0.3) -> LoirePreTrainedModel:
    """Give every parameter a random value; norm γ/β far from identity (identity-like values hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, LoireNorm)}
    for name, p in model.named_parameters():
        if name.endswith("plugin_lambda"):
            continue
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
        p.copy_(1.0 + 0.5 * noise if id(p) in norms else scale * noise)
    return model


def build(
    family: str, head: type[LoirePreTrainedModel], seed: int = 0, dtype=torch.float64, **overrides
) -> LoirePreTrainedModel:
    model = head(tiny_config(family, **overrides)).to(dtype).eval()
    return randomize(model, seed)


def probe(model: LoirePreTrainedModel, seed: int = 0, batch: int = 2, length: int = 9) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 3 :] = 0  # right padding in the last row
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model: LoirePreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_exact(old: torch.Tensor, new: torch.Tensor, rel: float) -> None:
    bound = rel * max(1.0, float(old.abs().max()))
    diff = float((old - new).abs().max())
    assert diff <= bound, f"max |Δlogits| = {diff:.3g} > {bound:.3g}"


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=HEADS, ids=lambda c: c.__name__)
def head(request: pytest.FixtureRequest) -> type[LoirePreTrainedModel]:
    return request.param
