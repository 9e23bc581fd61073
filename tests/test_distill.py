import pytest
import torch

from loire.distill import DistillConfig, TeacherCache, build_teacher_cache, full_kl, kd_loss


class Fixed(torch.nn.Module):
    """A 'model' returning fixed logits (B, T, V)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.value = logits

    def forward(self, input_ids: torch.Tensor):
        return type("Out", (), {"logits": self.value})()


def test_kl_direction_is_teacher_to_student() -> None:
    p = torch.tensor([[[2.0, 0.0, -1.0]]])
    q = torch.tensor([[[0.0, 1.0, 0.0]]])
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    expected = (lp.exp() * (lp - lq)).sum()  # KL(P ‖ Q), hand formula
    assert full_kl(p, q).item() == pytest.approx(expected.item())
    assert full_kl(p, q).item() != pytest.approx(full_kl(q, p).item())


def test_cached_loss_with_full_top_k_equals_beta_weighted_kl_gradient() -> None:
    torch.manual_seed(0)
    v = 7
    teachers = [torch.randn(2, 3, v), torch.randn(2, 3, v)]
    betas = (0.25, 0.75)
    cache = build_teacher_cache(
        [Fixed(t) for t in teachers], [torch.zeros(2, 3)], DistillConfig(1, betas=betas, top_k=v)
    )
    student = torch.randn(2, 3, v, requires_grad=True)
    kd_loss(student, cache, 0).backward()
    cached_grad = student.grad.clone()
    student.grad = None
    reference = sum(b * full_kl(t, student).mean() for b, t in zip(betas, teachers, strict=True))
    reference.backward()
    torch.testing.assert_close(cached_grad, student.grad, rtol=1e-5, atol=1e-6)


def test_single_teacher_cache_equals_full_kl_value() -> None:
    torch.manual_seed(1)
    teacher, student = torch.randn(1, 4, 9), torch.randn(1, 4, 9)
    cache = build_teacher_cache([Fixed(teacher)], [torch.zeros(1, 4)], DistillConfig(1, top_k=9, temperature=2.0))
    expected = 4.0 * full_kl(teacher, student, temperature=2.0).mean()  # τ² · KL
    assert kd_loss(student, cache, 0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_top_k_is_a_lower_bound_and_identical_distributions_give_zero() -> None:
    torch.manual_seed(2)
    teacher, student = torch.randn(1, 5, 50), torch.randn(1, 5, 50)
    full = build_teacher_cache([Fixed(teacher)], [torch.zeros(1, 5)], DistillConfig(1, top_k=50))
    top = build_teacher_cache([Fixed(teacher)], [torch.zeros(1, 5)], DistillConfig(1, top_k=5))
    assert 0 <= kd_loss(student, top, 0).item() <= kd_loss(student, full, 0).item() + 1e-6
    assert kd_loss(teacher, top, 0).item() == pytest.approx(0.0, abs=1e-5)


def test_hot_loop_cost_does_not_grow_with_teachers() -> None:
    teachers = [Fixed(torch.randn(2, 3, 11)) for _ in range(4)]
    cache = build_teacher_cache(teachers, [torch.zeros(2, 3)], DistillConfig(1, top_k=4))
    assert isinstance(cache, TeacherCache) and cache.num_teachers == 4
    assert cache.indices[0].shape == (2, 3, 4)  # one mixture, not one entry per teacher


def test_beta_defaults_window_and_validation() -> None:
    config = DistillConfig(distill_steps=10)
    assert config.resolved_betas(4) == (0.25, 0.25, 0.25, 0.25)
    assert [config.weight(s) for s in (0, 5, 10, 20)] == [1.0, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="betas"):
        DistillConfig(10, betas=(1.0,)).resolved_betas(2)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(10, temperature=0)
