"""Training losses shared by plugins (technique-agnostic)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from framework.processing import IGNORE_INDEX


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
    """Mean over masked positions of ``KL(teacher || student)`` on temperature-softened distributions, times
    ``temperature**2`` (Hinton et al. 2015), so its gradient keeps the scale of the task loss."""
    t = float(temperature)
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_position = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    if mask is not None:
        mask = mask.to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp(min=1.0) * t * t
    return per_position.mean() * t * t


def answer_distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict[str, Any],
                           temperature: float = 1.0) -> torch.Tensor:
    """:func:`distillation_kl` on the positions that predict answer tokens (logits at ``t`` predict token
    ``t + 1``), or on every unpadded position of a batch without labels."""
    labels = batch.get("labels")
    if labels is not None and labels.shape == student_logits.shape[:-1]:
        mask = labels[:, 1:] != IGNORE_INDEX
        return distillation_kl(student_logits[:, :-1], teacher_logits[:, :-1], mask, temperature)
    return distillation_kl(student_logits, teacher_logits, batch.get("attention_mask"), temperature)
