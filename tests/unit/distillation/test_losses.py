"""Distillation losses against their textbook formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.distillation.losses import cosine_distance, kd_loss, make_loss


def _logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, 5, generator=generator)
    teacher = torch.randn(8, 5, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    return student, teacher, labels


def test_kd_is_t_squared_kl_of_softened_outputs_plus_alpha_ce() -> None:
    student, teacher, labels = _logits()
    temperature, alpha = 3.0, 0.3
    p_teacher = torch.softmax(teacher / temperature, dim=1)
    log_p_student = torch.log_softmax(student / temperature, dim=1)
    kl = (p_teacher * (torch.log(p_teacher) - log_p_student)).sum(dim=1).mean()
    expected = alpha * F.cross_entropy(student, labels) + (1 - alpha) * temperature**2 * kl
    assert torch.allclose(kd_loss(student, teacher, labels, temperature, alpha), expected, atol=1e-6)


def test_kd_extremes() -> None:
    student, teacher, labels = _logits()
    # alpha 1: labels alone; no labels: the teacher alone; a student equal to the teacher: no KL.
    assert torch.allclose(kd_loss(student, teacher, labels, 4.0, 1.0), F.cross_entropy(student, labels))
    assert kd_loss(teacher, teacher, None, 4.0, 0.5).abs() < 1e-6
    assert kd_loss(student, teacher, None, 4.0, 0.5) > 0


def test_cosine_distance() -> None:
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [3.0, 3.0]])
    assert math.isclose(float(cosine_distance(a, b)), 0.5, abs_tol=1e-6)  # mean of 1 (orthogonal) and 0 (parallel)


def test_kd_applies_to_the_classifier_output_and_mse_to_the_others() -> None:
    student, teacher, labels = _logits()
    extra_student, extra_teacher = torch.ones(8, 3), torch.zeros(8, 3)
    loss = make_loss("kd", 2.0, 0.5, classifier=1)
    combined = loss([extra_student, student], [extra_teacher, teacher], labels)
    expected = F.mse_loss(extra_student, extra_teacher) + kd_loss(student, teacher, labels, 2.0, 0.5)
    assert torch.allclose(combined, expected)


def test_kd_without_a_classifier_output_is_refused() -> None:
    with pytest.raises(ValueError, match="classes"):
        make_loss("kd", 2.0, 0.5, classifier=None)
