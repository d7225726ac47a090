"""Distillation losses: a student's outputs against the teacher's (and the labels, for classifiers)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["kd", "mse", "cosine"]
# (student outputs, teacher outputs, labels or None) -> scalar loss; outputs in export order.
DistillLoss = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor | None], torch.Tensor]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton et al.'s distillation loss: ``alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher || student)``.

    Both logits are softened by the temperature T; the KL term is scaled by T squared so that its
    gradients keep their size as T changes. Without labels it is the KL term alone.

    Args:
        student_logits: ``[batch, classes]``.
        teacher_logits: ``[batch, classes]``, computed without gradients.
        labels: Integer class labels ``[batch]``, or None.
        temperature: T > 0.
        alpha: Weight of the cross-entropy on the labels, 0..1.
    """
    soft_student = F.log_softmax(student_logits / temperature, dim=-1)
    soft_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(soft_student, soft_teacher, reduction="batchmean", log_target=True) * temperature**2
    if labels is None:
        return kl
    return alpha * F.cross_entropy(student_logits, labels) + (1.0 - alpha) * kl


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``1 - cos(student, teacher)``, each sample's output flattened."""
    return (1.0 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)).mean()


def make_loss(kind: LossKind, temperature: float, alpha: float, classifier: int | None) -> DistillLoss:
    """The loss over all outputs: `kind` on each output, except that kd applies to the classifier
    output only and the others (if any) are matched by mean squared error.

    Args:
        kind: ``kd``, ``mse`` or ``cosine``.
        temperature: T of kd.
        alpha: Label weight of kd.
        classifier: Index of the ``[batch, classes]`` output kd applies to (needed for kd).
    """
    if kind == "kd" and classifier is None:
        raise ValueError("kd needs a [batch, classes] output")
    distance = cosine_distance if kind == "cosine" else F.mse_loss

    def loss(
        student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], labels: torch.Tensor | None
    ) -> torch.Tensor:
        terms = [
            kd_loss(s, t, labels, temperature, alpha) if kind == "kd" and index == classifier else distance(s, t)
            for index, (s, t) in enumerate(zip(student, teacher, strict=True))
        ]
        return torch.stack(terms).sum()

    return loss
