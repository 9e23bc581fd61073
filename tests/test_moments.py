"""AdamW's state carried across growth: provenance tracing, the carried moments, training, lifelong stages."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from loire import LoireForCausalLM, LoireForMaskedLM
from loire.grow import grow
from loire.lifelong import MOMENTS_FILE, read_stage, run_stage
from loire.moments import carry_moments, load_moments, save_moments, trace_growth
from loire.strategies import STRATEGIES
from loire.train import TrainConfig, train
from tests.conftest import build
from tests.test_lifelong import small_schedule, write_corpus

HEAD = {"gpt-tiny": LoireForCausalLM, "bert-tiny": LoireForMaskedLM, "llama-tiny": LoireForCausalLM}


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for _, p in model.named_parameters()])


@pytest.mark.parametrize("init", ["pad", "split"])
@pytest.mark.parametrize("target", ["hidden", "ffn", "heads", "layers"])
def test_traced_copies_hold_the_parent_entries_they_name(family: str, target: str, init: str) -> None:
    model = build(family, HEAD[family])
    c = model.config
    size = {
        "hidden": c.hidden_size * 2,
        "ffn": c.intermediate_size * 2,
        "heads": c.num_attention_heads * 2,
        "layers": c.num_hidden_layers * 2,
    }[target]

    def transform(m):
        return grow(m, **{target: size}, seed=3, init=init)

    before = copy.deepcopy(model.state_dict())
    sources = trace_growth(model, transform)
    grown, parent = transform(model), flat_parameters(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the parent is untouched
    copied = total = 0
    for name, p in grown.named_parameters():
        src = sources[name].flatten()
        assert sources[name].shape == p.shape
        is_copy = src >= 0
        torch.testing.assert_close(p.detach().flatten()[is_copy], parent[src[is_copy]], rtol=0, atol=0)
        copied, total = copied + int(is_copy.sum()), total + src.numel()
    assert 0 < copied <= total
    if target == "hidden" and init == "pad":  # the old block of the token embeddings is copied as it was
        emb = sources["model.embed_tokens.weight"]
        assert (emb[:, : c.hidden_size] >= 0).all() and (emb[:, c.hidden_size :] < 0).all()


def test_no_growth_traces_every_entry_to_itself() -> None:
    model = build("gpt-tiny", LoireForCausalLM, dtype=torch.float32)
    sources = trace_growth(model, lambda m: m)
    assert torch.equal(torch.cat([s.flatten() for s in sources.values()]), torch.arange(flat_parameters(model).numel()))


def fake_moments(model: torch.nn.Module, step: float = 7.0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return {
        name: {
            "exp_avg": torch.randn(p.shape, generator=g),
            "exp_avg_sq": torch.rand(p.shape, generator=g) + 0.1,
            "step": torch.tensor(step),
        }
        for name, p in model.named_parameters()
    }


def test_copies_keep_their_moments_and_new_entries_start_level_with_them(tmp_path: Path) -> None:
    model = build("llama-tiny", LoireForCausalLM, dtype=torch.float32)
    h = model.config.hidden_size
    moments = fake_moments(model)
    sources = trace_growth(model, lambda m: grow(m, hidden=2 * h, seed=1))
    carried, report = carry_moments(model, moments, sources)
    emb = carried["model.embed_tokens.weight"]
    old = moments["model.embed_tokens.weight"]
    torch.testing.assert_close(emb["exp_avg"][:, :h], old["exp_avg"])
    torch.testing.assert_close(emb["exp_avg_sq"][:, :h], old["exp_avg_sq"])
    assert (emb["exp_avg"][:, h:] == 0).all()
    torch.testing.assert_close(
        emb["exp_avg_sq"][:, h:], torch.full_like(emb["exp_avg_sq"][:, h:], float(old["exp_avg_sq"].mean()))
    )
    assert float(emb["step"]) == 7.0 and 0 < report.copied_fraction < 1 and report.tensors == len(carried)

    save_moments(carried, tmp_path / MOMENTS_FILE)
    back = load_moments(tmp_path / MOMENTS_FILE)
    assert set(back) == set(carried) and torch.equal(back["model.embed_tokens.weight"]["exp_avg"], emb["exp_avg"])
    bad = dict(moments)
    bad["model.embed_tokens.weight"] = {**old, "exp_avg": old["exp_avg"][:, :-1]}
    with pytest.raises(ValueError, match=r"moments of 'model\.embed_tokens\.weight': shape"):
        carry_moments(model, bad, sources)


def test_a_parameter_without_moments_starts_cold() -> None:
    model = build("gpt-tiny", LoireForCausalLM, dtype=torch.float32)
    moments = fake_moments(model)
    del moments["lm_head.weight" if "lm_head.weight" in moments else next(iter(moments))]
    carried, report = carry_moments(model, moments, trace_growth(model, lambda m: m))
    assert report.cold_tensors == 1 and len(carried) == len(moments)


def test_training_on_from_carried_moments_equals_one_uninterrupted_run() -> None:
    """6 steps in one run == 3 steps, then 3 more from the first run's moments; a cold optimizer differs."""
    model = build("gpt-tiny", LoireForCausalLM, dtype=torch.float32)
    blocks = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    config = dict(batch_size=1, lr=1e-2, min_lr_ratio=1.0, progress=False, device="cpu", max_grad_norm=1e9)
    whole = copy.deepcopy(model)
    train(whole, blocks, TrainConfig(steps=6, **config))
    first = copy.deepcopy(model)
    kept = train(first, blocks, TrainConfig(steps=3, **config), keep_moments=True).moments
    assert kept is not None and float(next(iter(kept.values()))["step"]) == 3.0
    carried, cold = copy.deepcopy(first), copy.deepcopy(first)
    train(carried, blocks, TrainConfig(steps=3, **config), initial_moments=kept)
    train(cold, blocks, TrainConfig(steps=3, **config))
    torch.testing.assert_close(flat_parameters(carried), flat_parameters(whole), rtol=0, atol=0)
    assert float((flat_parameters(cold) - flat_parameters(whole)).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="no trained parameter named"):
        train(
            copy.deepcopy(model),
            blocks,
            TrainConfig(steps=1, **config),
            initial_moments={"nope": kept[next(iter(kept))]},
        )


def test_a_carrying_strategy_keeps_and_carries_moments_across_a_growth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    carrying = dataclasses.replace(STRATEGIES["loire"], name="loire-carry-test", carry_moments=True)
    monkeypatch.setitem(STRATEGIES, carrying.name, carrying)
    a, b = write_corpus(tmp_path / "a", 0), write_corpus(tmp_path / "b", 1)
    run = dict(schedule=small_schedule(steps=6), strategy=carrying.name, progress=False, max_eval_blocks=4)
    run_stage("WB", str(a), tmp_path / "s1", **run)
    assert read_stage(tmp_path / "s1")["train"]["moments"] == {"carried_from": None}
    s2 = run_stage("NEWS", str(b), tmp_path / "s2", parent=tmp_path / "s1", **run)
    record = read_stage(tmp_path / "s2")["train"]["moments"]
    assert record["carried_from"] == str(tmp_path / "s1" / MOMENTS_FILE)
    assert 0 < record["copied_fraction"] < 1 and record["tensors"] > 0
    assert s2.growth_max_abs_logit_diff < 1e-4  # carrying the optimizer changes nothing at the moment of growth
    from loire.io import load_model

    names = {n for n, _ in load_model(tmp_path / "s2").named_parameters()}
    assert set(load_moments(tmp_path / "s2" / MOMENTS_FILE)) <= names
    assert not (tmp_path / "plain").exists()
    plain = run_stage("WB", str(a), tmp_path / "plain", **{**run, "strategy": "loire"})
    assert "moments" not in plain.record["train"] and not (tmp_path / "plain" / MOMENTS_FILE).exists()


def test_carrying_is_refused_where_there_is_no_state_to_carry() -> None:
    for base in ("retrain", "elle"):  # a model from scratch; a recovery warmup before the main run
        with pytest.raises(ValueError, match="carry_moments needs a grown parent"):
            dataclasses.replace(STRATEGIES[base], carry_moments=True)
    with pytest.raises(ValueError, match="carry_moments=1 must be True or False"):
        dataclasses.replace(STRATEGIES["loire"], carry_moments=1)
