import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loire
from loire.grow import grow
from loire.train import Batcher, TrainConfig, TrainingDiverged, complete_checkpoints, lr_lambda, train
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    from safetensors.torch import save_file
    import loire
    from loire.train import TrainConfig, train
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = loire.preset("gpt-tiny", vocab_size=64, hidden_size=32, head_dim=16, num_attention_heads=2,
                          intermediate_size=64, num_hidden_layers=2, max_position_embeddings=32, hidden_dropout=0.1)
    model = loire.LoireForCausalLM(config)
    blocks = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(1))
    kill_at = int(os.environ.get("KILL_AT", "0"))
    def on_log(metrics, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    cfg = TrainConfig(steps=20, batch_size=4, lr=3e-3, warmup_steps=3, checkpoint_every=5, log_every=1, progress=False)
    result = train(model, blocks, cfg, checkpoint_dir=sys.argv[1], resume=True, on_log=on_log)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, sys.argv[2])
    print("resumed_from", result.resumed_from)
    """
)


def _run(tmp: Path, ckpt: str, out: str, kill_at: int) -> subprocess.CompletedProcess:
    script = tmp / "train_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "KILL_AT": str(kill_at), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(script), ckpt, out], env=env, capture_output=True, text=True, timeout=300
    )


def test_sigkill_mid_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    uninterrupted = _run(tmp_path, str(tmp_path / "ck-a"), str(tmp_path / "a.safetensors"), kill_at=0)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    killed = _run(tmp_path, str(tmp_path / "ck-b"), str(tmp_path / "b.safetensors"), kill_at=12)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in complete_checkpoints(tmp_path / "ck-b")] == ["checkpoint-5", "checkpoint-10"]
    resumed = _run(tmp_path, str(tmp_path / "ck-b"), str(tmp_path / "b.safetensors"), kill_at=0)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed_from 10" in resumed.stdout
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def test_incomplete_checkpoint_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "checkpoint-7").mkdir()  # no COMPLETE marker: a write that was cut off
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "COMPLETE").write_text("{}")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-3"]


def test_nan_loss_stops_training() -> None:
    model = loire.LoireForCausalLM(tiny_config("gpt-tiny"))
    blocks = torch.randint(0, 61, (16, 16))
    with pytest.raises(TrainingDiverged, match="non-finite"):
        train(model, blocks, TrainConfig(steps=30, batch_size=4, lr=1e6, max_grad_norm=1e9, progress=False))


def test_batches_are_deterministic_and_cover_the_data() -> None:
    blocks = torch.arange(40).view(10, 4)
    config = TrainConfig(steps=5, batch_size=5, seed=3)
    a, b = Batcher(blocks, config), Batcher(blocks, config)
    assert all(torch.equal(a.micro_batch(s, 0)[0], b.micro_batch(s, 0)[0]) for s in range(4))
    first_epoch = torch.cat([a.micro_batch(0, 0)[0], a.micro_batch(1, 0)[0]])
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 40, 4))


def test_replay_rows_come_from_memory_and_mlm_masking() -> None:
    blocks, memory = torch.zeros(10, 4, dtype=torch.long), torch.ones(6, 4, dtype=torch.long)
    batcher = Batcher(blocks, TrainConfig(steps=1, batch_size=5, replay_ratio=0.4), replay=memory)
    rows, _ = batcher.micro_batch(0, 0)
    assert rows.sum(dim=1).tolist() == [0, 0, 0, 4, 4]
    mlm = Batcher(
        torch.randint(5, 50, (8, 32)),
        TrainConfig(steps=1, batch_size=8),
        is_causal=False,
        mask_token_id=2,
        vocab_size=50,
    )
    inputs, labels = mlm.micro_batch(0, 0)
    chosen = labels != -100
    assert 0.05 < chosen.float().mean() < 0.3
    assert (inputs[chosen] == 2).float().mean() > 0.6


def test_learning_rate_warms_up_then_decays() -> None:
    f = lr_lambda(TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) < f(20)


def test_devices_reach_zero_by_the_end_of_the_window_and_on_log_is_called() -> None:
    for mode in ("scheduled", "learned"):
        model = grow(
            loire.LoireForCausalLM(tiny_config("bert-tiny", plugin_lambda_mode=mode, is_causal=True)),
            layers=3,
            hidden=24,
        )
        logged: list[int] = []
        train(
            model,
            torch.randint(0, 61, (16, 16)),
            TrainConfig(steps=6, batch_size=4, device_steps=4, log_every=2, progress=False),
            on_log=lambda metrics, step, logged=logged: logged.append(step),
        )
        assert logged == [2, 4, 6]
        assert set(model.plugin_lambdas().values()) == {0.0}
        model.consolidate()
        assert model.config.plugin_layers == [] and not model.config.hidden_mask


def test_distillation_from_teachers_runs_and_reports_kd() -> None:
    teacher = loire.LoireForCausalLM(tiny_config("gpt-tiny"))
    student = grow(teacher, ffn=48)
    seen: list[float] = []
    from loire.distill import DistillConfig

    result = train(
        student,
        torch.randint(0, 61, (16, 16)),
        TrainConfig(steps=4, batch_size=4, log_every=1, progress=False, distill=DistillConfig(distill_steps=3)),
        teachers=[teacher, teacher],
        on_log=lambda m, s: seen.append(m["train/kd_weight"]),
    )
    assert seen == [1.0, pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0]
    assert result.teacher_flops > 0
