"""Perplexity (token-weighted, causal and masked), ELLE's AP / AP+ and the growth check helper."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from loire import LoireForCausalLM, LoireForMaskedLM, LoireModel
from loire.grow import grow
from loire.metrics import (
    PAD,
    average_increased_perplexity,
    average_perplexity,
    learnt_perplexity,
    max_abs_logit_diff,
    perplexity,
    ppl_frame,
)
from tests.conftest import build, tiny_config

# Hand-computed 3×3 example: matrix[s][i] = PPL on domain i after stage s (0-based inside).
MATRIX = [
    [10.0],
    [12.0, 8.0],
    [15.0, 9.0, 6.0],
]
AP = [10.0, 9.797958971132712, 9.321697517861575]  # 10; √(12·8) = √96; (15·9·6)^(1/3) = 810^(1/3)
AP_PLUS = [None, 2.0, 3.0]  # –; 12 − 10; ((15 − 10) + (9 − 8)) / 2


# --------------------------------------------------------------------------- AP / AP+


def test_average_perplexity_on_hand_computed_rows() -> None:
    for t, expected in enumerate(AP, start=1):
        assert average_perplexity(MATRIX[t - 1]) == pytest.approx(expected, rel=1e-14)


def test_average_increased_perplexity_on_hand_computed_matrix() -> None:
    assert average_increased_perplexity(MATRIX, 1) is None
    assert average_increased_perplexity(MATRIX, 2) == pytest.approx(2.0, rel=1e-14)
    assert average_increased_perplexity(MATRIX, 3) == pytest.approx(3.0, rel=1e-14)
    # Old domains that improved give a negative AP+ (less than no forgetting).
    assert average_increased_perplexity([[10.0], [7.0, 5.0]], 2) == pytest.approx(-3.0)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: average_perplexity([]), "ppl_row"),
        (lambda: average_perplexity([3.0, 0.0]), r"ppl_row\[1\]"),
        (lambda: average_perplexity([3.0, float("nan")]), r"ppl_row\[1\]"),
        (lambda: average_increased_perplexity(MATRIX, 0), "t=0"),
        (lambda: average_increased_perplexity(MATRIX, 4), "3 row"),
        (lambda: average_increased_perplexity([[1.0], [2.0]], 2), r"matrix\[1\]"),
    ],
)
def test_ap_errors_name_the_argument(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_ppl_frame_has_ap_and_ap_plus_per_stage() -> None:
    domains = ["WB", "NEWS", "REV"]
    frame = ppl_frame(domains, [dict(zip(domains, row, strict=False)) for row in MATRIX])
    assert list(frame.columns) == ["domain", *domains, "AP", "AP+"] and list(frame.index) == [1, 2, 3]
    assert list(frame["domain"]) == domains
    assert frame["AP"].tolist() == pytest.approx(AP, rel=1e-12)
    assert math.isnan(frame.loc[1, "AP+"]) and frame["AP+"].tolist()[1:] == pytest.approx(AP_PLUS[1:], rel=1e-12)
    assert math.isnan(frame.loc[1, "NEWS"])  # above the diagonal


def test_ppl_frame_skips_what_was_not_measured() -> None:
    frame = ppl_frame(["WB", "NEWS"], [{"WB": 10.0}, {"NEWS": 8.0}])
    assert frame.loc[2, "AP"] == pytest.approx(8.0) and math.isnan(frame.loc[2, "AP+"])


def test_learnt_perplexity_counts_carried_domains_as_learnt_where_carried() -> None:
    domains = ["WB", "NEWS", "REV"]
    rows = [dict(zip(domains, row, strict=False)) for row in MATRIX]
    for t in (1, 2, 3):  # one domain per stage: ELLE's AP / AP+ exactly
        ap, ap_plus = learnt_perplexity(rows[:t], [[d] for d in domains])
        assert ap == pytest.approx(AP[t - 1], rel=1e-12)
        assert ap_plus == (None if t == 1 else pytest.approx(AP_PLUS[t - 1], rel=1e-12))
    # stage 2 trained on NEWS and carried BIO (rejected elsewhere); stage 3 trained on REV
    rows = [{"WB": 10.0}, {"WB": 12.0, "BIO": 20.0, "NEWS": 8.0}, {"WB": 15.0, "BIO": 26.0, "NEWS": 9.0, "REV": 6.0}]
    learnt = [["WB"], ["BIO", "NEWS"], ["REV"]]
    ap, ap_plus = learnt_perplexity(rows, learnt)
    assert ap == pytest.approx((15 * 26 * 9 * 6) ** 0.25) and ap_plus == pytest.approx((5 + 6 + 1) / 3)
    frame = ppl_frame(["WB", "NEWS", "REV"], rows, [[], ["BIO"], []])
    assert list(frame.columns) == ["domain", "WB", "BIO", "NEWS", "REV", "AP", "AP+"]
    assert frame.loc[3, "AP"] == pytest.approx(ap) and frame.loc[3, "AP+"] == pytest.approx(ap_plus)


# --------------------------------------------------------------------------- perplexity


def _uniform(model: nn.Module, out_layer: nn.Linear) -> nn.Module:
    with torch.no_grad():
        out_layer.weight.zero_()
        if out_layer.bias is not None:
            out_layer.bias.zero_()
    return model


def test_uniform_causal_model_has_perplexity_vocab_size() -> None:
    model = build("gpt-tiny", LoireForCausalLM, tie_word_embeddings=False)
    model = _uniform(model, model.lm_head)
    blocks = torch.randint(0, 61, (5, 12), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, blocks, batch_size=2) == pytest.approx(61.0, rel=1e-12)


def test_uniform_masked_model_has_perplexity_vocab_size() -> None:
    model = build("bert-tiny", LoireForMaskedLM, tie_word_embeddings=False)
    model = _uniform(model, model.mlm_head.decoder)
    blocks = torch.randint(0, 61, (5, 12), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, blocks, mask_token_id=60) == pytest.approx(61.0, rel=1e-12)


class RepeatModel(nn.Module):
    """A causal stub: at each position, logit log 3 on the current token, 0 on the other 3 of 4.

    So p(next = current) = 3/6 = 1/2 and p(next = any other) = 1/6.
    """

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(is_causal=True, vocab_size=4)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=math.log(3.0) * F.one_hot(input_ids, 4).double())


def test_perplexity_is_token_weighted_not_block_averaged() -> None:
    blocks = torch.tensor(
        [
            [1, 1, 1, PAD, PAD, PAD, PAD, PAD, PAD],  # 2 predictions, both repeats: NLL 2·log 2
            [1, 2, 3, 0, 1, 2, 3, 0, 1],  # 8 predictions, none a repeat: NLL 8·log 6
        ]
    )
    token_weighted = (2**2 * 6**8) ** (1 / 10)  # exp((2 log 2 + 8 log 6) / 10) = 4.8164...
    block_averaged = math.sqrt(2 * 6)  # exp((log 2 + log 6) / 2), what per-block averaging would give
    ppl = perplexity(RepeatModel(), blocks)
    assert ppl == pytest.approx(token_weighted, rel=1e-12)
    assert abs(ppl - block_averaged) > 0.1
    assert perplexity(RepeatModel(), blocks, batch_size=1) == pytest.approx(token_weighted, rel=1e-12)


def test_causal_perplexity_with_padding_matches_unpadded_blocks() -> None:
    model = build("gpt-tiny", LoireForCausalLM)
    gen = torch.Generator().manual_seed(1)
    lengths = [12, 4, 9]
    blocks = torch.full((3, 12), PAD)
    for row, n in enumerate(lengths):
        blocks[row, :n] = torch.randint(0, 61, (n,), generator=gen)
    total, count = 0.0, 0
    with torch.no_grad():
        for row, n in enumerate(lengths):
            ids = blocks[row : row + 1, :n]
            logits = model(ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += n - 1
    expected = math.exp(total / count)
    assert perplexity(model, blocks) == pytest.approx(expected, rel=1e-10)
    assert perplexity(model, blocks, batch_size=1) == pytest.approx(expected, rel=1e-10)


def test_masked_pseudo_perplexity_is_deterministic_given_mask_seed() -> None:
    model = build("bert-tiny", LoireForMaskedLM).train()
    blocks = torch.randint(0, 60, (6, 16), generator=torch.Generator().manual_seed(2))
    first = perplexity(model, blocks, mask_seed=3, mask_token_id=60, batch_size=4)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert perplexity(model, blocks, mask_seed=3, mask_token_id=60, batch_size=4) == first
    assert perplexity(model, blocks, mask_seed=3, mask_token_id=60, batch_size=1) == pytest.approx(first, rel=1e-10)
    assert perplexity(model, blocks, mask_seed=4, mask_token_id=60) != pytest.approx(first, rel=1e-6)


def test_masked_pseudo_perplexity_scores_masked_positions_only() -> None:
    model = build("bert-tiny", LoireForMaskedLM)
    blocks = torch.randint(0, 60, (3, 10), generator=torch.Generator().manual_seed(5))
    # mask_prob=1 masks every position: the NLL is taken over all of them.
    inputs = torch.full_like(blocks, 60)
    with torch.no_grad():
        nll = F.cross_entropy(model(inputs).logits.reshape(-1, 61), blocks.reshape(-1))
    assert perplexity(model, blocks, mask_prob=1.0, mask_token_id=60) == pytest.approx(math.exp(nll), rel=1e-10)


def test_perplexity_restores_eval_mode_and_checks_arguments() -> None:
    model = build("gpt-tiny", LoireForCausalLM).eval()
    blocks = torch.randint(0, 61, (2, 8))
    perplexity(model, blocks)
    assert not model.training
    masked = build("bert-tiny", LoireForMaskedLM)
    with pytest.raises(ValueError, match="mask_token_id"):
        perplexity(masked, blocks)
    with pytest.raises(ValueError, match="mask_token_id=61"):
        perplexity(masked, blocks, mask_token_id=61)
    with pytest.raises(ValueError, match="mask_prob"):
        perplexity(masked, blocks, mask_token_id=1, mask_prob=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, blocks, batch_size=0)
    with pytest.raises(ValueError, match="2-D"):
        perplexity(model, blocks[0])
    with pytest.raises(ValueError, match="integer"):
        perplexity(model, blocks.float())
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        perplexity(model, blocks + 61)
    with pytest.raises(ValueError, match="no token to predict"):
        perplexity(model, blocks[:, :1])
    with pytest.raises(ValueError, match="is_causal"):
        perplexity(nn.Linear(2, 2), blocks)


# --------------------------------------------------------------------------- growth check


def test_max_abs_logit_diff_measures_growth_without_touching_inputs() -> None:
    old = LoireForCausalLM(tiny_config("gpt-tiny")).train()  # float32, training mode
    new = grow(old, hidden=26, ffn=40, heads=4, layers=3, seed=0).train()
    snapshot = {k: v.clone() for k, v in old.state_dict().items()}
    ids = torch.randint(0, 61, (2, 9))
    assert max_abs_logit_diff(old, new, ids) < 1e-6  # new parameters were rounded to float32 by growth
    assert old.training and new.training
    assert next(old.parameters()).dtype == torch.float32 and next(new.parameters()).dtype == torch.float32
    assert all(torch.equal(v, snapshot[k]) for k, v in old.state_dict().items())
    changed = copy.deepcopy(new)
    with torch.no_grad():
        changed.lm_head.weight.add_(0.1 * torch.randn_like(changed.lm_head.weight))
    assert max_abs_logit_diff(old, changed, ids) > 1e-3
    old64 = build("gpt-tiny", LoireForCausalLM)  # grown in float64: exact to float64 rounding
    assert max_abs_logit_diff(old64, grow(old64, hidden=26, ffn=40, heads=4, layers=3, seed=0), ids) < 1e-12


def test_max_abs_logit_diff_on_base_models_uses_hidden_states() -> None:
    model = build("llama-tiny", LoireModel)
    ids = torch.randint(0, 61, (2, 7))
    assert max_abs_logit_diff(model, model, ids) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        max_abs_logit_diff(model, grow(model, hidden=24), ids)
