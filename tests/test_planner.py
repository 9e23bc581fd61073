"""The growth planner: candidates, exact equal-compute probes, the grow-or-continue rule, and its stage record."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from loire.flops import flops_per_step
from loire.lifelong import plan_stage, run_stage
from loire.model import LoireForCausalLM
from loire.planner import PlannerConfig, candidates, plan_growth, probes_frame
from loire.schedule import Schedule, StageSpec, schedule_preset, stage_flops
from tests.conftest import tiny_config
from tests.test_lifelong import write_corpus


def _model(seed: int = 0) -> LoireForCausalLM:
    torch.manual_seed(seed)
    return LoireForCausalLM(tiny_config("gpt-tiny", hidden_size=24, num_attention_heads=2, head_dim=12)).eval()


def _blocks(n: int = 64, length: int = 16, seed: int = 0) -> torch.Tensor:
    # a learnable stream: each token is the previous one plus one (mod a small range)
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 40, (n, 1), generator=g)
    return (start + torch.arange(length)) % 40 + 1


def _decide(model: LoireForCausalLM, **planner: object):
    return plan_growth(
        model,
        _blocks(),
        budget_flops=240 * flops_per_step(model.config, 4, 16),
        later_stages=2,
        lr=3e-3,
        batch_size=4,
        warmup_steps=2,
        seed=3,
        planner=PlannerConfig(eval_blocks=8, **planner),
    )


def test_candidates_cover_each_dimension_and_round_hidden_to_whole_heads() -> None:
    config = tiny_config("gpt-tiny", hidden_size=24, num_attention_heads=2, head_dim=12, intermediate_size=36)
    cands = {c.name: c.targets for c in candidates(config, PlannerConfig(factors=(1.5, 2.0)))}
    assert cands["none"] == {}
    assert {"hidden=36", "hidden=48", "ffn=54", "ffn=72", "heads=3", "heads=4", "layers=3", "layers=4"} <= set(cands)
    assert cands["hidden=36 ffn=54"] == {"hidden": 36, "ffn": 54}  # 24 x 1.5 = 36 = 3 heads of 12
    assert len(cands) == len({tuple(sorted(t.items())) for t in cands.values()})  # no duplicates


def test_probes_are_exact_equal_compute_deterministic_and_the_threshold_decides() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    always = _decide(model, z=-1e9)  # any growth wins
    never = _decide(model, z=1e9)  # no growth can beat the threshold
    assert always.probes == never.probes  # deterministic given the seed: the same probes both times
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert always.probes[0].name == "none" and len(always.probes) == 6
    for p in always.probes:
        assert p.max_abs_logit_diff < 1e-4, p.name  # every candidate is grown exactly
        assert p.loss_start == pytest.approx(always.probes[0].loss_start, abs=1e-4)  # same function at the start
        assert p.loss < p.loss_start  # each probe trained
    steps = {p.name: p.steps for p in always.probes}
    assert steps["layers=4"] < steps["none"]  # equal compute: a bigger model takes fewer steps
    per_probe = 0.2 * always.budget_flops / len(always.probes)
    assert all(p.flops <= per_probe * 1.0001 for p in always.probes)
    assert always.probe_flops <= 0.2 * always.budget_flops * 1.0001
    # the rule: the best growth by held-out loss, taken only past the paired threshold
    assert always.chosen == min((p for p in always.probes if p.targets), key=lambda p: p.score).name
    assert always.targets and never.targets == {} and never.chosen == "none"
    assert "continue without growth" in never.reason and always.reason.startswith("grow:")
    table = probes_frame(dataclasses.asdict(always))
    assert list(table["name"]) == [p.name for p in always.probes] and table["chosen"].sum() == 1


def test_planner_config_and_schedule_fields_are_validated() -> None:
    with pytest.raises(ValueError, match="probe_share"):
        PlannerConfig(probe_share=1.5)
    with pytest.raises(ValueError, match=r"stages\[1\]\.plan: the growth planner decides the growth"):
        d = schedule_preset("gpt-micro").to_dict()
        d["stages"][1]["plan"] = True
        Schedule.from_dict(d)
    with pytest.raises(ValueError, match=r"stages\[0\]\.flops_budget"):
        d = schedule_preset("gpt-micro").to_dict()
        d["stages"][0]["flops_budget"] = -1
        Schedule.from_dict(d)
    spec = StageSpec(domain="X", steps=3, lr=1e-3, batch_size=2, block_size=8)
    assert "plan" not in spec.to_dict() and "flops_budget" not in spec.to_dict()  # old records unchanged


def test_planned_and_reverse_presets_spend_the_ladders_flops() -> None:
    ladder, planned, reverse = (schedule_preset(n) for n in ("gpt-tiny", "gpt-tiny-planned", "gpt-tiny-reverse"))
    for i in range(len(ladder)):
        assert stage_flops(planned, i) == pytest.approx(stage_flops(ladder, i))
        assert stage_flops(reverse, i) == pytest.approx(stage_flops(ladder, i))
    assert [s.plan for s in planned.stages] == [False, True, True, True, True]
    assert [next(iter(s.grow), None) for s in reverse.stages] == [None, "layers", "heads", "ffn", "hidden"]
    assert Schedule.from_dict(planned.to_dict()) == planned  # round trip through YAML-able types
    with pytest.raises(ValueError, match=r"stages\[1\]\.plan: the growth planner only probes exact growths"):
        plan_stage(planned, "elle", {"stage": 1, "strategy": "elle", "lineage": [{"domain": "WB"}]})


def test_planned_stage_records_the_decision_and_fits_its_flop_budget(tmp_path: Path) -> None:
    base = schedule_preset("gpt-micro-planned").to_dict()
    base["tokenizer_vocab_size"] = 320
    for i, stage in enumerate(base["stages"]):
        stage.update(max_train_tokens=8_192, steps=8, warmup_steps=1, distill_steps=2 if i else 0)
    schedule = Schedule.from_dict(base)
    a, b = write_corpus(tmp_path / "a", 0), write_corpus(tmp_path / "b", 1)
    run_stage("WB", str(a), tmp_path / "s1", schedule=schedule, progress=False)
    s2 = run_stage("NEWS", str(b), tmp_path / "s2", parent=tmp_path / "s1", schedule=schedule, progress=False)
    record = json.loads((tmp_path / "s2" / "stage.json").read_text())
    decision = record["growth"]["decision"]
    assert decision["chosen"] in [p["name"] for p in decision["probes"]]
    assert record["growth"]["targets"] == decision["targets"]
    assert record["flops"]["probes"] == pytest.approx(decision["probe_flops"])
    budget = schedule.stages[1].flops_budget
    trained = s2.flops - record["flops"]["probes"] - record["flops"]["teachers"]
    step = trained / record["train"]["steps"]
    assert abs(trained + record["flops"]["probes"] - budget) <= step  # the budget, to within one step
